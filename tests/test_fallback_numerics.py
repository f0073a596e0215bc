"""Numerics of `jax_fa4.attention` on CPU, where every call takes the pure-JAX
fallback (jax.nn.dot_product_attention, or jax_fa4's own reference attention for
softcap / sinks), against a float64 NumPy reference written here from the
documented semantics:

* GQA: query head n uses key/value head n // (N // K);
* causal and local windows are top-left aligned (as jax.nn): query i sees key j
  iff i - left <= j <= i + right (causal: right = 0);
* logits_soft_cap c: logits = c * tanh(scale * q.k / c);
* sinks (N,): one extra logit per head in the softmax denominator, with value 0;
* return_residual: LSE (natural log, including the sink) float32 of shape (B,T,N).
"""
from __future__ import annotations

import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa4
from reference import attention64, attention_jnp, visible, window_of

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
OUT_TOL = {"bfloat16": 1e-2, "float16": 1e-2, "float32": 1e-4}

@pytest.fixture(autouse=True)
def _on_cpu():
    """These tests are about the CPU fallback: run them on CPU on any host."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


# jax_fa4.attention under jit, its options static (compiles once per shape and options;
# eager calls of jax.nn run op by op and are much slower on CPU).
ATT = jax.jit(jax_fa4.attention, static_argnames=(
    "scale", "is_causal", "local_window_size", "logits_soft_cap", "implementation",
    "return_residual", "return_lse"))



# ----------------------------------------------------------------------------
# float64 NumPy reference
# ----------------------------------------------------------------------------

def np_attention(q, k, v, *, scale=None, causal=False, window=None, softcap=None,
                 sinks=None, bias=None, mask=None):
    """float64 attention (tests/reference.py).  q (B,T,N,H), k (B,S,K,H), v (B,S,K,Hv),
    sinks (N,), bias/mask broadcastable to (B,N,T,S).  Returns (out (B,T,N,Hv), lse
    (B,T,N)); rows that see no key and have no sink are NaN (their value is unspecified
    across paths)."""
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    out, lse = attention64(q, k, v, sinks, scale=scale, window=window_of(causal, window, literal=True),
                           softcap=softcap, bias=bias, mask=mask)
    dead = np.isneginf(lse)
    out[dead] = np.nan
    lse = np.where(dead, np.nan, lse)
    return out, lse


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def rounded(x, dtype):
    """The values the kernel sees: x rounded to `dtype`, as float64."""
    return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)


def make_inputs(rng, b, t, s, n, kh, h, hv, dtype, *, q_scale=1.0, squeeze=False):
    shape = lambda seq, heads, d: ((seq, heads, d) if squeeze else (b, seq, heads, d))  # noqa: E731
    q = rng.standard_normal(shape(t, n, h)) * q_scale
    k = rng.standard_normal(shape(s, kh, h))
    v = rng.standard_normal(shape(s, kh, hv))
    return tuple(jnp.asarray(x, DTYPES[dtype]) for x in (q, k, v))


# ----------------------------------------------------------------------------
# The sampled matrix
# ----------------------------------------------------------------------------

AXES = {
    "dtype": ["bfloat16", "float16", "float32"],
    "group": [1, 2, 4],
    "causal": [False, True],
    "window": [None, (5, 0), (3, 2), 7],
    "softcap": [None, 20.0],
    "sinks": [False, True],
    "t": [1, 17, 33, 128],
    "s": [1, 17, 33, 128],
    "head_dim": [64, 128, 96],
    "batch": [1, 3],
}


def _sample_cases(n_cases=60, seed=20240601):
    rnd = random.Random(seed)
    names = list(AXES)
    cases = []
    # The first cases walk every value of every axis (so each value is covered
    # whatever the seed); the rest are random.
    longest = max(len(v) for v in AXES.values())
    for i in range(longest):
        cases.append({a: AXES[a][(i + j) % len(AXES[a])] for j, a in enumerate(names)})
    while len(cases) < n_cases:
        cases.append({a: rnd.choice(AXES[a]) for a in names})
    for i, c in enumerate(cases):
        c["kv_heads"] = 1 + (i % 2)
        c["seed"] = i
    return cases


CASES = _sample_cases()


def _case_id(c):
    w = c["window"]
    w = "nowin" if w is None else (f"w{w}" if isinstance(w, int) else f"w{w[0]}_{w[1]}")
    return (f"{SHORT[c['dtype']]}-g{c['group']}k{c['kv_heads']}-{'causal' if c['causal'] else 'full'}"
            f"-{w}-{'cap' if c['softcap'] else 'nocap'}-{'sinks' if c['sinks'] else 'nosinks'}"
            f"-T{c['t']}S{c['s']}-H{c['head_dim']}-B{c['batch']}")


CASE_PARAMS = [pytest.param(c, id=_case_id(c)) for c in CASES]


def test_matrix_covers_every_value():
    for axis, values in AXES.items():
        seen = {repr(c[axis]) for c in CASES}
        assert seen == {repr(v) for v in values}, axis
    assert any(c["t"] != c["s"] for c in CASES)
    assert 50 <= len(CASES) <= 70


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_matrix_matches_float64_reference(case):
    rng = np.random.default_rng(1000 + case["seed"])
    dtype = case["dtype"]
    kh = case["kv_heads"]
    n = kh * case["group"]
    h = case["head_dim"]
    q, k, v = make_inputs(rng, case["batch"], case["t"], case["s"], n, kh, h, h, dtype,
                          q_scale=4.0 if case["softcap"] else 1.0)
    sinks = jnp.asarray(rng.normal(1.0, 2.0, n), jnp.float32) if case["sinks"] else None
    opts = dict(is_causal=case["causal"], local_window_size=case["window"],
                logits_soft_cap=case["softcap"])
    out, lse = ATT(q, k, v, sinks=sinks, return_lse=True, **opts)

    assert out.shape == q.shape[:-1] + (v.shape[-1],) and out.dtype == q.dtype
    assert lse.shape == q.shape[:-1] and lse.dtype == jnp.float32
    out = np.asarray(out.astype(jnp.float32), np.float64)
    lse = np.asarray(lse, np.float64)
    assert not np.isnan(out).any()

    ref, ref_lse = np_attention(rounded(q, dtype), rounded(k, dtype), rounded(v, dtype),
                                causal=case["causal"], window=case["window"],
                                softcap=case["softcap"],
                                sinks=None if sinks is None else np.asarray(sinks))
    # Rows that see no key (and have no sink) have no defined value: skip them.
    rows = np.isfinite(ref_lse)  # (B,T,N)
    if sinks is not None:
        assert rows.all()
    if not rows.any():
        pytest.skip("no query row sees a key")  # never happens for the sampled cases
    assert rel_err(out[rows], ref[rows]) <= OUT_TOL[dtype]
    assert np.isfinite(lse[rows]).all()
    # The LSE is float32-accurate whatever the input dtype (the reference sees the same
    # rounded inputs).
    np.testing.assert_allclose(lse[rows], ref_lse[rows], rtol=1e-4, atol=1e-3)


def test_every_sampled_case_has_rows_to_compare():
    for c in CASES:
        m = visible(c["t"], c["s"], 0, window_of(c["causal"], c["window"], literal=True))
        assert c["sinks"] or m.any(axis=1).any(), _case_id(c)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_lse_is_float32_accurate_for_half_inputs(dtype):
    rng = np.random.default_rng(7)
    q, k, v = make_inputs(rng, 2, 128, 128, 4, 2, 64, 64, dtype, q_scale=2.0)
    _, lse = ATT(q, k, v, return_lse=True)
    _, ref_lse = np_attention(rounded(q, dtype), rounded(k, dtype), rounded(v, dtype))
    # Inputs are exact in float32, products are exact, sums are float32: 1e-3 is loose.
    np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=0, atol=1e-3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_lse_float32_accurate_on_reference_path(dtype):
    """With sinks (the reference path) the LSE is float32-accurate."""
    rng = np.random.default_rng(8)
    q, k, v = make_inputs(rng, 2, 64, 64, 4, 2, 64, 64, dtype, q_scale=2.0)
    sinks = jnp.asarray(rng.normal(0.0, 1.0, 4), jnp.float32)
    _, lse = ATT(q, k, v, sinks=sinks, return_lse=True)
    _, ref_lse = np_attention(rounded(q, dtype), rounded(k, dtype), rounded(v, dtype),
                              sinks=np.asarray(sinks))
    np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=0, atol=1e-3)


def test_float16_eager_call_on_cpu():
    """An eager float16 call runs on CPU (jax.nn's F16_F16_F32 dot does not lower
    there inside jit, so jax_fa4 must not take it)."""
    q = jnp.ones((1, 8, 2, 64), jnp.float16)
    out = jax_fa4.attention(q, q, q)
    np.testing.assert_allclose(np.asarray(out, np.float32), 1.0)


def test_float16_with_softcap_or_sinks_works_on_cpu():
    rng = np.random.default_rng(9)
    q, k, v = make_inputs(rng, 1, 17, 17, 2, 1, 64, 64, "float16")
    sinks = jnp.zeros((2,), jnp.float32)
    for kw in ({"logits_soft_cap": 30.0}, {"sinks": sinks}):
        out = jax_fa4.attention(q, k, v, **kw)
        ref, _ = np_attention(rounded(q, "float16"), rounded(k, "float16"), rounded(v, "float16"),
                              softcap=kw.get("logits_soft_cap"),
                              sinks=None if "sinks" not in kw else np.zeros(2))
        assert rel_err(out.astype(jnp.float32), ref) < 1e-2


# ----------------------------------------------------------------------------
# Specific semantics
# ----------------------------------------------------------------------------

def test_sinks_change_the_result_and_match_reference():
    rng = np.random.default_rng(11)
    q, k, v = make_inputs(rng, 1, 33, 33, 4, 2, 64, 64, "float32")
    big = jnp.full((4,), 3.0, jnp.float32)
    with_sinks = ATT(q, k, v, sinks=big)
    without = ATT(q, k, v)
    # A sink takes probability mass (value 0): the output shrinks.
    assert np.linalg.norm(np.asarray(with_sinks)) < 0.9 * np.linalg.norm(np.asarray(without))
    ref, _ = np_attention(q, k, v, sinks=np.asarray(big))
    assert rel_err(with_sinks, ref) < 1e-5
    # Very negative sinks are no sinks.
    none_like = ATT(q, k, v, sinks=jnp.full((4,), -1e4, jnp.float32))
    np.testing.assert_allclose(np.asarray(none_like), np.asarray(without), rtol=1e-5, atol=1e-5)


def test_softcap_changes_the_result_and_matches_reference():
    rng = np.random.default_rng(12)
    q, k, v = make_inputs(rng, 1, 33, 33, 2, 2, 64, 64, "float32", q_scale=6.0)
    capped = ATT(q, k, v, logits_soft_cap=5.0)
    plain = ATT(q, k, v)
    assert rel_err(capped, plain) > 0.05
    ref, _ = np_attention(q, k, v, softcap=5.0)
    assert rel_err(capped, ref) < 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fully_masked_rows_with_sinks_give_zero_and_lse_sink(dtype):
    """T > S with window (2, 0): queries i >= S + 2 see no key; with sinks their
    softmax is over the sink alone: output 0, LSE = sink."""
    rng = np.random.default_rng(13)
    t, s = 33, 17
    q, k, v = make_inputs(rng, 1, t, s, 2, 1, 64, 64, dtype)
    sinks = jnp.asarray([0.5, -1.5], jnp.float32)
    out, lse = ATT(q, k, v, local_window_size=(2, 0), sinks=sinks,
                                 return_lse=True)
    out, lse = np.asarray(out.astype(jnp.float32)), np.asarray(lse)
    dead = np.arange(t) >= s + 2
    assert dead.any()
    np.testing.assert_array_equal(out[0, dead], 0.0)
    np.testing.assert_allclose(lse[0, dead], np.broadcast_to([0.5, -1.5], lse[0, dead].shape),
                               atol=1e-6)
    ref, ref_lse = np_attention(rounded(q, dtype), rounded(k, dtype), rounded(v, dtype),
                                window=(2, 0), sinks=np.asarray(sinks))
    assert rel_err(out, ref) < OUT_TOL[dtype]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_value_head_dim_may_differ(dtype):
    rng = np.random.default_rng(14)
    q, k, v = make_inputs(rng, 2, 17, 33, 4, 2, 64, 32, dtype)
    out, lse = ATT(q, k, v, is_causal=True, return_lse=True)
    assert out.shape == (2, 17, 4, 32)
    ref, ref_lse = np_attention(rounded(q, dtype), rounded(k, dtype), rounded(v, dtype),
                                causal=True)
    assert rel_err(out.astype(jnp.float32), ref) < OUT_TOL[dtype]
    np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("window", [(-1, 3), (4, -1), (-1, -1), (-3, 5), 0, (None, 3),
                                    (4, None)])
def test_window_ints_are_literal_as_in_jax_nn(window):
    """Every int is a bound, negative ones too (jax.nn's meaning: (-1, 3) lets query i
    see keys i+1..i+3); None (jax_fa4's extension) leaves a side unbounded.  Rows
    that see no key give zeros (one rule on every path)."""
    rng = np.random.default_rng(15)
    q, k, v = make_inputs(rng, 1, 33, 33, 2, 1, 64, 64, "float32")
    out = ATT(q, k, v, local_window_size=window)
    ref, _ = np_attention(np.asarray(q), np.asarray(k), np.asarray(v), window=window)
    ref = np.nan_to_num(ref, nan=0.0)  # rows with no key: zeros
    assert rel_err(out, ref) < 1e-4
    if None not in np.atleast_1d(np.asarray(window, object)):
        nn = jax.nn.dot_product_attention(q, k, v, local_window_size=window)
        seen = np.abs(ref).sum(-1) > 0  # jax.nn gives the mean of V where no key is seen
        np.testing.assert_allclose(np.asarray(out)[seen], np.asarray(nn)[seen], atol=1e-5)


def test_causal_with_window_right_is_clamped_to_zero():
    rng = np.random.default_rng(16)
    q, k, v = make_inputs(rng, 1, 33, 33, 2, 1, 64, 64, "float32")
    a = ATT(q, k, v, is_causal=True, local_window_size=(4, 3))
    b = ATT(q, k, v, local_window_size=(4, 0))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_explicit_scale():
    rng = np.random.default_rng(17)
    q, k, v = make_inputs(rng, 1, 17, 17, 2, 2, 64, 64, "bfloat16")
    out = ATT(q, k, v, scale=0.37, logits_soft_cap=3.0)
    ref, _ = np_attention(rounded(q, "bfloat16"), rounded(k, "bfloat16"),
                          rounded(v, "bfloat16"), scale=0.37, softcap=3.0)
    assert rel_err(out.astype(jnp.float32), ref) < 1e-2


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("extras", ["none", "sinks_softcap"])
def test_three_d_inputs(dtype, extras):
    rng = np.random.default_rng(18)
    q, k, v = make_inputs(rng, None, 33, 17, 4, 2, 64, 64, dtype, squeeze=True)
    kw = dict(is_causal=True)
    sinks = None
    if extras == "sinks_softcap":
        sinks = jnp.asarray(rng.normal(size=4), jnp.float32)
        kw.update(logits_soft_cap=20.0, sinks=sinks)
    out, lse = ATT(q, k, v, return_lse=True, **kw)
    assert out.shape == (33, 4, 64) and lse.shape == (33, 4)
    out4, lse4 = ATT(q[None], k[None], v[None], return_lse=True, **kw)
    np.testing.assert_array_equal(np.asarray(out4[0]), np.asarray(out))
    np.testing.assert_array_equal(np.asarray(lse4[0]), np.asarray(lse))
    ref, ref_lse = np_attention(rounded(q, dtype)[None], rounded(k, dtype)[None],
                                rounded(v, dtype)[None], causal=True,
                                softcap=kw.get("logits_soft_cap"),
                                sinks=None if sinks is None else np.asarray(sinks))
    assert rel_err(out.astype(jnp.float32), ref[0]) < OUT_TOL[dtype]


# ----------------------------------------------------------------------------
# bias / mask pass through to jax.nn; implementation='xla'
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bias_passes_through_to_jax_nn(dtype):
    rng = np.random.default_rng(21)
    q, k, v = make_inputs(rng, 2, 17, 33, 4, 2, 64, 64, dtype)
    bias = jnp.asarray(rng.standard_normal((2, 4, 17, 33)) * 2, DTYPES[dtype])
    out = ATT(q, k, v, bias, is_causal=True)
    want = jax.nn.dot_product_attention(q, k, v, bias, is_causal=True)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)),
                               np.asarray(want.astype(jnp.float32)), rtol=1e-6, atol=1e-6)
    ref, _ = np_attention(rounded(q, dtype), rounded(k, dtype), rounded(v, dtype),
                          causal=True, bias=rounded(bias, dtype))
    assert rel_err(out.astype(jnp.float32), ref) < OUT_TOL[dtype]
    # The bias matters.
    assert rel_err(out.astype(jnp.float32), ATT(q, k, v, is_causal=True)
                   .astype(jnp.float32)) > 0.05


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_mask_passes_through_to_jax_nn(dtype):
    rng = np.random.default_rng(22)
    q, k, v = make_inputs(rng, 2, 17, 33, 4, 2, 64, 64, dtype)
    mask = rng.random((2, 1, 17, 33)) < 0.6
    mask[..., 0] = True  # every row sees a key
    mask = jnp.asarray(mask)
    out = ATT(q, k, v, mask=mask)
    want = jax.nn.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)),
                               np.asarray(want.astype(jnp.float32)), rtol=1e-6, atol=1e-6)
    ref, _ = np_attention(rounded(q, dtype), rounded(k, dtype), rounded(v, dtype),
                          mask=np.asarray(mask))
    assert rel_err(out.astype(jnp.float32), ref) < OUT_TOL[dtype]


def test_bias_and_mask_with_softcap_and_sinks_use_the_reference():
    """jax.nn has no softcap/sinks: bias (added after the cap) and mask then go to
    jax_fa4's reference attention."""
    rng = np.random.default_rng(23)
    q, k, v = make_inputs(rng, 2, 17, 17, 4, 2, 64, 64, "float32", q_scale=4.0)
    bias = jnp.asarray(rng.standard_normal((1, 4, 17, 17)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 4, 17, 17)) < 0.7)
    sinks = jnp.asarray(rng.normal(size=4), jnp.float32)
    out = ATT(q, k, v, bias, mask, logits_soft_cap=10.0, sinks=sinks)
    ref, _ = np_attention(q, k, v, bias=bias, mask=np.asarray(mask), softcap=10.0,
                          sinks=np.asarray(sinks))
    assert rel_err(out, ref) < 1e-5


