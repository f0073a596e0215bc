"""The kernel configurations the dispatcher can produce, as classes, and which GPU
matrix cases run each (pure Python: no GPU, no compiler).

A *class* is a projection of a plan onto the axes that change the kernel code a call
runs.  One product of every axis would be thousands of kernels, so the classes are:

* ``structure``: KV path (dense, packed, paged TMA, paged cp.async), q layout, split
  (none, the combine -- a kernel's block shape or the in-kernel merge -- and the
  launch, or the JAX merge for sinks), the tile (tile_m x tile_n, RS, stages,
  design), the cp.async loader's rows per pass and whether a head dim is padded to 16.
  This is where the head-dim-96/160/224 paged bugs lived (docs/DESIGN.md).
* ``mask``: path, q layout, split x mask kind (none, causal, local left/right/both).
* ``score``: path, split x softcap x sinks.
* ``gqa``: path, split x GQA packing x dtype.
* ``backward``: backward tile x mask; layout x GQA x seqused; softcap x sinks.

`reachable()` walks the accepted call space through the dispatcher's own planners
(dispatch.plan_dense / plan_varlen, every multiple-of-8 head dim pair up to 256 and
512/512, every page size that changes the plan, decode and prefill shapes);
`matrix_classes()` plans every case of the GPU matrix files the same way.
tests/test_plan_coverage.py fails when a reachable class has no GPU case.

    python tests/plan_space.py            # class counts and what is missing
    python tests/plan_space.py --table    # the coverage table for docs/RELIABILITY.md
    python tests/plan_space.py --emit     # GPU cases for the missing classes
"""
from __future__ import annotations

import collections
import importlib.util
import itertools
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from jax_fa4.dispatch import (DenseCall, Unsupported, VarlenCall, plan_backward,  # noqa: E402
                              plan_dense, plan_varlen)
from jax_fa4.kernels.config import cp_async_rows_per_pass  # noqa: E402
from jax_fa4.precompile import plan_call  # noqa: E402

HEAD_DIMS = tuple(range(8, 257, 8))
WINDOWS = {"none": (None, None), "causal": (None, 0), "local": (100, 0),
           "local_left": (100, None), "local_right": (None, 20)}


# --------------------------------------------------------------------------- classes

def _path(v) -> str:
    if v.kv_layout == "paged":
        return "paged_tma" if v.paged_tma else "paged_cpasync"
    return v.kv_layout


def _split(plan) -> str:
    """unsplit; split_<combine>[_pdl][_prefetch] (the combine kernel's block shape, or
    the merge inside the split kernel: kernels/split.COMBINES; the launch; the L2
    prefetch before the wait) or split_jax_merge (sinks)."""
    if plan.num_splits == 1:
        return "unsplit"
    sv = plan.kernel_variant
    if not sv.fused_combine:
        return "split_jax_merge"
    return (f"split_{sv.combine}" + ("_pdl" if sv.pdl else "")
            + ("_prefetch" if sv.prefetch else ""))


def _mask(v) -> str:
    if v.mask != "local":
        return v.mask
    return "local_" + ("l" if v.window_left else "") + ("r" if v.window_right else "")


def _tile(t) -> str:
    return (f"{t.tile_m}x{t.tile_n}{'rs' if t.mma_pv_is_rs else ''}s{t.num_stages}"
            + ("" if t.design == "fa4" else f"-{t.design}")
            + ("-persistent" if t.persistent else "")
            + (f"-{t.ctas_per_sm}persm" if t.ctas_per_sm != 1 else ""))


def forward_classes(plan) -> set[tuple]:
    v = plan.variant
    path, split = _path(v), _split(plan)
    rows = (cp_async_rows_per_pass(v.head_dim, v.head_dim_v)
            if path == "paged_cpasync" else 0)
    padded = bool(v.head_dim % 16 or v.head_dim_v % 16)
    lengths = set()
    if v.kv_layout == "dense" and (v.has_seqused_q or v.has_seqused_k):  # jax.nn's lengths
        lengths = {("lengths", split, "seqused_" + "q" * v.has_seqused_q + "k" * v.has_seqused_k,
                    v.tile.design)}
    return lengths | {
        ("structure", path, v.q_layout, split, _tile(v.tile), f"rows{rows}",
         "pad16" if padded else "aligned"),
        ("mask", path, v.q_layout, split, _mask(v)),
        ("score", path, split, "softcap" if v.softcap is not None else "nocap",
         "sinks" if v.has_sinks else "nosinks"),
        ("gqa", path, split, "packgqa" if v.pack_gqa else "nopack", v.dtype),
    }


