"""varlen_attention / paged_attention / update_paged_cache on CPU (the pure-JAX
fallbacks) vs the float64 reference of the GPU tests, on a sample of the GPU matrix;
plus their argument errors and cross-lowering to the custom call."""
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa4

sys.path.insert(0, os.path.dirname(__file__))
from conftest import requires_compiler  # noqa: E402
from gpu_cases_paged import CALLS, paged_case, varlen_case  # noqa: E402
from test_gpu_paged import _case_id, run_case  # noqa: E402

SAMPLE = CALLS[::6] + [c for c in CALLS if c.get("sinks")]


@pytest.mark.parametrize("case", SAMPLE, ids=[_case_id(c) for c in SAMPLE])
def test_fallback_matches_reference(case):
    run_case(case, None)


def _spec(case):
    return {k: (jax.ShapeDtypeStruct(v[0], np.dtype(v[1])) if isinstance(v, tuple) else v)
            for k, v in case.items() if k != "fn"}


def _lower_cuda(fn, case):
    kw = _spec(case)
    arrays = {k: v for k, v in kw.items() if isinstance(v, jax.ShapeDtypeStruct)}
    static = {k: v for k, v in kw.items() if k not in arrays}
    f = jax.jit(lambda a: fn(**a, **static))
    return f.trace(arrays).lower(lowering_platforms=("cuda",)).as_text()


def _one_call_signature(text):
    """(operand types, result types) of the single jax_fa4 custom call in `text`."""
    calls = [l for l in text.splitlines() if "@jax_fa4_cute_call" in l]
    assert len(calls) == 1
    # one result (the split-KV workspace) is printed without parentheses
    sig = re.search(r":\s*\(([^()]*)\)\s*->\s*\(?([^()]*?)\)?\s*$", calls[0])
    return sig.group(1).split(", "), sig.group(2).split(", ")


@requires_compiler
@pytest.mark.compile
def test_varlen_lowers_to_custom_call_with_cu_seqlens():
    case = varlen_case("bfloat16", 128, 1, 8, "causal", seqused=True)
    operands, results = _one_call_signature(_lower_cuda(jax_fa4.varlen_attention, case))
    assert operands == [
        "tensor<1200x8x128xbf16>", "tensor<1600x1x128xbf16>", "tensor<1600x1x128xbf16>",
        "tensor<7xi32>", "tensor<7xi32>", "tensor<6xi32>"]
    assert results == ["tensor<1200x8x128xbf16>", "tensor<8x1200xf32>"]


@requires_compiler
@pytest.mark.compile
def test_paged_lowers_to_custom_call_with_page_table():
    case = paged_case("bfloat16", 128, 2, 8, "causal", 64, 1)
    operands, _ = _one_call_signature(_lower_cuda(jax_fa4.paged_attention, case))
    # q, k_cache, v_cache, seqused_k, page_table (kernel ABI order)
    assert operands == [
        "tensor<3x1x16x128xbf16>", "tensor<61x64x2x128xbf16>", "tensor<61x64x2x128xbf16>",
        "tensor<3xi32>", "tensor<3x18xi32>"]


def _paged_inputs():
    q = jnp.zeros((2, 1, 8, 64), jnp.bfloat16) + 1
    kc = jnp.ones((10, 16, 2, 64), jnp.bfloat16)
    return q, kc, kc, jnp.zeros((2, 4), jnp.int32), jnp.array([5, 9], jnp.int32)


@pytest.mark.parametrize("change,match", [
    (dict(page_table=jnp.zeros((2, 4), jnp.int64 if jax.config.jax_enable_x64 else jnp.float32)),
     "page_table"),
    (dict(page_table=jnp.zeros((8,), jnp.int32)), "page_table"),
    (dict(v_cache=jnp.ones((10, 32, 2, 64), jnp.bfloat16)), "page size"),
    (dict(v_cache=jnp.ones((10, 16, 1, 64), jnp.bfloat16)), "kv heads"),
    (dict(q=jnp.ones((2, 1, 8, 32), jnp.bfloat16)), "head_dim"),
    (dict(seqused_k=jnp.array([5, 9], jnp.float32)), "seqused_k"),
    (dict(seqused_k=jnp.array([5, 9, 1], jnp.int32)), "seqused_k"),
])
def test_paged_errors(change, match):
    names = ("q", "k_cache", "v_cache", "page_table", "seqused_k")
    args = dict(zip(names, _paged_inputs()))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        jax_fa4.paged_attention(**args)