def test_bias_and_mask_with_three_d_inputs():
    rng = np.random.default_rng(24)
    q, k, v = make_inputs(rng, None, 17, 33, 4, 2, 64, 64, "float32", squeeze=True)
    bias = jnp.asarray(rng.standard_normal((4, 17, 33)), jnp.float32)
    mask = rng.random((4, 17, 33)) < 0.6
    mask[..., 0] = True
    out = ATT(q, k, v, bias, jnp.asarray(mask))
    ref, _ = np_attention(q[None], k[None], v[None], bias=bias[None], mask=mask[None])
    assert out.shape == (17, 4, 64)
    assert rel_err(out, ref[0]) < 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("extras", [{}, {"logits_soft_cap": 20.0}, {"sinks": True}])
def test_implementation_xla(dtype, extras):
    rng = np.random.default_rng(25)
    q, k, v = make_inputs(rng, 2, 33, 33, 4, 1, 64, 64, dtype, q_scale=3.0)
    kw = dict(extras)
    if kw.pop("sinks", False):
        kw["sinks"] = jnp.asarray(rng.normal(size=4), jnp.float32)
    out = jax.jit(functools.partial(jax_fa4.attention, implementation="xla",
                                    local_window_size=(5, 0), **kw))(q, k, v)
    ref, _ = np_attention(rounded(q, dtype), rounded(k, dtype), rounded(v, dtype),
                          window=(5, 0), softcap=kw.get("logits_soft_cap"),
                          sinks=None if "sinks" not in kw else np.asarray(kw["sinks"]))
    assert rel_err(out.astype(jnp.float32), ref) < OUT_TOL[dtype]
    default = ATT(q, k, v, local_window_size=(5, 0), **kw)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)),
                               np.asarray(default.astype(jnp.float32)), rtol=2e-2, atol=2e-2)


