"""JAX's own `dot_product_attention` tests, run against `jax_fa4.attention`.

Rewritten from JAX's tests/nn_test.py (testDotProductAttention: dtype x GQA group x
vmap x implementation; testDotProductAttentionMask: the mask modes with their
gradients; testDotProductAttentionBiasGradient) and the batching/padding cases of
tests/fused_attention_stablehlo_test.py (test_sdpa_var_seq, test_sdpa_dbias under
vmap, test_sdpa_sliding_window_length, test_sdpa_large_head_size), with their shapes,
reference (`jax.nn.dot_product_attention(implementation=None)`, i.e. XLA) and
tolerances.  Where the assertion differs from JAX's it says so; docs/DESIGN.md
("Drop-in for jax.nn") lists and argues each deviation.

They run on CPU (every call takes jax_fa4's pure-JAX or jax.nn path) and, on an SM90
GPU, on the FA4 path: wherever `explain` says the kernel takes the call, the test
asserts the jitted function's HLO holds jax_fa4's custom call.  The kernel calls are
listed for precompiling in tests/gpu_cases_parity.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa4
from jax_fa4.ffi_target import TARGET
from test_gpu_forward import _has_sm90


SM90 = _has_sm90()
ON_CPU = jax.default_backend() == "cpu"


def _close(ref, ans, atol, rtol):
    np.testing.assert_allclose(np.asarray(ans, np.float32), np.asarray(ref, np.float32),
                               atol=atol, rtol=rtol)


def _assert_path(fn, args, kwargs_for_explain):
    """On an SM90 GPU: where explain() says the kernel runs the call, the lowered
    program holds jax_fa4's custom call (the FA4 path is asserted, not assumed)."""
    if not SM90:
        return
    if jax_fa4.explain(*kwargs_for_explain["args"], **kwargs_for_explain["kw"]) is None:
        text = jax.jit(fn).lower(*args).as_text()
        assert TARGET in text, "explain() says FA4, but the program has no jax_fa4 call"


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, dtype)


# ------------------------------------------------------------------ nn_test.py

