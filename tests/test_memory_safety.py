"""Memory safety by default (docs/PAGED.md, "Bad input: what each gets"), on CPU.

Bad metadata -- out-of-range page indices, seqused_k past the page table, cu_seqlens
past the rows or decreasing, seqused past its sequence -- is clamped inside the call
(jax_fa4/guard.py) before the kernel and the pure-JAX path see it.  Here: the pure-JAX
path on the bad arguments equals the same call on the clamped arguments and a numpy
float64 reference on them; max_seqlen below a sequence's length truncates (zeros, lse
-inf, no NaN, no other row's result); the clamps sit in front of the custom call in
the CUDA lowering; check_page_indices=True raises ValueError on concrete bad tables;
update_paged_cache drops writes through bad page indices.

`bad_inputs`, `clamp` and `reference` are shared with tests/test_gpu_memory_safety.py.
"""
import functools
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa4
from jax_fa4 import forward_primitive as primitive

sys.path.insert(0, os.path.dirname(__file__))
from gpu_cases_memory_safety import CASES  # noqa: E402

NAMES = list(CASES)
I32_MIN = np.iinfo(np.int32).min


def _arrays(call):
    return {k: v for k, v in call.items() if isinstance(v, tuple)}


def _static(call):
    return {k: v for k, v in call.items() if not isinstance(v, tuple) and k != "fn"}


def bad_inputs(name, rng):
    """Random (never zero) q/k/v and this case's bad metadata: kwargs of CASES[name]'s
    function (numpy int32 metadata, jax float arrays)."""
    call = CASES[name]
    out = {}
    for k, (shape, dtype) in _arrays(call).items():
        if dtype != "int32":
            x = rng.standard_normal(shape, np.float32)
            out[k] = jnp.asarray(np.where(x == 0, 0.5, x), dtype)
    if call["fn"] == "paged_attention":
        pages, ps = call["k_cache"][0][:2]
        b, max_pages = call["page_table"][0]
        cap = max_pages * ps
        table = rng.permutation(pages)[: b * max_pages].reshape(b, max_pages).astype(np.int32)
        table[0, 1] = -3  # negative, used (row 0 uses 800 tokens)
        table[1, 0] = pages + 7  # past the pool, used
        table[1, -1] = 2**30  # garbage past row 1's used pages (never read)
        table[2, -1] = I32_MIN  # used: row 2 claims more than the table holds
        used = np.array([800, 150, cap + 50], np.int32)
        if name == "paged-ps16-tq5":
            used[1] = -4  # negative length
        out.update(page_table=table, seqused_k=used)
        if "cu_seqlens_q" in call:
            out["cu_seqlens_q"] = np.array([0, 9, 4, 40], np.int32)  # decreasing, past rows
        return out
    out.update(
        cu_seqlens_q=np.array([0, 20, 10, 50, 90], np.int32),  # decreasing, past the rows
        cu_seqlens_k=np.array([-7, 60, 130, 120, 300], np.int32),  # negative start too
        seqused_q=np.array([25, 3, 10, 100], np.int32),  # 25 > 20 rows
        seqused_k=np.array([80, 30, 5, 126], np.int32))  # 80 > 60 rows, 5 > 0 rows
    return out


def clamp(name, kw):
    """guard.clamped_operands in numpy: the arguments the kernel and fallback attend over."""
    call, kw = CASES[name], dict(kw)

    def cu(x, total):
        return np.clip(np.maximum.accumulate(x), 0, total).astype(np.int32)

    if call["fn"] == "paged_attention":
        pages, ps = kw["k_cache"].shape[:2]
        kw["page_table"] = np.clip(kw["page_table"], 0, pages - 1).astype(np.int32)
        kw["seqused_k"] = np.clip(kw["seqused_k"], 0, kw["page_table"].shape[1] * ps
                                  ).astype(np.int32)
        if "cu_seqlens_q" in kw:
            kw["cu_seqlens_q"] = cu(kw["cu_seqlens_q"], kw["q"].shape[0])
        return kw
    for side in ("q", "k"):
        c = cu(kw[f"cu_seqlens_{side}"], kw[side].shape[0])
        kw[f"cu_seqlens_{side}"] = c
        kw[f"seqused_{side}"] = np.clip(kw[f"seqused_{side}"], 0, np.diff(c)).astype(np.int32)
    return kw


