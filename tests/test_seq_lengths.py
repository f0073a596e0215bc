"""jax.nn's query_seq_lengths / key_value_seq_lengths in `jax_fa4.attention` on CPU:
results equal jax.nn's (rows that see no key: zeros), how each mode reaches the kernel
(cross-lowered for CUDA), vmap, gradients, bad lengths, traced scale.  The GPU runs
of the same modes: tests/test_gpu_lengths.py."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa4
from jax_fa4.api import kernel_plan
from jax_fa4.ffi_target import TARGET
from test_lowering import compiles  # noqa: F401  (markers for kernel-compiling tests)

B, T, S, N, K, H = 3, 48, 48, 4, 2, 32
F32 = jnp.float32


def _qkv(dtype=F32, t=T, s=S, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (B, t, N, H), dtype),
            jax.random.normal(ks[1], (B, s, K, H), dtype),
            jax.random.normal(ks[2], (B, s, K, H), dtype))


def _nn(q, k, v, **kw):
    """jax.nn with K/V repeated to N heads, rows that see no key zeroed (our rule)."""
    g = q.shape[2] // k.shape[2]
    o = jax.nn.dot_product_attention(q, jnp.repeat(k, g, 2), jnp.repeat(v, g, 2), **kw)
    lq = kw.get("query_seq_lengths")
    lk = kw.get("key_value_seq_lengths")
    t, s = q.shape[1], k.shape[1]
    vis = jnp.ones((B, t, s), bool)
    if kw.get("is_causal"):
        vis &= jnp.tril(jnp.ones((t, s), bool))[None]
    if lq is not None:
        vis &= (jnp.arange(t)[None, :, None] < lq[:, None, None])
    if lk is not None:
        vis &= (jnp.arange(s)[None, None, :] < lk[:, None, None])
    return jnp.where(vis.any(-1)[:, :, None, None], o, 0)


LENGTHS = [
    (None, [48, 0, 17]),
    ([48, 1, 30], [48, 1, 30]),
    ([20, 48, 0], None),
    ([48, 30, 5], [10, 48, 48]),  # more query than key rows in sequence 0
    ([-3, 100, 7], [100, -1, 9]),  # outside [0, T]: jax.nn's meaning (clamped)
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens", LENGTHS, ids=str)
def test_matches_jax_nn(lens, causal):
    q, k, v = _qkv()
    lq, lk = (None if x is None else jnp.asarray(x, jnp.int32) for x in lens)
    kw = dict(is_causal=causal, query_seq_lengths=lq, key_value_seq_lengths=lk)
    got = jax.jit(functools.partial(jax_fa4.attention, **kw))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_nn(q, k, v, **kw)), atol=2e-5)
    gq = jax.grad(lambda q: jnp.sum(jax_fa4.attention(q, k, v, **kw) ** 2))(q)
    gq_nn = jax.grad(lambda q: jnp.sum(_nn(q, k, v, **kw) ** 2))(q)
    np.testing.assert_allclose(np.asarray(gq), np.asarray(gq_nn), atol=1e-4)


def test_vmap_over_lengths():
    q, k, v = _qkv()
    lq, lk = jnp.asarray([5, 48, 20], jnp.int32), jnp.asarray([48, 3, 20], jnp.int32)
    f = lambda q, k, v, a, b: jax_fa4.attention(  # noqa: E731
        q, k, v, query_seq_lengths=a, key_value_seq_lengths=b)
    mapped = jax.vmap(f)(q[:, None], k[:, None], v[:, None], lq[:, None], lk[:, None])
    np.testing.assert_allclose(np.asarray(mapped[:, 0]), np.asarray(f(q, k, v, lq, lk)),
                               atol=1e-6)


def test_vmap_over_sinks_and_lengths():
    """Sinks and key lengths mapped together (one call per map entry since 2026-12-08;
    a NotImplementedError before), against each entry alone."""
    q, k, v = _qkv(jnp.bfloat16)
    lk = jnp.asarray([[48, 3, 20], [7, 48, 0]], jnp.int32)
    sinks = jnp.asarray([[0.5, -1.0, 2.0, 0.0], [1.0, 0.0, -2.0, 3.0]], jnp.float32)
    f = lambda s, b: jax_fa4.attention(q, k, v, sinks=s, key_value_seq_lengths=b,  # noqa: E731
                                       return_lse=True)
    mapped = jax.jit(jax.vmap(f))(sinks, lk)
    for i in range(2):
        o, lse = jax.jit(f)(sinks[i], lk[i])
        # bf16 outputs: the mapped program may round an element differently (1 ulp)
        np.testing.assert_allclose(np.asarray(mapped[0][i], np.float32),
                                   np.asarray(o, np.float32), rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(np.asarray(mapped[1][i]), np.asarray(lse), rtol=1e-5)


def test_bad_lengths_are_rejected():
    q, k, v = _qkv()
    for bad, word in ((jnp.ones((B,), jnp.int64 if jax.config.x64_enabled else jnp.float32),
                       "int32"), (jnp.ones((B + 1,), jnp.int32), "shape"),
                      (jnp.ones((B, 1), jnp.int32), "shape")):
        with pytest.raises(ValueError, match="query_seq_lengths"):
            jax_fa4.attention(q, k, v, query_seq_lengths=bad)
        with pytest.raises(ValueError, match="key_value_seq_lengths"):
            jax_fa4.attention(q, k, v, key_value_seq_lengths=bad)


def test_routes_and_reasons():
    q, k, v = _qkv(jnp.bfloat16)
    lens = jnp.full((B,), 10, jnp.int32)
    ok = dict(platform="cuda")
    assert jax_fa4.explain(q, k, v, key_value_seq_lengths=lens, **ok) is None
    assert jax_fa4.explain(q, k, v, is_causal=True, key_value_seq_lengths=lens,
                           query_seq_lengths=lens, **ok) is None
    why = jax_fa4.explain(q, k, v, local_window_size=(4, 4), key_value_seq_lengths=lens, **ok)
    assert "key_value_seq_lengths" in why
    plan = kernel_plan(q, k, v, query_seq_lengths=lens, key_value_seq_lengths=lens)
    assert plan.variant.has_seqused_q and plan.variant.has_seqused_k
    plan = kernel_plan(q, k, v, is_causal=True, key_value_seq_lengths=lens)
    assert plan.lengths_check and not plan.variant.has_seqused_k
    assert "backward" in jax_fa4.explain(q, k, v, key_value_seq_lengths=lens, backward=True,
                                         **ok)


def test_traced_scale_matches_jax_nn():
    q, k, v = _qkv()
    f = jax.jit(lambda q, k, v, s: jax_fa4.attention(q, k, v, scale=s, is_causal=True))
    g = jax.jit(lambda q, k, v, s: _nn(q, k, v, scale=s, is_causal=True))
    np.testing.assert_allclose(np.asarray(f(q, k, v, 0.3)), np.asarray(g(q, k, v, 0.3)),
                               atol=2e-5)
    why = jax.jit(lambda s: jnp.zeros(()) if jax_fa4.explain(
        q, k, v, scale=s, platform="cuda") is None else jnp.ones(())).trace(0.3)
    assert why is not None  # explain accepts a traced scale
    with pytest.raises(ValueError, match="scale"):
        jax.jit(lambda s: jax_fa4.attention(q, k, v, scale=s))(jnp.ones(2))


@compiles
@pytest.mark.parametrize("mode", ["kv", "qkv", "q_causal", "eq_causal"])
def test_cross_lowered_for_cuda(mode):
    """Each way lengths reach the kernel lowers to jax_fa4's custom call (the causal
    check keeps a pure-JAX branch beside it)."""
    q, k, v = (jax.ShapeDtypeStruct(x.shape, jnp.bfloat16) for x in _qkv())
    i32 = jax.ShapeDtypeStruct((B,), jnp.int32)
    kw = {"kv": dict(key_value_seq_lengths=i32),
          "qkv": dict(query_seq_lengths=i32, key_value_seq_lengths=i32),
          "q_causal": dict(query_seq_lengths=i32, is_causal=True),
          "eq_causal": dict(query_seq_lengths=i32, key_value_seq_lengths=i32,
                            is_causal=True)}[mode]
    names = [n for n in kw if n.endswith("lengths")]
    f = lambda q, k, v, *ls: jax_fa4.attention(  # noqa: E731
        q, k, v, **dict(zip(names, ls)), is_causal=kw.get("is_causal", False))
    text = jax.jit(f).trace(q, k, v, *[i32] * len(names)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert f"@{TARGET}" in text
    assert ("stablehlo.case" in text) == (mode == "eq_causal")