@pytest.mark.parametrize("change,match", [
    (dict(cu_seqlens_q=jnp.array([0, 3, 5], jnp.float32)), "cu_seqlens_q"),
    (dict(cu_seqlens_k=jnp.array([0, 3], jnp.int32)), "cu_seqlens_k"),
    (dict(max_seqlen_q=0), "max_seqlen_q"),
    (dict(seqused_k=jnp.array([1], jnp.int32)), "seqused_k"),
])
def test_varlen_errors(change, match):
    q = jnp.ones((5, 4, 64), jnp.bfloat16)
    args = dict(q=q, k=q[:, :2], v=q[:, :2], cu_seqlens_q=jnp.array([0, 3, 5], jnp.int32),
                cu_seqlens_k=jnp.array([0, 2, 5], jnp.int32), max_seqlen_q=3, max_seqlen_k=3)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        jax_fa4.varlen_attention(**args)


def test_checked_page_indices_raise():
    q, kc, vc, pt, used = _paged_inputs()
    pt = pt.at[1, 0].set(10)  # one past the last page, used by sequence 1
    with pytest.raises(Exception, match=r"page_table\[1\]"):
        jax_fa4.paged_attention(q, kc, vc, pt, used, check_page_indices=True).block_until_ready()


def test_update_paged_cache_writes_and_drops():
    kc = jnp.zeros((6, 4, 1, 8), jnp.float32)
    pt = jnp.array([[2, 5], [0, 1]], jnp.int32)
    new = jnp.arange(2 * 3 * 8, dtype=jnp.float32).reshape(2, 3, 1, 8) + 1
    pos = jnp.array([[3, 4, -1], [0, 7, 8]], jnp.int32)  # -1 and 8 (past 2 pages) dropped
    k2, _ = jax.jit(jax_fa4.update_paged_cache, donate_argnums=(0, 1))(kc, kc + 0, new, new, pt, pos)
    k2 = np.asarray(k2)
    np.testing.assert_array_equal(k2[2, 3, 0], np.asarray(new[0, 0, 0]))
    np.testing.assert_array_equal(k2[5, 0, 0], np.asarray(new[0, 1, 0]))
    np.testing.assert_array_equal(k2[0, 0, 0], np.asarray(new[1, 0, 0]))
    np.testing.assert_array_equal(k2[1, 3, 0], np.asarray(new[1, 1, 0]))
    assert np.count_nonzero(k2.any(-1)) == 4  # nothing else written


def _varlen_batch(rng, v=3):
    lens_q = [[3, 0, 5], [1, 7, 2], [4, 4, 0]][:v]
    lens_k = [[6, 2, 5], [1, 9, 3], [4, 8, 1]][:v]
    cu = lambda ls: np.stack([np.concatenate([[0], np.cumsum(x)]) for x in ls]).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((v, 12, 4, 64)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((v, 14, 2, 64)), jnp.bfloat16)
    return q, k, k * 0.5, jnp.asarray(cu(lens_q)), jnp.asarray(cu(lens_k))


def test_vmap_varlen_matches_loop():
    q, k, v, cu_q, cu_k = _varlen_batch(np.random.default_rng(0))
    f = lambda q, k, v, a, b: jax_fa4.varlen_attention(  # noqa: E731
        q, k, v, a, b, max_seqlen_q=8, max_seqlen_k=10, is_causal=True, return_lse=True)
    o, lse = jax.jit(jax.vmap(f))(q, k, v, cu_q, cu_k)
    for i in range(3):
        oi, li = f(q[i], k[i], v[i], cu_q[i], cu_k[i])
        np.testing.assert_allclose(np.asarray(o[i], np.float32), np.asarray(oi, np.float32),
                                   atol=1e-2)
        np.testing.assert_allclose(np.asarray(lse[i]), np.asarray(li), atol=1e-3)


def _paged_batch(rng, v=2):
    kc = jnp.asarray(rng.standard_normal((v, 12, 16, 2, 64)), jnp.bfloat16)
    pt = jnp.asarray(np.stack([rng.permutation(12)[:8].reshape(2, 4) for _ in range(v)]),
                     jnp.int32)
    used = jnp.asarray(rng.integers(1, 64, (v, 2)), jnp.int32)
    q = jnp.asarray(rng.standard_normal((v, 2, 3, 8, 64)), jnp.bfloat16)
    return q, kc, kc + 1, pt, used


@pytest.mark.parametrize("shared_pool", [False, True])
def test_vmap_paged_matches_loop(shared_pool):
    q, kc, vc, pt, used = _paged_batch(np.random.default_rng(1))
    f = lambda q, kc, vc, pt, u: jax_fa4.paged_attention(q, kc, vc, pt, u, is_causal=True)  # noqa: E731
    if shared_pool:
        o = jax.jit(jax.vmap(f, in_axes=(0, None, None, 0, 0)))(q, kc[0], vc[0], pt, used)
    else:
        o = jax.jit(jax.vmap(f))(q, kc, vc, pt, used)
    for i in range(2):
        j = 0 if shared_pool else i
        oi = f(q[i], kc[j], vc[j], pt[i], used[i])
        np.testing.assert_allclose(np.asarray(o[i], np.float32), np.asarray(oi, np.float32),
                                   atol=1e-2)