def _f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def _attend(q, k, v, scale, offset):
    """Causal attention, numpy float64: q (Tq, N, H), k/v (Tk, K, H); query i sees keys
    j <= i + offset.  Rows that see no key: zeros, lse -inf.  -> (Tq, N, H), (Tq, N)."""
    tq, n, _ = q.shape
    g = n // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.einsum("tnh,snh->nts", q, k) * scale
    vis = np.arange(k.shape[0])[None, :] <= np.arange(tq)[:, None] + offset
    s = np.where(vis[None], s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0)
    lsum = np.exp(s - m).sum(-1)
    lse = np.where(lsum > 0, np.log(np.where(lsum > 0, lsum, 1)) + m[..., 0], -np.inf)
    p = np.where(np.isfinite(lse)[..., None], np.exp(s - lse[..., None]), 0.0)
    return np.einsum("nts,snh->tnh", p, v), lse.T


def reference(name, kw, truncate=False):
    """(out, lse) float64 of CASES[name] on the (already clamped) arguments kw, laid
    out as the call returns them with return_residual.  truncate: the pure-JAX path's
    truncation at max_seqlen_q / max_seqlen_k (packed rows only)."""
    call = CASES[name]
    q = _f64(kw["q"])
    scale = q.shape[-1] ** -0.5
    max_q = call.get("max_seqlen_q") if truncate else None
    max_k = call.get("max_seqlen_k") if truncate else None
    ro = np.zeros(q.shape)
    rl = np.full(q.shape[:-1], -np.inf)
    if call["fn"] == "paged_attention":
        kc, vc = _f64(kw["k_cache"]), _f64(kw["v_cache"])
        ps = kc.shape[1]
        flat = lambda c: c.reshape(-1, *c.shape[2:])  # noqa: E731
        for b, used in enumerate(kw["seqused_k"]):
            toks = np.arange(used)
            rows = kw["page_table"][b, toks // ps] * ps + toks % ps
            k, v = flat(kc)[rows], flat(vc)[rows]
            if "cu_seqlens_q" not in kw:
                ro[b], rl[b] = _attend(q[b], k, v, scale, used - q.shape[1])
                continue
            c0, c1 = kw["cu_seqlens_q"][b : b + 2]
            nq = (c1 - c0) if max_q is None else min(c1 - c0, max_q)
            ro[c0 : c0 + nq], rl[c0 : c0 + nq] = _attend(q[c0 : c0 + nq], k, v, scale,
                                                          used - (c1 - c0))
        return ro, rl
    k, v = _f64(kw["k"]), _f64(kw["v"])
    cu_q, cu_k = kw["cu_seqlens_q"], kw["cu_seqlens_k"]
    for b, (lq, lk) in enumerate(zip(kw["seqused_q"], kw["seqused_k"])):
        nq = lq if max_q is None else min(lq, max_q)
        nk = lk if max_k is None else min(lk, max_k)
        sq, sk = slice(cu_q[b], cu_q[b] + nq), slice(cu_k[b], cu_k[b] + nk)
        ro[sq], rl[sq] = _attend(q[sq], k[sk], v[sk], scale, lk - lq)
    return ro, rl


def _relerr(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def check(o, lse, ro, rl, tol=1e-2):
    """No NaN; out within tol (relative L2) of the reference; lse finite exactly where
    the reference's is, and close there; rows that see no key exactly zero."""
    o, lse = _f64(o), np.asarray(lse, np.float64)
    assert not np.isnan(o).any(), "NaN in the output"
    assert not np.isnan(lse).any(), "NaN in the LSE"
    assert _relerr(o, ro) <= tol, f"rel. error {_relerr(o, ro):.2e}"
    fin = np.isfinite(rl)
    np.testing.assert_array_equal(np.isfinite(lse), fin)
    assert _relerr(lse[fin], rl[fin]) <= 1e-3
    np.testing.assert_array_equal(o[~fin], 0.0)


def run(name, kw, implementation):
    """(out, lse, compiled HLO text) of CASES[name] with arguments kw."""
    call = CASES[name]
    fn = getattr(jax_fa4, call["fn"])
    f = jax.jit(functools.partial(fn, implementation=implementation, return_lse=True,
                                  **_static(call)))
    compiled = f.lower(**kw).compile()
    o, lse = compiled(**kw)
    return o, lse, compiled.as_text()


@pytest.mark.parametrize("name", NAMES)
def test_fallback_bad_metadata_is_clamped(name):
    """The pure-JAX path on bad metadata = the same call on the clamped metadata = the
    float64 reference on the clamped metadata (truncated at max_seqlen)."""
    kw = bad_inputs(name, np.random.default_rng(NAMES.index(name)))
    o, lse, _ = run(name, kw, None)
    good = clamp(name, kw)
    o2, lse2, _ = run(name, good, None)
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(o2, np.float32))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse2))
    check(o, lse, *reference(name, good, truncate=True))


