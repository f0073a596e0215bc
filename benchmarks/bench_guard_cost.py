"""What the memory-safety clamps (jax_fa4/guard.py) cost a paged decode step.

  python benchmarks/bench_guard_cost.py --out guard_cost.json

A jitted program of L = 16 paged_attention decode calls (one per "layer", each output
feeding the next query; bf16, 32 query / 4 KV heads, head dim 128, 64-token pages,
16k-token context, causal, split-KV heuristic), batch 1 and 8, each layer with its own
cache so that no call finds its K/V in the 50 MB L2.  The same program is compiled
twice: with the clamps (default) and with JAX_FA4_UNGUARDED=1 (no clamps; read at
trace time).  Two page-table layouts:

* shared: all layers take one page table and one seqused_k (as a model does); XLA
  computes the clamp once per program;
* per_layer: every layer has its own table and lengths (worst case: one clamp per call).

Time per call: the GPU span of the program from a profiler trace
(benchmarks/device_time.py: first kernel start to last kernel end, launch gaps
included, host dispatch not) / L, median over --reps runs alternating guarded and
unguarded; "wall" is the host clock around the program / L (median).  The difference
guarded - unguarded per call is what the clamps cost.  Needs only precompiled kernels
(CALLS below; `python -m jax_fa4.precompile --calls benchmarks/bench_guard_cost.py`).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_fa4

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device_time import device_time  # noqa: E402

HEADS, KV_HEADS, HDIM, PAGE, CONTEXT, LAYERS = 32, 4, 128, 64, 16384, 16
BATCHES = (1, 8)


def _call(b, s=CONTEXT):
    max_pages = s // PAGE
    kv = ((b * max_pages, PAGE, KV_HEADS, HDIM), "bfloat16")
    return dict(fn="paged_attention", q=((b, 1, HEADS, HDIM), "bfloat16"), k_cache=kv,
                v_cache=kv, page_table=((b, max_pages), "int32"), seqused_k=((b,), "int32"),
                is_causal=True)


# For `python -m jax_fa4.precompile --calls benchmarks/bench_guard_cost.py`.
CALLS = [_call(b) for b in BATCHES]


@contextlib.contextmanager
def _guard(on: bool):
    """JAX_FA4_UNGUARDED unset (clamps on) or =1 (off) while a program is traced."""
    old = os.environ.pop("JAX_FA4_UNGUARDED", None)
    if not on:
        os.environ["JAX_FA4_UNGUARDED"] = "1"
    try:
        yield
    finally:
        os.environ.pop("JAX_FA4_UNGUARDED", None)
        if old is not None:
            os.environ["JAX_FA4_UNGUARDED"] = old


def program(layers: int, shared: bool):
    """q, caches (L (k, v) pairs), tables, lengths -> q after L decode calls."""
    fn = functools.partial(jax_fa4.paged_attention, is_causal=True)

    def loop(q, caches, tables, used):
        for i in range(layers):
            kc, vc = caches[i]
            j = 0 if shared else i
            q = fn(q, kc, vc, tables[j], used[j]).astype(q.dtype)
        return q

    return loop


def inputs(b: int, layers: int, context: int, seed: int = 0):
    max_pages = context // PAGE
    pages = b * max_pages
    key = jax.random.PRNGKey(seed)
    caches = tuple(
        tuple(jax.random.normal(jax.random.fold_in(key, 2 * i + j),
                                (pages, PAGE, KV_HEADS, HDIM), jnp.bfloat16) for j in range(2))
        for i in range(layers))
    rng = np.random.default_rng(seed)
    tables = tuple(jnp.asarray(rng.permutation(pages).reshape(b, max_pages).astype(np.int32))
                   for _ in range(layers))
    used = tuple(jnp.full((b,), context, jnp.int32) for _ in range(layers))
    q = jax.random.normal(jax.random.fold_in(key, 10**6), (b, 1, HEADS, HDIM), jnp.bfloat16)
    return q, caches, tables, used


def measure(b, layers, context, shared, reps):
    args = inputs(b, layers, context)
    compiled = {}
    for on in (True, False):
        with _guard(on):
            compiled[on] = jax.jit(program(layers, shared)).lower(*args).compile()
    # the guarded program has the clamps, the unguarded one has none
    hlo = {on: c.as_text() for on, c in compiled.items()}
    spans = {True: [], False: []}
    kernels = {}
    walls = {True: [], False: []}
    for _ in range(reps):
        for on in (True, False):  # alternate: drift hits both alike
            dev = device_time(compiled[on], *args)
            if dev is not None:
                spans[on].append(dev[0] / layers)
                kernels[on] = dev[2]
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[on](*args))
            walls[on].append((time.perf_counter() - t0) / layers)
    med = lambda xs: float(np.median(xs)) * 1e6 if xs else float("nan")  # noqa: E731
    row = dict(b=b, tables="shared" if shared else "per_layer", layers=layers,
               context=context, guarded_us=round(med(spans[True]), 2),
               unguarded_us=round(med(spans[False]), 2),
               guarded_wall_us=round(med(walls[True]), 2),
               unguarded_wall_us=round(med(walls[False]), 2),
               kernels_guarded=kernels.get(True), kernels_unguarded=kernels.get(False),
               clamp_ops_in_hlo={str(on): t.count("clamp(") + t.count("minimum(")
                                 for on, t in hlo.items()})
    row["diff_us_per_call"] = round(row["guarded_us"] - row["unguarded_us"], 3)
    row["diff_wall_us_per_call"] = round(row["guarded_wall_us"] - row["unguarded_wall_us"], 3)
    # spread of the unguarded spans: how much of the difference is noise
    if spans[False]:
        row["unguarded_spread_us"] = round(
            (max(spans[False]) - min(spans[False])) * 1e6, 3)
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/guard_cost.json")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--layers", type=int, default=LAYERS)
    p.add_argument("--context", type=int, default=CONTEXT)
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    args = p.parse_args()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}", flush=True)
    res = dict(device=dev.device_kind, date=time.strftime("%Y-%m-%d"), heads=HEADS,
               kv_heads=KV_HEADS, hdim=HDIM, page=PAGE, rows=[])
    for b in map(int, args.batches.split(",")):
        for shared in (True, False):
            row = measure(b, args.layers, args.context, shared, args.reps)
            res["rows"].append(row)
            print(f"b={b} tables={row['tables']}: guarded {row['guarded_us']:.2f} us/call, "
                  f"unguarded {row['unguarded_us']:.2f} us/call, difference "
                  f"{row['diff_us_per_call']:+.3f} us/call (GPU span; wall "
                  f"{row['diff_wall_us_per_call']:+.3f}); kernels/program "
                  f"{row['kernels_guarded']} vs {row['kernels_unguarded']}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
