"""jax_fa4's Flax adapter (jax_fa4/flax_adapter.py): flax.nnx.MultiHeadAttention and
flax.linen.MultiHeadDotProductAttention with `attention_fn=jax_fa4.flax_attention` (or
`make_flax_attention(...)`) against the same modules with Flax's own attention.

On CPU both sides run jax.nn's attention, so these check the adapter's plumbing
(layout, batch dims, dtype, causal, GQA, refusals); the `compile` test cross-lowers
for CUDA and finds the FA4 custom call, the `gpu` test runs the kernel.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import has_compiler
from test_gpu_forward import _has_sm90

flax = pytest.importorskip("flax")
from flax import nnx  # noqa: E402
import flax.linen as nn  # noqa: E402

import jax_fa4  # noqa: E402

TARGET = "stablehlo.custom_call @jax_fa4_cute_call"
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
HAS_GQA = "num_kv_heads" in inspect.signature(nnx.MultiHeadAttention.__init__).parameters
NNX_IS_CAUSAL = "is_causal" in inspect.signature(nnx.MultiHeadAttention.__call__).parameters



@pytest.fixture(autouse=True)
def _flax_numerics_on_cpu(request):
    """The comparisons with Flax's own attention are about semantics: they run on the
    CPU on any host (on a GPU, float32 dots take TF32 paths that differ between the two
    programs).  The gpu-marked test runs on the GPU."""
    if request.node.get_closest_marker("gpu"):
        yield
        return
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def _x(shape, dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _close(a, b, dtype):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=TOL[dtype], rtol=TOL[dtype])


def _nnx_mha(attention_fn, features=32, heads=4, dtype=jnp.float32, **kw):
    return nnx.MultiHeadAttention(num_heads=heads, in_features=features, dtype=dtype,
                                  param_dtype=dtype, decode=False, attention_fn=attention_fn,
                                  rngs=nnx.Rngs(0), **kw)


def _nnx_pair(**kw):
    """(module with Flax's attention, same parameters with the adapter), callers."""
    ref = _nnx_mha(nnx.dot_product_attention, **kw)
    ours = _nnx_mha(jax_fa4.flax_attention, **kw)
    nnx.update(ours, nnx.state(ref, nnx.Param))
    return ref, ours


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nnx_matches_flax(dtype):
    ref, ours = _nnx_pair(dtype=dtype)
    x = _x((2, 16, 32), dtype)
    _close(ours(x), ref(x), dtype)
    # causal: the factory (no dense mask) and nnx's is_causal flag vs make_causal_mask
    causal = ref(x, mask=nnx.make_causal_mask(x[..., 0]))
    if NNX_IS_CAUSAL:
        _close(ours(x, is_causal=True), causal, dtype)
    ours.attention_fn = jax_fa4.make_flax_attention(is_causal=True)
    _close(nnx.jit(lambda m, x: m(x))(ours, x), causal, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_linen_matches_flax(dtype):
    x = _x((2, 16, 32), dtype)
    make = lambda fn: nn.MultiHeadDotProductAttention(  # noqa: E731
        num_heads=4, dtype=dtype, param_dtype=dtype, attention_fn=fn)
    ref, ours = make(nn.dot_product_attention), make(jax_fa4.flax_attention)
    params = ref.init(jax.random.key(1), x)
    _close(ours.apply(params, x), ref.apply(params, x), dtype)
    mask = nn.make_causal_mask(x[..., 0])
    causal = make(jax_fa4.make_flax_attention(is_causal=True))
    _close(jax.jit(causal.apply)(params, x), ref.apply(params, x, mask=mask), dtype)
    _close(ours.apply(params, x, mask=mask), ref.apply(params, x, mask=mask), dtype)


def test_linen_param_gradients_causal():
    x = _x((2, 16, 32))
    ref = nn.MultiHeadDotProductAttention(num_heads=4)
    ours = nn.MultiHeadDotProductAttention(
        num_heads=4, attention_fn=jax_fa4.make_flax_attention(is_causal=True))
    params = ref.init(jax.random.key(1), x)
    mask = nn.make_causal_mask(x[..., 0])
    g_ref = jax.grad(lambda p: jnp.sum(ref.apply(p, x, mask=mask) ** 2))(params)
    g_ours = jax.jit(jax.grad(lambda p: jnp.sum(ours.apply(p, x) ** 2)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
                 g_ours, g_ref)


@pytest.mark.skipif(not HAS_GQA, reason="this flax's nnx.MultiHeadAttention has no GQA")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nnx_gqa(dtype):
    ref, ours = _nnx_pair(dtype=dtype, heads=8, features=64, num_kv_heads=2)
    x = _x((2, 16, 64), dtype)
    _close(ours(x), ref(x), dtype)
    ours.attention_fn = jax_fa4.make_flax_attention(is_causal=True)
    _close(ours(x), ref(x, mask=nnx.make_causal_mask(x[..., 0])), dtype)


def test_extra_batch_dims_and_broadcast_mask():
    ref, ours = _nnx_pair()
    x = _x((2, 3, 16, 32))
    _close(ours(x), ref(x), jnp.float32)
    # a padding mask over the first batch dim only, broadcast over the second
    keep = jnp.arange(16) < jnp.array([[11], [16]])                     # (2, 16)
    mask = nnx.make_attention_mask(keep, keep)[:, None]                   # (2, 1, 1, 16, 16)
    full = jnp.broadcast_to(mask, (2, 3, 1, 16, 16))
    # Query rows 11.. of the first sequence see no key: jax_fa4 gives them zeros (one
    # rule on every path, docs/DESIGN.md), Flax the mean of V; the output projection
    # then maps zeros to its bias.  Compare the rows that see keys, check the others.
    seen = keep[:, None, :, None]                                         # (2, 1, 16, 1)
    dead = ours.out(jnp.zeros((1, 4, 8), jnp.float32))[0]  # out-projection of zeros
    for fn, want in ((jax_fa4.flax_attention, full),
                     (jax_fa4.make_flax_attention(is_causal=True),  # mask and causal
                      nnx.combine_masks(full, nnx.make_causal_mask(x[..., 0])))):
        ours.attention_fn = fn
        got, exp = ours(x, mask=mask), ref(x, mask=want)
        _close(jnp.where(seen, got, 0), jnp.where(seen, exp, 0), jnp.float32)
        _close(jnp.where(seen, 0, got), jnp.broadcast_to(jnp.where(seen, 0, dead), got.shape),
               jnp.float32)
    ours.attention_fn = jax_fa4.flax_attention
    causal = nnx.make_causal_mask(jnp.ones(16))                          # (1, 16, 16)
    _close(ours(x, mask=causal), ref(x, mask=jnp.broadcast_to(causal, (2, 3, 1, 16, 16))),
           jnp.float32)


def test_no_batch_dims_and_direct_call():
    q, k, v = _x((16, 4, 8), seed=1), _x((16, 4, 8), seed=2), _x((16, 4, 8), seed=3)
    _close(jax_fa4.flax_attention(q, k, v), nnx.dot_product_attention(q, k, v), jnp.float32)
    causal = jnp.tril(jnp.ones((16, 16), jnp.int32))  # non-bool: nonzero = visible
    _close(jax_fa4.flax_attention(q, k, v, mask=causal),
           nnx.dot_product_attention(q, k, v, mask=causal[None]), jnp.float32)
    # dtype: computed in bfloat16 like Flax's promote_dtype
    out = jax_fa4.flax_attention(q, k, v, dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    _close(out, nnx.dot_product_attention(q, k, v, dtype=jnp.bfloat16), jnp.bfloat16)


def test_dropout_raises():
    x = _x((2, 16, 32))
    m = _nnx_mha(jax_fa4.flax_attention, dropout_rate=0.1)
    with pytest.raises(NotImplementedError, match="dropout_rate=0.0.*deterministic=True"):
        m(x, deterministic=False)
    lin = nn.MultiHeadDotProductAttention(num_heads=4, dropout_rate=0.1,
                                          attention_fn=jax_fa4.flax_attention)
    params = lin.init(jax.random.key(1), x, deterministic=True)
    with pytest.raises(NotImplementedError, match="no attention dropout"):
        lin.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(2)})


def test_deterministic_with_dropout_rng_is_accepted():
    x = _x((2, 16, 32))
    ref, ours = _nnx_pair(dropout_rate=0.1)
    _close(ours(x, deterministic=True), ref(x, deterministic=True), jnp.float32)
    make = lambda fn: nn.MultiHeadDotProductAttention(  # noqa: E731
        num_heads=4, dropout_rate=0.1, attention_fn=fn)
    params = make(nn.dot_product_attention).init(jax.random.key(1), x, deterministic=True)
    rng = jax.random.key(3)
    _close(make(jax_fa4.flax_attention).apply(params, x, deterministic=True, dropout_rng=rng),
           make(nn.dot_product_attention).apply(params, x, deterministic=True), jnp.float32)
    q = _x((2, 16, 4, 8))
    _close(jax_fa4.flax_attention(q, q, q, dropout_rng=rng, dropout_rate=0.0),
           nnx.dot_product_attention(q, q, q), jnp.float32)


def test_sow_weights_raises():
    m = _nnx_mha(jax_fa4.flax_attention)
    with pytest.raises(NotImplementedError, match="sow_weights=False"):
        m(_x((2, 16, 32)), sow_weights=True)


def test_factory_is_hashable_and_compares_by_value():
    a = jax_fa4.make_flax_attention(is_causal=True, local_window_size=(8, 0))
    assert a == jax_fa4.make_flax_attention(is_causal=True, local_window_size=(8, 0))
    assert hash(a) == hash(jax_fa4.make_flax_attention(is_causal=True,
                                                       local_window_size=(8, 0)))
    assert a != jax_fa4.flax_attention


def test_import_does_not_import_flax():
    code = "import sys, jax_fa4; assert 'flax' not in sys.modules, 'flax imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy())


# -------------------------------------------------------------------- FA4 path

B, T, N, H = 2, 128, 4, 64  # the FA4-path tests' call (bf16, causal)


def _causal_nnx(attention_fn):
    """bf16 nnx self-attention (B, T, N heads of H): (module, x)."""
    m = _nnx_mha(attention_fn, features=N * H, heads=N, dtype=jnp.bfloat16)
    return m, _x((B, T, N * H), jnp.bfloat16)


def test_gpu_call_is_precompiled():
    """The GPU test's kernel variant is one the GPU run precompiles (it runs with
    JAX_FA4_COMPILE=never): tests/gpu_cases.py plans the same KernelPlan."""
    from gpu_cases import CALLS
    from jax_fa4.api import kernel_plan

    def plan(q, k, v, **kw):
        return kernel_plan(*(jax.ShapeDtypeStruct(*a) for a in (q, k, v)), **kw)

    qkv = [((B, T, N, H), "bfloat16")] * 3
    plans = [plan(c["query"], c["key"], c["value"], is_causal=True) for c in CALLS
             if c.get("is_causal") and len(c) == 4]
    assert plan(*qkv, is_causal=True) in plans


def _lowered(m, x, platforms):
    graphdef, state = nnx.split(m)
    f = lambda state, x: nnx.merge(graphdef, state)(x)  # noqa: E731
    return jax.jit(f).trace(state, x).lower(lowering_platforms=platforms).as_text()


@pytest.fixture
def _own_kernel_cache(tmp_path_factory, monkeypatch):
    """Compiles into a cache of its own (an externally set JAX_FA4_COMPILE=never, as on
    precompiled GPU runs, does not apply)."""
    monkeypatch.setenv("JAX_FA4_CACHE_DIR", str(tmp_path_factory.mktemp("flax_kernels")))
    monkeypatch.delenv("JAX_FA4_COMPILE", raising=False)


@pytest.mark.compile
@pytest.mark.skipif(not has_compiler(), reason="needs jax_fa4[compile] (flash_attn and cutlass)")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cross_lowering_nnx_causal_factory_uses_fa4(_own_kernel_cache):
    m, x = _causal_nnx(jax_fa4.make_flax_attention(is_causal=True))
    assert TARGET in _lowered(m, x, ("cuda",))
    # a dense causal mask is honoured by falling back: no custom call
    m.attention_fn = jax_fa4.flax_attention
    graphdef, state = nnx.split(m)
    f = lambda state, x: nnx.merge(graphdef, state)(x, mask=nnx.make_causal_mask(x[..., 0]))  # noqa: E731,E501
    text = jax.jit(f).trace(state, x).lower(lowering_platforms=("cuda",)).as_text()
    assert TARGET not in text


@pytest.mark.gpu
@pytest.mark.skipif(not _has_sm90(), reason="needs an SM90 (Hopper) GPU")
def test_gpu_nnx_runs_fa4():
    seen = []

    def spy(query, key, value, **kw):
        seen.append((query, key, value))
        return jax_fa4.make_flax_attention(is_causal=True)(query, key, value, **kw)

    m, x = _causal_nnx(spy)
    out = nnx.jit(lambda m, x: m(x))(m, x)
    q, k, v = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in seen[-1])
    assert jax_fa4.explain(q, k, v, is_causal=True) is None
    assert TARGET in _lowered(m, x, ("cuda",))
    m.attention_fn = nnx.dot_product_attention
    ref = m(x, mask=nnx.make_causal_mask(x[..., 0]))
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    _close(out, ref, jnp.bfloat16)