def test_clamped_arguments_hit_every_rule():
    """The bad inputs really are bad, and clamping changes each kind of metadata."""
    for name in NAMES:
        kw = bad_inputs(name, np.random.default_rng(0))
        good = clamp(name, kw)
        changed = [k for k in kw if isinstance(kw[k], np.ndarray)
                   and not np.array_equal(kw[k], good[k])]
        want = ({"page_table", "seqused_k"} | ({"cu_seqlens_q"} if "cu_seqlens_q" in kw else set())
                if CASES[name]["fn"] == "paged_attention" else
                {"cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k"})
        assert set(changed) == want, name


def test_seqused_past_capacity_equals_capacity():
    name = "paged-ps128-tq5"
    kw = bad_inputs(name, np.random.default_rng(1))
    kw["page_table"] = clamp(name, kw)["page_table"]  # only seqused_k is bad
    cap = kw["page_table"].shape[1] * kw["k_cache"].shape[1]
    o, lse, _ = run(name, kw, None)
    o2, lse2, _ = run(name, dict(kw, seqused_k=np.minimum(kw["seqused_k"], cap)), None)
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(o2, np.float32))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse2))


def test_fallback_truncates_at_max_seqlen():
    """Sequences longer than max_seqlen_q / max_seqlen_k on the pure-JAX path: rows
    from max_seqlen_q on are zero with lse -inf (not another row's result), keys from
    max_seqlen_k on are not seen; no NaN."""
    name = "varlen-short-max"
    good = clamp(name, bad_inputs(name, np.random.default_rng(7)))
    o, lse, _ = run(name, good, None)
    o, lse = _f64(o), np.asarray(lse)
    max_q = CASES[name]["max_seqlen_q"]
    cu, used = good["cu_seqlens_q"], good["seqused_q"]
    assert used.max() > max_q and good["seqused_k"].max() > CASES[name]["max_seqlen_k"]
    for b in range(len(used)):
        cut = slice(cu[b] + min(used[b], max_q), cu[b + 1])
        np.testing.assert_array_equal(o[cut], 0.0)
        assert np.isneginf(lse[cut]).all()
    # no row is a copy of another (the old clamped unpack duplicated the last row)
    rows = o.reshape(o.shape[0], -1)
    nonzero = rows[np.abs(rows).sum(-1) > 0]
    assert len(np.unique(nonzero, axis=0)) == len(nonzero)
    check(o, lse, *reference(name, good, truncate=True))
    # ... and the exact result differs: truncation is what this path documents
    assert _relerr(o, reference(name, good)[0]) > 0.1


