"""varlen_attention and paged_attention on the FA4 path vs a float32 reference
(marker `gpu`; skipped without an SM90 GPU).  Matrix: tests/gpu_cases_paged.py.

Per case the test draws per-sequence lengths (including 0- and 1-length sequences and
lengths that are not page multiples) and a random non-contiguous page table.  Outputs
are poisoned (NaN bytes) before every launch; rows that see no key must be zeros with
lse -inf (or the sink), never NaN.
"""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa4

sys.path.insert(0, os.path.dirname(__file__))
from gpu_cases_paged import CALLS, PAGED_MAX_TOKENS  # noqa: E402
from reference import sequence64  # noqa: E402
from test_gpu_forward import _has_sm90, _relerr, _window  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _has_sm90(), reason="needs an SM90 (Hopper) GPU"),
              pytest.mark.usefixtures("poisoned_outputs")]




def ref_sequence(q, k, v, sinks, scale, window, softcap):
    """One sequence, float64: q (Tq, N, H), k/v (Tk, K, H); FA's bottom-right windows.
    Returns out (Tq, N, Hv), lse (Tq, N)."""
    return sequence64(q, k, v, offset=k.shape[0] - q.shape[0], window=window, scale=scale,
                      softcap=softcap, sinks=sinks)


def _f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def _kwargs(case):
    return {k: v for k, v in case.items()
            if k in ("is_causal", "local_window_size", "logits_soft_cap", "num_splits")}


def _random(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def _case_id(c):
    if c["fn"] == "varlen_attention":
        (tot, n, hd), dt = c["q"]
        s = f"varlen-{dt[:4]}-h{n}/{c['k'][0][1]}-d{hd}"
    else:
        ps, kh = c["k_cache"][0][1], c["k_cache"][0][2]
        q = c["q"][0]
        tq = q[1] if len(q) == 4 else q[0] // 3
        s = (f"paged-{c['q'][1][:4]}-ps{ps}-tq{tq}{'packed' if len(q) == 3 else ''}"
             f"-h{q[-2]}/{kh}-d{q[-1]}")
    extra = "-".join(f"{k}={v}" for k, v in _kwargs(c).items())
    return s + ("-seqused" if "seqused_k" in c and c["fn"] == "varlen_attention" else "") + (
        "-sinks" if c.get("sinks") else "") + (f"-{extra}" if extra else "")


def _check(o, lse, ref_o, ref_lse, rows):
    """o/lse rows `rows` vs the reference; also no NaN anywhere."""
    o, lse = _f64(o), np.asarray(lse, np.float64)
    assert not np.isnan(o).any(), "NaN in the output (unwritten poisoned rows or bad values)"
    assert not np.isnan(lse).any(), "NaN in the LSE"
    assert _relerr(o[rows], ref_o) <= 1e-2, f"rel. error {_relerr(o[rows], ref_o):.2e}"
    fin = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse[rows]), fin)
    if fin.any():
        assert _relerr(lse[rows][fin], ref_lse[fin]) <= 1e-3
    # Rows that see no key (and no sink): exactly zero.
    np.testing.assert_array_equal(o[rows][~fin], 0.0)


def _lens(rng, b, choices, total):
    while True:
        lens = rng.choice(choices, size=b)
        if lens.sum() <= total:
            return lens.astype(np.int32)


@pytest.mark.parametrize("case", CALLS, ids=[_case_id(c) for c in CALLS])
def test_matches_reference(case):
    run_case(case, "fa4")