@pytest.mark.parametrize("impl", [None, "cudnn", "xla"])
@pytest.mark.parametrize("use_vmap", [False, True])
@pytest.mark.parametrize("group_num", [1, 2, 4])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dot_product_attention(dtype, group_num, use_vmap, impl):
    if impl == "cudnn" and ON_CPU:
        pytest.skip("implementation='cudnn' needs a CUDA GPU (as in JAX's test)")
    if dtype == jnp.float16 and ON_CPU and impl == "xla":
        pytest.skip("jax.nn's XLA path does not lower float16 dots on CPU")
    B, S, T, N, H, G = 2, 128, 128, 4, 32, group_num
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    Q = _normal(keys[0], (B, T, N, H), dtype)
    K = _normal(keys[1], (B, S, N // G, H), dtype)
    V = _normal(keys[2], (B, S, N // G, H), dtype)
    grad = _normal(keys[3], (B, T, N, H), dtype)
    bias, mask = None, None

    sdpa_ref = functools.partial(jax.nn.dot_product_attention, implementation=None)
    sdpa_ans = functools.partial(jax_fa4.attention, implementation=impl)
    if use_vmap:
        sdpa_ans = jax.vmap(sdpa_ans, in_axes=(0, 0, 0, None, None), out_axes=0)
    K_ref, V_ref = jnp.repeat(K, G, axis=2), jnp.repeat(V, G, axis=2)
    if dtype == jnp.float16 and ON_CPU:  # the reference in float32 (CPU float16 dots)
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        out_ref, vjp_ref = jax.vjp(lambda *a: sdpa_ref(*a).astype(dtype),
                                   f32(Q), f32(K_ref), f32(V_ref), bias, mask)
    else:
        out_ref, vjp_ref = jax.vjp(sdpa_ref, Q, K_ref, V_ref, bias, mask)
    out_ans, vjp_ans = jax.vjp(sdpa_ans, Q, K, V, bias, mask)
    dQ_ref, dK_ref, dV_ref = vjp_ref(grad)[:3]
    dQ_ans, dK_ans, dV_ans = vjp_ans(grad)[:3]
    dK_ref = dK_ref.reshape(B, S, N // G, G, H).sum(axis=3)
    dV_ref = dV_ref.reshape(B, S, N // G, G, H).sum(axis=3)
    if impl is None:
        _assert_path(lambda q, k, v: sdpa_ans(q, k, v, None, None), (Q, K, V),
                     dict(args=(Q, K, V), kw={}))
    _close(out_ref, out_ans, .01, .01)
    _close(dQ_ref, dQ_ans, .01, .01)
    _close(dK_ref, dK_ans, .01, .01)
    _close(dV_ref, dV_ans, .01, .01)


MASK_MODES = ["bias", "causal", "padding", "custom", ("causal", "padding"),
              ("custom", "padding"), ("bias", "causal"), ("causal", "sliding_window"),
              # ours: equal query and key lengths, the padded self-attention that
              # takes the kernel with causal masking (JAX's lengths differ per side)
              ("causal", "padding_equal")]


@pytest.mark.parametrize("mask_mode", MASK_MODES, ids=str)
def test_dot_product_attention_mask(mask_mode):
    if isinstance(mask_mode, str):
        mask_mode = (mask_mode,)
    dtype = jnp.bfloat16
    B, S, T, N, H = 2, 128, 128, 4, 32
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    Q = _normal(keys[0], (B, T, N, H), dtype)
    K = _normal(keys[1], (B, S, N, H), dtype)
    V = _normal(keys[2], (B, S, N, H), dtype)
    grad = _normal(keys[3], (B, T, N, H), dtype)
    bias = mask = q_seqlen = kv_seqlen = window = None
    is_causal = "causal" in mask_mode
    if "padding" in mask_mode:
        q_seqlen = jnp.array([T // 2, T // 4], dtype=jnp.int32)
        kv_seqlen = jnp.array([S // 4, S // 2], dtype=jnp.int32)
    if "padding_equal" in mask_mode:
        q_seqlen = kv_seqlen = jnp.array([T // 2, 3 * T // 4], dtype=jnp.int32)
    if "custom" in mask_mode:
        mask = jnp.tril(jnp.ones((T, S), dtype=jnp.bool_))[None, None]
    if "bias" in mask_mode:
        bias = _normal(keys[4], (1, N, T, S), dtype)
    if "sliding_window" in mask_mode:
        window = (3, 2) if is_causal else (3, 0)

    def run(fn):
        f = lambda q, k, v, b, m, qs, kvs: fn(  # noqa: E731
            q, k, v, b, m, is_causal=is_causal, query_seq_lengths=qs,
            key_value_seq_lengths=kvs, local_window_size=window)
        out, vjp = jax.vjp(f, Q, K, V, bias, mask, q_seqlen, kv_seqlen)
        return out, vjp(grad)[:4], f

    out_ref, (dQ_ref, dK_ref, dV_ref, dbias_ref), _ = run(
        functools.partial(jax.nn.dot_product_attention, implementation=None))
    out_ans, (dQ_ans, dK_ans, dV_ans, dbias_ans), f = run(jax_fa4.attention)
    _assert_path(lambda q, k, v, qs, kvs: f(q, k, v, bias, mask, qs, kvs),
                 (Q, K, V, q_seqlen, kv_seqlen),
                 dict(args=(Q, K, V, bias, mask),
                      kw=dict(is_causal=is_causal, query_seq_lengths=q_seqlen,
                              key_value_seq_lengths=kv_seqlen, local_window_size=window)))
    _close(out_ref, out_ans, .01, .01)
    _close(dQ_ref, dQ_ans, .02, .02)
    _close(dK_ref, dK_ans, .02, .02)
    _close(dV_ref, dV_ans, .01, .01)
    if bias is not None:
        _close(dbias_ref, dbias_ans, .02, .02)


@pytest.mark.parametrize("use_vmap", [False, True])
@pytest.mark.parametrize("batch_size", [1, 16])
def test_dot_product_attention_bias_gradient(batch_size, use_vmap):
    # JAX's test expects cuDNN to refuse the bias gradient at batch > 1; jax_fa4 takes
    # a bias through its pure-JAX path, which differentiates it at any batch: the
    # gradient is compared with jax.nn's at every batch size (a deviation for the
    # better, docs/DESIGN.md).
    dtype = jnp.bfloat16
    B, S, N, H = batch_size, 128, 4, 32
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    x = _normal(keys[0], (B, S, N, H), dtype)
    bias = _normal(keys[1], (B, N, S, S), dtype)
    mask = jnp.ones((1, 1, S), dtype=jnp.bool_)

    def attention(fn, x, bias, mask):
        return fn(query=x, key=x, value=x, bias=bias, mask=mask, is_causal=False)

    attn_ref = functools.partial(attention, jax.nn.dot_product_attention)
    attn_ans = functools.partial(attention, jax_fa4.attention)
    if use_vmap:
        attn_ref = jax.vmap(attn_ref, in_axes=(0, 0, None))
        attn_ans = jax.vmap(attn_ans, in_axes=(0, 0, None))
    _close(jax.jit(attn_ref)(x, bias, mask), jax.jit(attn_ans)(x, bias, mask), .01, .01)

    def bwd(fn):
        return jax.jit(lambda x, b, m: jax.vjp(fn, x, b, m)[1](x))(x, bias, mask)

    _, dbias_ref, _ = bwd(attn_ref)
    _, dbias_ans, _ = bwd(attn_ans)
    _close(dbias_ref, dbias_ans, 0.1, 0.1)


def test_dot_product_attention_float64():
    """float64 inputs (x64 enabled) give jax.nn's float64 result."""
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        q, k, v = (jax.random.normal(kk, (2, 64, 4, 16), jnp.float64) for kk in keys)
        for kw in ({}, {"is_causal": True}, {"local_window_size": (5, 3)}):
            ref = jax.nn.dot_product_attention(q, k, v, **kw)
            ans = jax_fa4.attention(q, k, v, **kw)
            assert ans.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(ans), np.asarray(ref), atol=1e-12, rtol=1e-12)


# ----------------------------------------------------- fused_attention_stablehlo_test.py

def _train(fn, q, k, v, grad, **kw):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
    return out, vjp(grad)


def _qkvg(shape, dtype=jnp.bfloat16, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    return tuple(_normal(kk, shape, dtype) for kk in keys)


def test_sdpa_var_seq():
    """Padded batch: every sequence holds its first half (cuDNN's PADDING mask)."""
    q, k, v, g = _qkvg((4, 1024, 4, 64))
    lens = jnp.full((4,), 512, jnp.int32)
    kw = dict(scale=1.0, query_seq_lengths=lens, key_value_seq_lengths=lens)
    out_ref, grads_ref = jax.jit(functools.partial(_train, jax.nn.dot_product_attention, **kw))(
        q, k, v, g)
    out, grads = jax.jit(functools.partial(_train, jax_fa4.attention, **kw))(q, k, v, g)
    _assert_path(lambda q, k, v: jax_fa4.attention(q, k, v, **kw), (q, k, v),
                 dict(args=(q, k, v), kw=dict(query_seq_lengths=lens, key_value_seq_lengths=lens)))
    _close(out_ref, out, 2e-2, 2e-2)
    for a, b in zip(grads_ref, grads):
        _close(a, b, 2e-1, 2e-1)


@pytest.mark.parametrize("batch_size", [1, 16])
def test_sdpa_dbias_vmap(batch_size):
    """The bias gradient under vmap (one mapped axis of size 1 added to x and bias)
    equals the unmapped one.  JAX's test also checks cuDNN's all-zero dbias at batch
    > 1; jax_fa4 computes it (docs/DESIGN.md)."""
    x_shape, bias_shape = (batch_size, 512, 16, 48), (batch_size, 16, 512, 512)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    x = _normal(keys[0], x_shape, jnp.bfloat16)
    bias = _normal(keys[1], bias_shape, jnp.bfloat16)
    mask = jnp.ones((1, 1, 512), dtype=jnp.bool_)
    attn = lambda x, b, m: jax_fa4.attention(x, x, x, b, m)  # noqa: E731
    vjp = lambda fn: jax.jit(lambda x, b, m: jax.vjp(fn, x, b, m)[1](x))  # noqa: E731
    _, dbias_ref, _ = vjp(attn)(x, bias, mask)
    _, dbias_ans, _ = vjp(jax.vmap(attn, in_axes=(0, 0, None)))(
        x[:, None], bias[:, None], mask)
    _close(dbias_ref, dbias_ans[:, 0], 2e-2, 2e-2)  # bf16: another reduction order
    _, dbias_nn, _ = vjp(lambda x, b, m: jax.nn.dot_product_attention(x, x, x, b, m))(
        x, bias, mask)
    _close(dbias_nn, dbias_ref, 0.1, 0.1)


def test_sdpa_sliding_window_length():
    """cuDNN's causal sliding_window_length=64 is jax.nn's local_window_size=(63, 0)."""
    q, k, v, g = _qkvg((4, 1024, 4, 64))
    kw = dict(scale=1.0, is_causal=True, local_window_size=(63, 0))
    out_ref, grads_ref = _train(jax.nn.dot_product_attention, q, k, v, g, **kw)
    out, grads = _train(jax_fa4.attention, q, k, v, g, **kw)
    _assert_path(lambda q, k, v: jax_fa4.attention(q, k, v, **kw), (q, k, v),
                 dict(args=(q, k, v), kw=dict(kw)))
    _close(out_ref, out, 2e-2, 2e-2)
    for a, b in zip(grads_ref, grads):
        _close(a, b, 2e-1, 2e-1)


def test_sdpa_large_head_size():
    q, k, v, g = _qkvg((2, 64, 2, 256))
    kw = dict(scale=1.0, is_causal=True)
    out_ref, grads_ref = _train(jax.nn.dot_product_attention, q, k, v, g, **kw)
    out, grads = _train(jax_fa4.attention, q, k, v, g, **kw)
    _assert_path(lambda q, k, v: jax_fa4.attention(q, k, v, **kw), (q, k, v),
                 dict(args=(q, k, v), kw=dict(kw)))
    _close(out_ref, out, 1e-2, 1e-2)  # JAX's default bf16 tolerance
    for a, b in zip(grads_ref, grads):
        _close(a, b, 2e-1, 2e-1)


# ------------------------------------------------------------- the residual contract

@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_return_residual_is_jax_nns(dtype):
    """return_residual: the input dtype and no gradient, so a jax.nn-style vjp with
    cotangents in the input dtype works; return_lse keeps float32 and its gradient."""
    q, k, v, g = _qkvg((2, 64, 4, 64), dtype)
    out, res = jax_fa4.attention(q, k, v, is_causal=True, return_residual=True)
    ref_out, ref_res = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                    return_residual=True)
    assert res.dtype == ref_res.dtype == dtype and res.shape == ref_res.shape
    _close(ref_res, res, 2e-2, 2e-2)
    f = lambda q: jax_fa4.attention(q, k, v, is_causal=True, return_residual=True)  # noqa: E731
    (_, _), vjp = jax.vjp(f, q)
    dq_res_only, = vjp((jnp.zeros_like(out), jnp.ones_like(res)))
    assert not np.any(np.asarray(dq_res_only, np.float32))  # stop_gradient, as jax.nn
    _, lse = jax_fa4.attention(q, k, v, is_causal=True, return_lse=True)
    assert lse.dtype == jnp.float32
    dq_lse = jax.grad(lambda q: jax_fa4.attention(q, k, v, is_causal=True,
                                                  return_lse=True)[1].sum())(q)
    assert np.any(np.asarray(dq_lse, np.float32))
    with pytest.raises(ValueError, match="not both"):
        jax_fa4.attention(q, k, v, return_residual=True, return_lse=True)