def test_fallback_gradients_finite_on_bad_metadata():
    name = "varlen-short-max"
    kw = bad_inputs(name, np.random.default_rng(3))
    call = CASES[name]

    def loss(q, k, v):
        o = jax_fa4.varlen_attention(q, k, v, **{n: kw[n] for n in (
            "cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k")}, **_static(call))
        return jnp.sum(o.astype(jnp.float32) ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(kw["q"], kw["k"], kw["v"])
    for g in grads:
        assert np.isfinite(np.asarray(g, np.float32)).all()


# ----------------------------------------------------------------------------------
# The clamps are in the program in front of the custom call.

def _lower_cuda(name, monkeypatch):
    """CUDA lowering text of CASES[name] from this CPU host, with a stand-in kernel
    object (the lowering only embeds it)."""
    monkeypatch.setattr(primitive, "kernel_object", lambda variant: (b"\0", None))
    call = CASES[name]
    arrays = {k: jax.ShapeDtypeStruct(s, np.dtype(d)) for k, (s, d) in _arrays(call).items()}
    fn = functools.partial(getattr(jax_fa4, call["fn"]), **_static(call))
    return jax.jit(lambda a: fn(**a)).trace(arrays).lower(lowering_platforms=("cuda",)).as_text()


def _metadata_producers(text):
    """For the one jax_fa4 custom call in text: the defining line of each int32 operand
    (None for a function argument)."""
    funcs = re.split(r"\n\s*func\.func ", text)  # SSA names are per function
    lines = next(f for f in funcs if "@jax_fa4_cute_call(" in f).splitlines()
    calls = [l for l in lines if "@jax_fa4_cute_call(" in l]
    assert len(calls) == 1
    ops = re.search(r"@jax_fa4_cute_call\(([^)]*)\)", calls[0]).group(1).split(", ")
    types = re.search(r":\s*\(([^()]*)\)\s*->", calls[0]).group(1).split(", ")
    defs = {}
    for l in lines:
        m = re.match(r"\s*(%[\w#]+)(?::\d+)?\s*=", l)
        if m:
            defs[m.group(1)] = l
    return [defs.get(o) for o, t in zip(ops, types) if t.endswith("xi32>")], defs


@pytest.mark.parametrize("name", ["paged-ps16-decode", "paged-ps128-packed", "varlen"])
def test_clamps_precede_custom_call(name, monkeypatch):
    monkeypatch.delenv("JAX_FA4_UNGUARDED", raising=False)
    producers, defs = _metadata_producers(_lower_cuda(name, monkeypatch))
    assert producers and all(p is not None and "call @clip" in p for p in producers), producers
    # cu_seqlens: clip(cummax(cu))
    n_cu = sum(1 for k in CASES[name] if k.startswith("cu_seqlens"))
    cummax_fed = [p for p in producers
                  if "call @cummax" in defs.get(re.search(r"call @\w+\((%[\w#]+)", p).group(1), "")]
    assert len(cummax_fed) == n_cu


def test_unguarded_switch_removes_clamps(monkeypatch):
    """JAX_FA4_UNGUARDED=1 (benchmarks only): the metadata goes to the kernel as is."""
    monkeypatch.setenv("JAX_FA4_UNGUARDED", "1")
    producers, _ = _metadata_producers(_lower_cuda("paged-ps16-decode", monkeypatch))
    assert producers == [None, None]


# ----------------------------------------------------------------------------------
# check_page_indices=True: the strict check.

def _small_paged(rng):
    q = jnp.asarray(rng.standard_normal((2, 3, 8, 64)), jnp.float32)
    kc = jnp.asarray(rng.standard_normal((10, 16, 2, 64)), jnp.float32)
    vc = jnp.asarray(rng.standard_normal((10, 16, 2, 64)), jnp.float32)
    table = np.array([[3, 1, 4, 0], [9, 2, 6, 5]], np.int32)
    return q, kc, vc, table, np.array([40, 20], np.int32)


@pytest.mark.parametrize("row,col,value,used,match", [
    (1, 1, 10, None, r"page_table\[1\] uses pages \[9, 10\] outside \[0, 10\)"),
    (0, 2, -1, None, r"page_table\[0\] uses pages \[3, 1, -1\]"),
    (None, None, None, [40, 65], r"seqused_k \[40, 65\] is negative or exceeds the page "
                                 r"table's capacity \(4 pages of 16\)"),
    (None, None, None, [-1, 20], r"seqused_k \[-1, 20\]"),
])
@pytest.mark.parametrize("concrete", ["numpy", "jax"])
def test_check_page_indices_concrete_raises_value_error(row, col, value, used, match, concrete):
    q, kc, vc, table, ok_used = _small_paged(np.random.default_rng(0))
    if row is not None:
        table[row, col] = value
    used = ok_used if used is None else np.array(used, np.int32)
    if concrete == "jax":
        table, used = jnp.asarray(table), jnp.asarray(used)
    with pytest.raises(ValueError, match=match):
        jax_fa4.paged_attention(q, kc, vc, table, used, check_page_indices=True)


def test_check_page_indices_ignores_unused_entries_and_matches_unchecked():
    q, kc, vc, table, used = _small_paged(np.random.default_rng(1))
    table[1, 2:] = [-5, 99]  # past row 1's 20 tokens (2 pages): never read, not checked
    o = jax_fa4.paged_attention(q, kc, vc, table, used, is_causal=True, check_page_indices=True)
    o2 = jax_fa4.paged_attention(q, kc, vc, table, used, is_causal=True)
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o2))
    f = jax.jit(lambda t, u: jax_fa4.paged_attention(q, kc, vc, t, u, is_causal=True,
                                                     check_page_indices=True))
    np.testing.assert_array_equal(np.asarray(f(table, used)), np.asarray(o2))


def test_check_page_indices_traced_raises_runtime_error_with_message():
    """Under jit the check runs in an io_callback: a jax runtime error whose message
    carries the ValueError's text."""
    q, kc, vc, table, used = _small_paged(np.random.default_rng(2))
    table[1, 0] = 12
    f = jax.jit(lambda t, u: jax_fa4.paged_attention(q, kc, vc, t, u, check_page_indices=True))
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match=r"ValueError: page_table\[1\] uses pages \[12, 2\] outside"):
        jax.block_until_ready(f(table, used))