def test_eager_and_jit_agree():
    rng = np.random.default_rng(26)
    q, k, v = make_inputs(rng, 1, 33, 33, 4, 2, 64, 64, "bfloat16")
    sinks = jnp.asarray(rng.normal(size=4), jnp.float32)
    f = functools.partial(jax_fa4.attention, is_causal=True, sinks=sinks, return_lse=True)
    eager = f(q, k, v)
    jitted = jax.jit(f)(q, k, v)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(np.asarray(a.astype(jnp.float32)),
                                   np.asarray(b.astype(jnp.float32)), rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------

def jnp_attention(q, k, v, sinks=None, *, scale=None, causal=False, window=None, softcap=None):
    """float32 jnp attention (tests/reference.py) for gradient references.
    Returns (out (B,T,N,Hv), lse (B,T,N))."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    sinks = None if sinks is None else sinks.astype(jnp.float32)
    return attention_jnp(q, k, v, sinks, scale=scale, window=window_of(causal, window, literal=True),
                         softcap=softcap)


GRAD_CASES = [
    # dtype, b, t, s, n, kh, h, causal, window, softcap, sinks, use_lse
    ("bfloat16", 2, 33, 33, 4, 2, 64, True, None, 20.0, True, True),
    ("float16", 1, 17, 33, 4, 1, 64, False, (5, 0), 20.0, False, False),
    ("bfloat16", 3, 17, 33, 4, 1, 64, False, (5, 0), None, False, False),
    ("bfloat16", 1, 33, 33, 2, 2, 128, False, 7, None, True, False),
    ("float32", 2, 33, 17, 4, 1, 64, True, None, None, False, False),  # jax.nn path
    ("float32", 1, 17, 17, 4, 2, 96, False, (3, 2), 20.0, True, True),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_grad_matches_float32_jnp(case):
    dtype, b, t, s, n, kh, h, causal, window, softcap, use_sinks, use_lse = case
    rng = np.random.default_rng(31)
    q, k, v = make_inputs(rng, b, t, s, n, kh, h, h, dtype, q_scale=3.0 if softcap else 1.0)
    sinks = jnp.asarray(rng.normal(0.5, 1.0, n), jnp.float32) if use_sinks else None
    w_out = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal((b, t, n)), jnp.float32)
    opts = dict(is_causal=causal, local_window_size=window, logits_soft_cap=softcap)

    def loss(q, k, v, sinks):
        o, lse = jax_fa4.attention(q, k, v, sinks=sinks, return_lse=True, **opts)
        val = jnp.sum(o.astype(jnp.float32) * w_out)
        return val + (jnp.sum(lse * w_lse) if use_lse else 0.0)

    def ref_loss(q, k, v, sinks):
        o, lse = jnp_attention(q, k, v, sinks, causal=causal, window=window, softcap=softcap)
        val = jnp.sum(o * w_out)
        return val + (jnp.sum(lse * w_lse) if use_lse else 0.0)

    argnums = (0, 1, 2, 3) if use_sinks else (0, 1, 2)
    grads = jax.jit(jax.grad(loss, argnums=argnums))(q, k, v, sinks)
    up = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    ref = jax.jit(jax.grad(ref_loss, argnums=argnums))(up(q), up(k), up(v), sinks)
    for name, g, r, x in zip("q k v sinks".split(), grads, ref, (q, k, v, sinks)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        g = np.asarray(jnp.asarray(g, jnp.float32))
        assert np.isfinite(g).all(), name
        assert np.linalg.norm(np.asarray(r)) > 0, name
        assert rel_err(g, r) <= 2e-2, name


def test_grad_matches_float64_finite_differences():
    """Directional derivatives of jax.grad (float32 inputs; reference path: window,
    softcap, sinks, GQA) vs central differences of the float64 NumPy reference."""
    rng = np.random.default_rng(32)
    b, t, s, n, kh, h = 1, 9, 12, 4, 2, 16
    q, k, v = make_inputs(rng, b, t, s, n, kh, h, h, "float32", q_scale=3.0)
    sinks = jnp.asarray(rng.normal(size=n), jnp.float32)
    w_out = rng.standard_normal((b, t, n, h))
    w_lse = rng.standard_normal((b, t, n))
    opts = dict(causal=True, window=(4, 0), softcap=5.0)

    def loss(q, k, v, sinks):
        o, lse = jax_fa4.attention(q, k, v, sinks=sinks, is_causal=True, local_window_size=(4, 0),
                                   logits_soft_cap=5.0, return_lse=True)
        return jnp.sum(o * w_out) + jnp.sum(lse * w_lse)

    def np_loss(q, k, v, sinks):
        o, lse = np_attention(q, k, v, sinks=sinks, **opts)
        return float(np.sum(o * w_out) + np.sum(lse * w_lse))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, sinks)
    x64 = [np.asarray(x, np.float64) for x in (q, k, v, sinks)]
    for i, name in enumerate("q k v sinks".split()):
        got, want = [], []
        for _ in range(4):
            d = rng.standard_normal(x64[i].shape)
            eps = 1e-5
            plus = list(x64)
            minus = list(x64)
            plus[i] = x64[i] + eps * d
            minus[i] = x64[i] - eps * d
            want.append((np_loss(*plus) - np_loss(*minus)) / (2 * eps))
            got.append(float(np.sum(np.asarray(grads[i], np.float64) * d)))
        assert rel_err(got, want) <= 2e-2, name


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_grad_three_d(dtype):
    rng = np.random.default_rng(33)
    q, k, v = make_inputs(rng, None, 17, 17, 2, 1, 64, 64, dtype, squeeze=True)
    f = lambda q, k, v: jnp.sum(jax_fa4.attention(q, k, v, is_causal=True)  # noqa: E731
                                .astype(jnp.float32) ** 2)
    g = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
    up = lambda x: x.astype(jnp.float32)[None]  # noqa: E731
    fr = lambda q, k, v: jnp.sum(jnp_attention(q, k, v, causal=True)[0] ** 2)  # noqa: E731
    r = jax.jit(jax.grad(fr, argnums=(0, 1, 2)))(up(q), up(k), up(v))
    for a, b_, x in zip(g, r, (q, k, v)):
        assert a.shape == x.shape and a.dtype == x.dtype
        assert rel_err(a.astype(jnp.float32), b_[0]) <= 2e-2




@pytest.mark.parametrize("dtype,kw", [
    ("bfloat16", {}),  # FA4 primitive path: custom_vjp through the reference
    ("float32", {"logits_soft_cap": 50.0}),  # reference path
    ("float32", {}),  # fallback without the primitive: jax_fa4's own attention
], ids=["bf16-fa4path", "fp32-softcap", "fp32-fallback"])
def test_grad_through_lse(dtype, kw):
    rng = np.random.default_rng(34)
    q, k, v = make_inputs(rng, 1, 17, 17, 2, 1, 64, 64, dtype)
    w = jnp.asarray(rng.standard_normal((1, 17, 2)), jnp.float32)

    def loss(q, k, v):
        _, lse = jax_fa4.attention(q, k, v, return_lse=True, **kw)
        return jnp.sum(lse * w)

    def ref_loss(q, k, v):
        return jnp.sum(jnp_attention(q, k, v, softcap=kw.get("logits_soft_cap"))[1] * w)

    g = jax.jit(jax.grad(loss, argnums=(0, 1)))(q, k, v)
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    r = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(up(q), up(k), up(v))
    for a, b_ in zip(g, r):
        assert rel_err(a.astype(jnp.float32), b_) <= 2e-2


# ----------------------------------------------------------------------------
# vmap
# ----------------------------------------------------------------------------

def _loop(f, in_axes, args):
    size = next(a.shape[ax] for a, ax in zip(args, in_axes) if ax is not None)
    outs = []
    for i in range(size):
        outs.append(f(*[a if ax is None else jnp.take(a, i, axis=ax)
                        for a, ax in zip(args, in_axes)]))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


VMAP_CASES = [
    # dtype, in_axes (q, k, v, sinks), use_sinks, causal
    ("bfloat16", (0, 0, 0, None), False, True),
    ("bfloat16", (0, 0, 0, None), True, False),
    ("bfloat16", (None, None, None, 0), True, True),  # only sinks mapped
    ("bfloat16", (1, None, None, 0), True, False),  # q at axis 1 and sinks
    ("float16", (0, 0, 0, 0), True, True),
    ("float32", (0, None, None, None), False, True),
    ("float32", (0, 0, 0, 0), True, False),
]


@pytest.mark.parametrize("case", VMAP_CASES, ids=lambda c: "-".join(map(str, c)))
def test_vmap_matches_loop(case):
    dtype, in_axes, use_sinks, causal = case
    rng = np.random.default_rng(41)
    V, b, t, s, n, kh, h = 3, 2, 17, 33, 4, 2, 64
    q, k, v = make_inputs(rng, b, t, s, n, kh, h, h, dtype)

    def add_axis(x, ax):
        if ax is None:
            return x
        xs = jnp.stack([x * (1.0 + 0.25 * i) for i in range(V)])
        return jnp.moveaxis(xs, 0, ax)

    q, k, v = (add_axis(x, ax) for x, ax in zip((q, k, v), in_axes[:3]))
    if use_sinks:
        base = rng.normal(size=n)
        sinks = jnp.asarray(base if in_axes[3] is None
                            else np.stack([base + i for i in range(V)]), jnp.float32)
        axes = in_axes
    else:
        sinks = None
        axes = in_axes[:3] + (None,)

    def f(q, k, v, sinks):
        return jax_fa4.attention(q, k, v, sinks=sinks, is_causal=causal, return_lse=True)

    got = jax.jit(jax.vmap(f, in_axes=axes))(q, k, v, sinks)
    want = _loop(jax.jit(f), axes, (q, k, v, sinks))
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        tol = 1e-6 if dtype == "float32" else 5e-3
        assert rel_err(g.astype(jnp.float32), w.astype(jnp.float32)) <= tol


def test_nested_vmap_over_sinks_and_batch():
    rng = np.random.default_rng(42)
    q, k, v = make_inputs(rng, 2, 17, 17, 4, 2, 64, 64, "bfloat16")
    sinks = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    qs = jnp.stack([q, q * 0.5])

    def f(q, s):
        return jax_fa4.attention(q, k, v, sinks=s)

    got = jax.jit(jax.vmap(jax.vmap(f, in_axes=(None, 0)), in_axes=(0, None)))(qs, sinks)
    assert got.shape == (2, 3) + q.shape
    f = jax.jit(f)
    for i in range(2):
        for j in range(3):
            want = f(qs[i], sinks[j])
            assert rel_err(got[i, j].astype(jnp.float32), want.astype(jnp.float32)) <= 5e-3