def run_case(case, implementation):
    """Draws inputs for `case`, runs it with `implementation` and checks it against
    the float64 reference; 'fa4' also asserts the custom call is in the program."""
    rng = np.random.default_rng(abs(hash(_case_id(case))) % 2**32)
    kw = _kwargs(case)
    window, softcap = _window(kw), kw.get("logits_soft_cap")
    n = case["q"][0][-2]
    sinks = jnp.asarray(rng.standard_normal(n, np.float32)) if case.get("sinks") else None
    sinks64 = None if sinks is None else np.asarray(sinks, np.float64)
    scale = 1 / np.sqrt(case["q"][0][-1])
    if case["fn"] == "varlen_attention":
        q, k, v = (_random(rng, *case[x]) for x in ("q", "k", "v"))
        b = case["cu_seqlens_q"][0][0] - 1
        lq = _lens(rng, b, [0, 1, 17, 100, 333, 400], q.shape[0])
        lk = _lens(rng, b, [1, 0, 333, 100, 700, 64], k.shape[0])
        lq[rng.integers(b)] = 1  # always a 1-length query sequence
        cu_q = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
        cu_k = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
        used_k = None
        if "seqused_k" in case:
            used_k = (lk * rng.uniform(0.3, 1.0, b)).astype(np.int32)
        f = jax.jit(functools.partial(
            jax_fa4.varlen_attention, max_seqlen_q=case["max_seqlen_q"],
            max_seqlen_k=case["max_seqlen_k"], implementation=implementation,
            return_lse=True, **kw))
        args = (q, k, v, cu_q, cu_k)
        extra = {} if used_k is None else {"seqused_k": used_k}
        compiled = f.lower(*args, sinks=sinks, **extra).compile()
        assert ("jax_fa4_cute_call" in compiled.as_text()) == (implementation == "fa4")
        o, lse = compiled(*args, sinks=sinks, **extra)
        qn, kn, vn = _f64(q), _f64(k), _f64(v)
        ro, rl = np.zeros(o.shape), np.full(lse.shape, -np.inf)
        for i in range(b):
            ek = cu_k[i] + (lk[i] if used_k is None else used_k[i])
            sl = slice(cu_q[i], cu_q[i + 1])
            if lq[i]:
                ro[sl], rl[sl] = ref_sequence(qn[sl], kn[cu_k[i]:ek], vn[cu_k[i]:ek], sinks64,
                                              scale, window, softcap)
        _check(o, lse, ro, rl, slice(None))
        return
    # paged
    kc, vc = _random(rng, *case["k_cache"]), _random(rng, *case["v_cache"])
    pages, ps = kc.shape[:2]
    b, max_pages = case["page_table"][0]
    table = rng.permutation(pages)[: b * max_pages].reshape(b, max_pages).astype(np.int32)
    used = rng.integers(1, PAGED_MAX_TOKENS, b).astype(np.int32)
    used[0] = PAGED_MAX_TOKENS - 3  # long, not a page multiple
    used[-1] = min(used[-1], 77)
    packed = "cu_seqlens_q" in case
    q = _random(rng, *case["q"])
    tq = case["max_seqlen_q"] if packed else q.shape[1]
    extra = {}
    if packed:
        lq = rng.integers(1, tq + 1, b).astype(np.int32)
        cu_q = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
        extra = dict(cu_seqlens_q=cu_q, max_seqlen_q=tq)
    f = jax.jit(functools.partial(jax_fa4.paged_attention, implementation=implementation,
                                  return_lse=True, **kw, **extra))
    compiled = f.lower(q, kc, vc, table, used, sinks=sinks).compile()
    assert ("jax_fa4_cute_call" in compiled.as_text()) == (implementation == "fa4")
    o, lse = compiled(q, kc, vc, table, used, sinks=sinks)
    qn, kn, vn = _f64(q), _f64(kc), _f64(vc)
    ro, rl = np.zeros(o.shape), np.full(lse.shape, -np.inf)
    for i in range(b):
        toks = np.arange(used[i])
        rows = table[i, toks // ps] * ps + toks % ps
        ki = kn.reshape(-1, *kn.shape[2:])[rows]
        vi = vn.reshape(-1, *vn.shape[2:])[rows]
        if packed:
            sl = slice(cu_q[i], cu_q[i + 1])
            ro[sl], rl[sl] = ref_sequence(qn[sl], ki, vi, sinks64, scale, window, softcap)
        else:
            ro[i], rl[i] = ref_sequence(qn[i], ki, vi, sinks64, scale, window, softcap)
    _check(o, lse, ro, rl, slice(None))


def test_update_paged_cache_then_decode():
    """Decode step: write one token per sequence into its page, then attend."""
    rng = np.random.default_rng(5)
    kc = _random(rng, (40, 64, 2, 128), jnp.bfloat16)
    vc = _random(rng, (40, 64, 2, 128), jnp.bfloat16)
    table = rng.permutation(40)[:24].reshape(3, 8).astype(np.int32)
    used = np.array([100, 7, 300], np.int32)
    kn, vn = _random(rng, (3, 1, 2, 128), jnp.bfloat16), _random(rng, (3, 1, 2, 128), jnp.bfloat16)
    q = _random(rng, (3, 1, 16, 128), jnp.bfloat16)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(kc, vc, kn, vn, q, table, used):
        kc, vc = jax_fa4.update_paged_cache(kc, vc, kn, vn, table, used[:, None])
        o = jax_fa4.paged_attention(q, kc, vc, table, used + 1, is_causal=True,
                                    implementation="fa4")
        return kc, vc, o

    kc_np, vc_np = _f64(kc), _f64(vc)
    kc2, vc2, o = step(kc, vc, kn, vn, q, table, used)
    for i in range(3):
        p, s = table[i, used[i] // 64], used[i] % 64
        kc_np[p, s], vc_np[p, s] = _f64(kn)[i, 0], _f64(vn)[i, 0]
        np.testing.assert_array_equal(_f64(kc2)[p, s], _f64(kn)[i, 0])
        toks = np.arange(used[i] + 1)
        rows = table[i, toks // 64] * 64 + toks % 64
        ro, _ = ref_sequence(_f64(q)[i], kc_np.reshape(-1, 2, 128)[rows],
                             vc_np.reshape(-1, 2, 128)[rows], None, 128 ** -0.5, (None, 0), None)
        assert _relerr(_f64(o)[i], ro) <= 1e-2