@requires_compiler
@pytest.mark.compile
def test_vmap_varlen_and_paged_lower_to_one_custom_call():
    q, k, v, cu_q, cu_k = _varlen_batch(np.random.default_rng(0))
    f = lambda q, k, v, a, b: jax_fa4.varlen_attention(  # noqa: E731
        q, k, v, a, b, max_seqlen_q=8, max_seqlen_k=10, is_causal=True)
    text = jax.jit(jax.vmap(f)).trace(q, k, v, cu_q, cu_k).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("@jax_fa4_cute_call") == 1
    q, kc, vc, pt, used = _paged_batch(np.random.default_rng(1))
    g = lambda q, kc, vc, pt, u: jax_fa4.paged_attention(q, kc, vc, pt, u, is_causal=True)  # noqa: E731
    text = jax.jit(jax.vmap(g, in_axes=(0, None, None, 0, 0))).trace(
        q, kc[0], vc[0], pt, used).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("@jax_fa4_cute_call") == 1
    assert "tensor<12x16x2x64xbf16>" in text  # the shared pool is not copied per map entry


@requires_compiler
@pytest.mark.compile
def test_vmap_over_sinks_of_paged_lowers_to_one_call_per_entry():
    """Mapped sinks of a paged call (a NotImplementedError before 2026-12-08): one
    custom call inside a loop over the map entries, the shared pool passed once."""
    q, kc, vc, pt, used = _paged_batch(np.random.default_rng(1))
    sinks = jnp.asarray(np.random.default_rng(2).standard_normal((q.shape[0], q.shape[-2])),
                        jnp.float32)
    g = lambda q, kc, vc, pt, u, s: jax_fa4.paged_attention(  # noqa: E731
        q, kc, vc, pt, u, is_causal=True, sinks=s)
    mapped = jax.jit(jax.vmap(g, in_axes=(0, None, None, 0, 0, 0)))
    text = mapped.trace(q, kc[0], vc[0], pt, used, sinks).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("@jax_fa4_cute_call") == 1 and "stablehlo.while" in text
    assert "tensor<12x16x2x64xbf16>" in text  # the shared pool is not copied per map entry
    got = mapped(q, kc[0], vc[0], pt, used, sinks)  # on this host: the pure-JAX path
    for i in range(q.shape[0]):
        want = g(q[i], kc[0], vc[0], pt[i], used[i], sinks[i])
        np.testing.assert_allclose(np.asarray(got[i], np.float32), np.asarray(want, np.float32),
                                   rtol=1e-2, atol=1e-2)


def test_donated_cache_update_is_in_place():
    """With donated caches the compiled update aliases them to its outputs and copies
    no cache-sized buffer."""
    kc = jnp.zeros((64, 16, 2, 64), jnp.bfloat16)
    pt = jnp.arange(8, dtype=jnp.int32).reshape(2, 4)
    new = jnp.ones((2, 1, 2, 64), jnp.bfloat16)
    pos = jnp.array([[3], [9]], jnp.int32)
    f = jax.jit(jax_fa4.update_paged_cache, donate_argnums=(0, 1))
    hlo = f.lower(kc, kc, new, new, pt, pos).compile().as_text()
    header = hlo.splitlines()[0]
    assert "{0}: (0, {}, may-alias)" in header and "{1}: (1, {}, may-alias)" in header, header
    cache_shape = "bf16[64,16,2,64]"
    copies = [l for l in hlo.splitlines() if " copy(" in l and cache_shape in l]
    assert not copies, copies


def test_explain_call_names_the_reason():
    q, kc, vc, pt, used = _paged_inputs()
    kw = dict(q=q, k_cache=kc, v_cache=vc, page_table=pt, seqused_k=used)
    assert "platform is cpu" in jax_fa4.explain_call("paged_attention", **kw)
    assert jax_fa4.explain_call("paged_attention", platform="cuda", **kw) is None
    f32 = {k: (x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x) for k, x in kw.items()}
    assert "float32" in jax_fa4.explain_call("paged_attention", platform="cuda", **f32)
    kc12 = jnp.ones((10, 12, 2, 64), jnp.bfloat16)
    reason = jax_fa4.explain_call("paged_attention", platform="cuda",
                                  **dict(kw, k_cache=kc12, v_cache=kc12))
    assert "page_size 12" in reason