def backward_classes(plan) -> set[tuple]:
    try:
        b = plan_backward(plan).variant
    except Unsupported:
        return set()
    t = b.tile
    tile = f"{t.m_block_size}x{t.n_block_size}"
    mask = "local" if b.mask == "local" else b.mask
    return {
        ("bwd_tile", f"d{b.head_dim}/{b.head_dim_v}", tile, mask),
        ("bwd_layout", b.layout, "gqa" if b.qhead_per_kvhead > 1 else "mha",
         "seqused" if (b.has_seqused_q or b.has_seqused_k) else "noseqused"),
        ("bwd_score", "softcap" if b.softcap is not None else "nocap",
         "sinks" if b.has_sinks else "nosinks"),
    }


# --------------------------------------------------------------------------- reachable

def _dense_calls():
    pairs = [(d, d) for d in HEAD_DIMS] + [(d, dv) for d in HEAD_DIMS for dv in HEAD_DIMS
                                           if d != dv] + [(512, 512)]
    for (hd, hdv), mask in itertools.product(pairs, WINDOWS):
        same = hd == hdv
        for dtype, group, cap, sinks in (
                [("bfloat16", 1, None, False)] if not same else
                itertools.product(("bfloat16", "float16"), (1, 4), (None, 30.0), (False, True))):
            for sq, sk in ((333, 333), (1, 20000)):  # prefill-like; decode-like (splits)
                yield DenseCall(dtype, 2, sq, sk, 4 * group, 4, hd, hdv, WINDOWS[mask], cap,
                                sinks)
                for ql, kl in ((False, True), (True, True)):  # jax.nn's sequence lengths
                    yield DenseCall(dtype, 2, sq, sk, 4 * group, 4, hd, hdv, WINDOWS[mask],
                                    cap, sinks, q_lengths=ql, kv_lengths=kl)