# ----------------------------------------------------------------------------------
# update_paged_cache: writes through bad page indices are dropped.

def test_update_paged_cache_drops_bad_pages_and_positions():
    rng = np.random.default_rng(4)
    kc = jnp.asarray(rng.standard_normal((6, 4, 1, 8)), jnp.float32)
    table = np.array([[2, -1], [7, 1], [I32_MIN, 3]], np.int32)
    new = jnp.asarray(rng.standard_normal((3, 2, 1, 8)) + 10, jnp.float32)
    # row 0: slot 1 of page 2, then page -1 (dropped); row 1: page 7 (dropped), then
    # slot 3 of page 1; row 2: page INT_MIN (dropped), then position 8 (past the table).
    pos = np.array([[1, 4], [0, 7], [2, 8]], np.int32)
    k2, v2 = jax.jit(jax_fa4.update_paged_cache)(kc, kc, new, new, table, pos)
    want = np.array(kc)
    want[2, 1, 0] = np.asarray(new[0, 0, 0])
    want[1, 3, 0] = np.asarray(new[1, 1, 0])
    np.testing.assert_array_equal(np.asarray(k2), want)
    np.testing.assert_array_equal(np.asarray(v2), want)


def test_nan_in_rows_no_sequence_sees_stays_out_of_the_fallback():
    """Rows past seqused_k in a used page and rows of unused pages hold NaN (a freed page,
    padding): the pure-JAX path's output has no NaN and equals the clean cache's."""
    rng = np.random.default_rng(11)
    pages, ps, kh, hd = 12, 16, 2, 64
    kc = rng.standard_normal((pages, ps, kh, hd)).astype(np.float32)
    vc = rng.standard_normal((pages, ps, kh, hd)).astype(np.float32)
    table = rng.permutation(pages)[:8].reshape(2, 4).astype(np.int32)
    used = np.array([37, 5], np.int32)
    q = jnp.asarray(rng.standard_normal((2, 3, 4, hd)), jnp.float32)
    clean = jax_fa4.paged_attention(q, jnp.asarray(kc), jnp.asarray(vc), table, used,
                                    is_causal=True)
    dirty_k, dirty_v = kc.copy(), vc.copy()
    for b in range(2):
        for t in range(used[b], 4 * ps):
            p, s = table[b, t // ps], t % ps
            dirty_k[p, s] = dirty_v[p, s] = np.nan
    free = sorted(set(range(pages)) - set(table.ravel().tolist()))
    dirty_k[free] = dirty_v[free] = np.nan
    out = jax_fa4.paged_attention(q, jnp.asarray(dirty_k), jnp.asarray(dirty_v), table, used,
                                  is_causal=True)
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_allclose(np.asarray(out), np.asarray(clean), rtol=1e-6, atol=1e-6)
    # ... and out of the pure-JAX backward's gradients
    grad = jax.grad(lambda q, kc, vc: jnp.sum(jax_fa4.paged_attention(
        q, kc, vc, table, used, is_causal=True)), argnums=(0, 1, 2))
    clean_g = grad(q, jnp.asarray(kc), jnp.asarray(vc))
    dirty_g = grad(q, jnp.asarray(dirty_k), jnp.asarray(dirty_v))
    np.testing.assert_allclose(np.asarray(dirty_g[0]), np.asarray(clean_g[0]), rtol=1e-5,
                               atol=1e-5)
    for g in dirty_g[1:]:
        assert not np.isnan(np.asarray(g)).any()

    # varlen: padding rows after the last sequence and rows past seqused_k hold NaN
    k = rng.standard_normal((50, kh, hd)).astype(np.float32)
    v = rng.standard_normal((50, kh, hd)).astype(np.float32)
    cu = np.array([0, 20, 40], np.int32)
    su = np.array([15, 20], np.int32)
    qv = jnp.asarray(rng.standard_normal((40, 4, hd)), jnp.float32)
    f = lambda k, v: jax_fa4.varlen_attention(qv, k, v, cu, cu, max_seqlen_q=20,  # noqa: E731
                                              max_seqlen_k=20, seqused_k=su)
    clean = f(jnp.asarray(k), jnp.asarray(v))
    k[15:20] = v[15:20] = np.nan
    k[40:] = v[40:] = np.nan
    out = f(jnp.asarray(k), jnp.asarray(v))
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_allclose(np.asarray(out), np.asarray(clean), rtol=1e-6, atol=1e-6)