def _varlen_calls():
    pairs = [(d, d) for d in HEAD_DIMS] + [(d, dv) for d in HEAD_DIMS for dv in HEAD_DIMS
                                           if d != dv] + [(512, 512)]
    for (hd, hdv), mask in itertools.product(pairs, WINDOWS):
        same = hd == hdv
        combos = ([("bfloat16", 1, None, False)] if not same else
                  itertools.product(("bfloat16", "float16"), (1, 4), (None, 30.0),
                                    (False, True)))
        for dtype, group, cap, sinks in combos:
            common = dict(dtype=dtype, batch=3, heads_q=4 * group, heads_k=4, head_dim=hd,
                          head_dim_v=hdv, window=WINDOWS[mask], softcap=cap, has_sinks=sinks)
            yield VarlenCall(q_layout="packed", kv_layout="packed", total_q=900,
                             kv_rows=1200, **common)
            tiles = {64, 80, 96, 112, 128, 144}
            for ps in sorted(tiles | {16}):
                for q_layout, tq in (("dense", 1), ("dense", 300), ("packed", 5)):
                    yield VarlenCall(q_layout=q_layout, kv_layout="paged", total_q=3 * tq,
                                     kv_rows=ps * 400, has_seqused_k=True, page_size=ps,
                                     max_pages=20000 // ps + 1, **common)


def reachable(differing_from: str | None = None) -> dict[tuple, object]:
    """Every reachable class -> one call (DenseCall / VarlenCall) that reaches it.
    differing_from: a split plan's name (kernels/split.SPLIT_PLANS): only the calls
    whose kernel under the current plan differs from theirs under that one (what a
    new plan's GPU run must cover beyond the other plan's)."""
    from jax_fa4.kernels import split

    def kernel_under(name, planner, c):
        with split.use_plan(name):
            return planner(c).kernel_variant

    out: dict[tuple, object] = {}
    for planner, calls in ((plan_dense, _dense_calls()), (plan_varlen, _varlen_calls())):
        for c in calls:
            try:
                plan = planner(c)
            except Unsupported:
                continue
            if (differing_from is not None
                    and plan.kernel_variant == kernel_under(differing_from, planner, c)):
                continue
            for cls in forward_classes(plan) | backward_classes(plan):
                out.setdefault(cls, c)
    return out


# --------------------------------------------------------------------------- GPU matrix

def _load(name):
    spec = importlib.util.spec_from_file_location(f"_plan_space_{name}",
                                                  os.path.join(HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def matrix_calls() -> list[tuple[str, dict, bool]]:
    """(file, call, gradient?) for every case the GPU matrix tests run (not the
    multi-GPU file: it needs two GPUs; not the fuzz test: its seed changes)."""
    out = []
    for c in _load("gpu_cases").CALLS:
        out.append(("gpu_cases", c, False))
    for c in _load("gpu_cases_paged").CALLS:
        out.append(("gpu_cases_paged", c, False))
    for c in _load("gpu_cases_split").CASES:  # the test runs each unsplit and split
        out.append(("gpu_cases_split", dict(c, num_splits=1), False))
        out.append(("gpu_cases_split", c, False))
    for c in _load("gpu_cases_hdim512").CALLS:
        out.append(("gpu_cases_hdim512", c, False))
    for c in _load("gpu_cases_backward").CALLS:
        out.append(("gpu_cases_backward", c, True))
    for c in _load("gpu_cases_coverage").CALLS:
        out.append(("gpu_cases_coverage", c, bool(c.get("grad"))))
    for c in _load("gpu_cases_lengths").CALLS:
        out.append(("gpu_cases_lengths", c, False))
    return out


def matrix_classes() -> dict[tuple, list[str]]:
    """Every class the GPU matrix covers -> the files whose cases cover it."""
    out = collections.defaultdict(list)
    for name, call, grad in matrix_calls():
        try:
            plan = plan_call(call)
        except Unsupported:
            continue
        classes = forward_classes(plan) | (backward_classes(plan) if grad else set())
        for cls in classes:
            if name not in out[cls]:
                out[cls].append(name)
    return dict(out)


def main(argv):
    reach = reachable()
    covered = matrix_classes()
    missing = sorted(set(reach) - set(covered))
    if "--emit" in argv:
        for case in emit_missing():
            print(f"    {case!r},")
        return 0
    if "--table" in argv:
        print("| class | GPU cases in |\n| --- | --- |")
        for cls in sorted(reach):
            print(f"| {' · '.join(cls)} | {', '.join(covered.get(cls, ['**none**']))} |")
        return 0
    kinds = collections.Counter(c[0] for c in reach)
    print(f"{len(reach)} reachable classes ({dict(kinds)}), {len(missing)} without a GPU case")
    for cls in missing:
        print("  missing:", cls, "e.g.", reach[cls])
    return 0


# --------------------------------------------------------------------------- emitting cases

def _window_kwargs(window, dense: bool = False) -> dict:
    """is_causal / local_window_size for `window`; an unbounded side is None for
    attention (its ints are literal, as jax.nn's) and -1 for varlen/paged (FA's)."""
    left, right = window
    if window == (None, None):
        return {}
    if window == (None, 0):
        return {"is_causal": True}
    free = None if dense else -1
    return {"local_window_size": (free if left is None else left,
                                  free if right is None else right)}


def case_for(call, num_splits: int, grad: bool) -> dict:
    """A GPU matrix case (tests/gpu_cases*.py format) with the static properties of
    `call`; `num_splits` pins the split decision of paged dense-q calls."""
    from gpu_cases_paged import paged_case, varlen_case

    kw = _window_kwargs(call.window, dense=isinstance(call, DenseCall))
    if call.softcap is not None:
        kw["logits_soft_cap"] = call.softcap
    if call.has_sinks:
        kw["sinks"] = True
    group = call.heads_q // call.heads_k
    if isinstance(call, DenseCall):
        b, sq, sk = (2, 333, 333) if call.seq_q > 1 else (2, 1, 4097)
        c = dict(query=((b, sq, 2 * group, call.head_dim), call.dtype),
                 key=((b, sk, 2, call.head_dim), call.dtype),
                 value=((b, sk, 2, call.head_dim_v), call.dtype), **kw)
    elif call.kv_layout == "packed" and grad:
        from gpu_cases_backward import varlen_call
        c = varlen_call(call.dtype, (17, 333, 200), 2, group, call.head_dim, **kw)
    elif call.kv_layout == "packed":
        c = varlen_case(call.dtype, call.head_dim, 2, group, "none", hdv=call.head_dim_v, **kw)
    else:
        tq = call.total_q // call.batch
        c = paged_case(call.dtype, call.head_dim, 2, group, "none", call.page_size,
                       5 if call.q_layout == "packed" else tq, packed_q=call.q_layout == "packed",
                       hdv=call.head_dim_v, **kw)
        if call.q_layout == "dense":
            c["num_splits"] = num_splits
    if grad:
        c["grad"] = True
    return c


def emit_missing() -> list[dict]:
    """Cases for every reachable class the matrix misses (greedy: one case covers all
    the classes its plan falls in)."""
    reach, covered = reachable(), set(matrix_classes())
    todo, cases = set(reach) - covered, []
    for cls in sorted(todo, key=str):
        if cls not in todo:
            continue
        call = reach[cls]
        planner = plan_dense if isinstance(call, DenseCall) else plan_varlen
        plan = planner(call)
        grad = cls[0].startswith("bwd")
        case = case_for(call, plan.num_splits, grad)
        got = plan_call(case)
        classes = forward_classes(got) | (backward_classes(got) if grad else set())
        if cls not in classes:
            raise AssertionError(f"case {case} does not reach {cls}")
        todo -= classes
        cases.append(case)
    return cases


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
