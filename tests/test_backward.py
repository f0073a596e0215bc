"""Gradients on CPU: the pure-JAX chunked backward (fallback_backward.py) against
float64 autodiff of the reference attention and numerical derivatives; jax.grad
through the primitive's backward; cross-lowering of jax.grad for CUDA (one backward
custom call with FA4's workspaces as extra results); the reasons `explain` gives for
backward fallbacks; and (marker `compile`) that backward variants compile.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from conftest import has_compiler
from reference import attention_jnp

import jax_fa4
from jax_fa4 import fallback_backward
from jax_fa4 import fallback_forward as fallback
from jax_fa4.backward_primitive import fa4_bwd_p
from jax_fa4.dispatch import Unsupported, plan_backward
from jax_fa4.kernels.backward_abi import workspace_shapes
from jax_fa4.kernels.backward_config import BackwardVariant

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SDS = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16


def _rand(rng, shape, dtype=np.float64):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def _relerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _sub_jaxprs(params):
    """The jaxprs inside an equation's params (jax.core.jaxprs_in_params, which jax 0.11
    removed)."""
    for v in params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if hasattr(x, "eqns"):
                yield x
            elif hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
                yield x.jaxpr


def _reference64(q, k, v, sinks, *, scale, window=(None, None), softcap=None):
    """tests/reference.py's attention in the inputs' precision (float64 here): (out
    (B,T,N,Hv), lse (B,N,T)); rows that see nothing give 0 and lse -inf/sink."""
    o, lse = attention_jnp(q, k, v, sinks, scale=scale, window=window, softcap=softcap)
    return o, jnp.swapaxes(lse, 1, 2)


# (b, t, s, n, kh, h, hv, options for the reference)
DENSE = [
    (2, 33, 45, 4, 2, 16, 16, dict()),
    (1, 40, 40, 4, 1, 16, 8, dict(window=(None, 0))),
    (2, 21, 50, 2, 2, 8, 8, dict(window=(5, 3))),
    (1, 30, 30, 6, 2, 16, 16, dict(softcap=2.0, window=(None, 0))),
    (2, 17, 29, 4, 4, 8, 8, dict(sinks=True, window=(3, 0))),  # rows with no key + sinks
    (1, 50, 20, 4, 2, 512, 512, dict(sinks=True, softcap=5.0)),  # head dim 512
]


@pytest.mark.parametrize("case", DENSE, ids=[f"dense{i}" for i in range(len(DENSE))])
def test_chunked_backward_matches_float64_autodiff(case):
    """dense_backward (chunks of 16 keys, padded) == jax.vjp of reference_attention,
    for dO and dLSE cotangents, in float64."""
    b, t, s, n, kh, h, hv, opts = case
    opts = dict(opts)
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        q, k, v = _rand(rng, (b, t, n, h)), _rand(rng, (b, s, kh, h)), _rand(rng, (b, s, kh, hv))
        sinks = _rand(rng, (n,)) if opts.pop("sinks", False) else None
        scale = 0.7 / np.sqrt(h)
        f = functools.partial(_reference64, scale=scale, **opts)
        (o, lse), vjp = jax.vjp(f, q, k, v, sinks)
        do, dlse = _rand(rng, o.shape), _rand(rng, lse.shape)
        want = vjp((do, jnp.where(jnp.isfinite(lse), dlse, 0)))
        got = fallback_backward.dense_backward(q, k, v, o, do, lse, dlse, sinks, scale=scale,
                                               chunk=16, **opts)
        for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got, want):
            if w is None:
                assert g is None
                continue
            assert g.dtype == w.dtype
            assert _relerr(g, w) < 1e-10, name


def test_chunked_backward_check_grads():
    """jax.test_util.check_grads (numerical derivatives, reverse mode) on the
    memory-frugal custom_vjp attention, float64, with softcap, sinks and a window."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        q, k, v = _rand(rng, (1, 9, 4, 8)), _rand(rng, (1, 11, 2, 8)), _rand(rng, (1, 11, 2, 8))
        sinks = _rand(rng, (4,))
        f = lambda q, k, v, s: fallback_backward.reference_attention(  # noqa: E731
            q, k, v, s, 0.4, (4, 2), 3.0)
        # The forward computes its logits in float32 (as the kernel does), so numerical
        # derivatives carry ~1e-4 relative noise; the float64 check is the test above.
        check_grads(f, (q, k, v, sinks), order=1, modes=("rev",), atol=5e-3, rtol=5e-3)


def test_chunked_backward_never_holds_a_full_score_matrix():
    """Every intermediate of dense_backward is at most (T, chunk) per head: none has
    both the query and the key length as dimensions."""
    t = s = 512
    args = [SDS((1, t, 2, 64), jnp.float32), SDS((1, s, 2, 64), jnp.float32),
            SDS((1, s, 2, 64), jnp.float32), SDS((1, t, 2, 64), jnp.float32),
            SDS((1, t, 2, 64), jnp.float32), SDS((1, 2, t), jnp.float32),
            SDS((1, 2, t), jnp.float32)]
    jaxpr = jax.make_jaxpr(functools.partial(fallback_backward.dense_backward, scale=0.1,
                                             window=(None, 0), chunk=64))(*args)
    biggest = 0

    def walk(jp):
        nonlocal biggest
        for eqn in jp.eqns:
            for var in eqn.outvars:
                biggest = max(biggest, int(np.prod(getattr(var.aval, "shape", ()))))
            for sub in _sub_jaxprs(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert biggest < t * s, biggest
    assert biggest <= 2 * t * 64 * 2


GRAD_CASES = [dict(), dict(is_causal=True), dict(local_window_size=(7, 3)),
              dict(logits_soft_cap=5.0), dict(sinks=True, is_causal=True)]


@pytest.mark.parametrize("kw", GRAD_CASES, ids=lambda kw: "-".join(kw) or "plain")
def test_grad_through_primitive_matches_float64(kw):
    """bfloat16 jax.grad on CPU: forward primitive + backward primitive (lowered to
    the chunked backward here), including the lse cotangent."""
    kw = dict(kw)
    rng = np.random.default_rng(2)
    b, t, s, n, kh, h = 2, 40, 40, 4, 2, 64
    q, k, v = (_rand(rng, sh, BF16) for sh in ((b, t, n, h), (b, s, kh, h), (b, s, kh, h)))
    sinks = _rand(rng, (n,), jnp.float32) if kw.pop("sinks", False) else None
    w = _rand(rng, (h,), jnp.float32)

    def loss(attn):
        def f(q, k, v, sinks):
            o, lse = attn(q, k, v, sinks)
            return jnp.sum(o.astype(jnp.float32) * w) + 0.3 * jnp.sum(
                jnp.where(jnp.isfinite(lse), lse, 0))
        return f

    fa = lambda q, k, v, s: jax_fa4.attention(q, k, v, sinks=s, return_lse=True,  # noqa
                                               **kw)
    window = (kw.get("local_window_size") or (None, None))
    if kw.get("is_causal"):
        window = (window[0], 0)

    def ref(q, k, v, s):
        o, lse = fallback.reference_attention(q, k, v, s, scale=h ** -0.5, window=window,
                                              softcap=kw.get("logits_soft_cap"))
        return o, jnp.swapaxes(lse, 1, 2)

    argnums = (0, 1, 2) if sinks is None else (0, 1, 2, 3)
    g = jax.grad(loss(fa), argnums=argnums)
    assert fa4_bwd_p in {e.primitive for e in jax.make_jaxpr(g)(q, k, v, sinks).eqns} or \
        "jax_fa4_bwd" in str(jax.make_jaxpr(g)(q, k, v, sinks))
    got = jax.jit(g)(q, k, v, sinks)
    with jax.enable_x64(True):
        f64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v)]
        s64 = None if sinks is None else jnp.asarray(sinks, jnp.float64)
        want = jax.grad(loss(ref), argnums=argnums)(*f64, s64)
        for a, b_ in zip(got, want):
            assert _relerr(a, b_) < 1e-2


def test_head_dim_512_gradient_is_chunked_and_explained():
    """Head dim 512 (no SM90 backward): the gradient comes from the chunked pure-JAX
    backward, and explain(backward=True) says why."""
    rng = np.random.default_rng(3)
    q, k, v = (_rand(rng, (1, 40, 2, 512), jnp.float32) for _ in range(3))
    f = lambda q, k, v: jnp.sum(jax_fa4.attention(q, k, v, is_causal=True) ** 2)  # noqa
    text = str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, k, v))
    assert "scan" in text  # the key-chunk loop of fallback_backward
    got = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
    ref = lambda q, k, v: jnp.sum(fallback.reference_attention(  # noqa: E731
        q, k, v, scale=512 ** -0.5, window=(None, 0))[0] ** 2)
    want = jax.grad(ref, argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want):
        assert _relerr(a, b) < 1e-5
    sds = [SDS((1, 40, 2, 512), BF16)] * 3
    reason = jax_fa4.explain(*sds, is_causal=True, backward=True, platform="cuda")
    assert reason and "512" in reason


def test_plan_backward_reasons():
    from jax_fa4.api import kernel_plan

    sds = lambda *s, d=BF16: SDS(s, d)  # noqa: E731
    plan = kernel_plan(sds(1, 64, 4, 128), sds(1, 64, 2, 128), sds(1, 64, 2, 128),
                       is_causal=True, sinks=sds(4, d=jnp.float32), logits_soft_cap=20.0)
    bp = plan_backward(plan)
    assert bp.variant.qhead_per_kvhead == 2 and bp.variant.has_sinks
    assert bp.variant.softcap == 20.0 and bp.variant.mask == "causal"
    plan80 = kernel_plan(sds(1, 64, 4, 80), sds(1, 64, 2, 80), sds(1, 64, 2, 80))
    with pytest.raises(Unsupported, match="head dims"):
        plan_backward(plan80)
    assert jax_fa4.explain(sds(1, 64, 4, 80), sds(1, 64, 2, 80), sds(1, 64, 2, 80),
                           backward=True, platform="cuda").startswith("backward: ")
    assert jax_fa4.explain(sds(1, 64, 4, 80), sds(1, 64, 2, 80), sds(1, 64, 2, 80),
                           platform="cuda") is None


def _paged_args(rng, b=2, tq=5, n=4, kh=2, h=16, page=8, pages=9, max_pages=4):
    q = _rand(rng, (b, tq, n, h), BF16)
    kc, vc = (_rand(rng, (pages, page, kh, h), BF16) for _ in range(2))
    pt = jnp.asarray(rng.permutation(pages)[: b * max_pages].reshape(b, max_pages), jnp.int32)
    used = jnp.asarray([19, 30], jnp.int32)
    return q, kc, vc, pt, used


def test_paged_gradient_uses_pure_jax_backward_and_matches():
    rng = np.random.default_rng(4)
    q, kc, vc, pt, used = _paged_args(rng)
    w = _rand(rng, (16,), jnp.float32)
    f = lambda q, kc, vc: jnp.sum(jax_fa4.paged_attention(  # noqa: E731
        q, kc, vc, pt, used, is_causal=True).astype(jnp.float32) * w)
    got = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, kc, vc)
    ref = lambda q, kc, vc: jnp.sum(fallback.paged_fallback(  # noqa: E731
        q, kc, vc, pt, used, None, None, None, max_seqlen_q=5, scale=0.25, window=(None, 0),
        softcap=None)[0].astype(jnp.float32) * w)
    want = jax.grad(ref, argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, kc, vc)))
    for a, b in zip(got, want):
        assert _relerr(a, b) < 2e-2
    reason = jax_fa4.explain_call("paged_attention", q=q, k_cache=kc, v_cache=vc,
                                  page_table=pt, seqused_k=used, backward=True,
                                  platform="cuda")
    assert reason.startswith("backward: ") and "paged" in reason


@pytest.mark.parametrize("seqused", [False, True])
def test_varlen_gradient_matches_reference(seqused):
    rng = np.random.default_rng(5)
    lens = [7, 19, 12]
    total = sum(lens) + 3
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
    cu = cu.at[-1].set(total) if seqused else cu
    q, k, v = (_rand(rng, (total, 4, 16), BF16) for _ in range(3))
    extra = dict(seqused_q=jnp.asarray(lens, jnp.int32),
                 seqused_k=jnp.asarray(lens, jnp.int32)) if seqused else {}
    kw = dict(max_seqlen_q=19, max_seqlen_k=19, is_causal=True, **extra)
    w = _rand(rng, (16,), jnp.float32)
    f = lambda q, k, v, impl: jnp.sum(jax_fa4.varlen_attention(  # noqa: E731
        q, k, v, cu, cu, implementation=impl, **kw).astype(jnp.float32) * w)
    got = jax.jit(jax.grad(f, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, None)
    want = jax.grad(f, argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)), "xla")
    for a, b in zip(got, want):
        assert _relerr(a, b) < 2e-2


def test_vmap_of_grad_matches_loop():
    rng = np.random.default_rng(6)
    q, k, v = (_rand(rng, (3, 1, 20, 4, 16), BF16) for _ in range(3))
    f = lambda q, k, v: jnp.sum(jax_fa4.attention(  # noqa: E731
        q, k, v, is_causal=True).astype(jnp.float32) ** 2)
    g = jax.grad(f, argnums=(0, 1, 2))
    batched = jax.jit(jax.vmap(g))(q, k, v)
    for i in range(3):
        one = g(q[i], k[i], v[i])
        for a, b in zip(batched, one):
            assert _relerr(a[i], b) < 1e-2


def test_workspace_shapes_follow_fa4():
    v = BackwardVariant("bfloat16", 128, 128, 4, mask="causal")  # tile 64x128, d_pad 128
    ws = workspace_shapes(v, (2, 333, 8, 128), (2, 333, 2, 128), (2, 333, 2, 128), 2)
    assert ws == {"dq_accum": (2, 8, 384 * 128), "dpsum": (2, 8, 384), "lse_log2": (2, 8, 384),
                  "dk_accum": (2, 2, 384 * 128), "dv_accum": (2, 2, 384 * 128)}
    v = BackwardVariant("bfloat16", 256, 256, 1, layout="packed")  # tile 64x48, d_pad 256
    ws = workspace_shapes(v, (500, 4, 256), (600, 4, 256), (600, 4, 256), 3)
    assert ws == {"dq_accum": (4, 704 * 256), "dpsum": (4, 704), "lse_log2": (4, 704)}


# ---------------------------------------------------------------------------
# Cross-lowering for CUDA (compiles the kernels: marker `compile`)
# ---------------------------------------------------------------------------

TARGET = "stablehlo.custom_call @jax_fa4_cute_call"


def _custom_calls(f, *args):
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    out = []
    for line in text.splitlines():
        if TARGET in line:
            sig = re.search(r":\s*\(([^()]*)\)\s*->\s*\(([^()]*)\)\s*$", line)
            out.append(dict(symbol=re.search(r'symbol = "([^"]+)"', line).group(1),
                            operands=sig.group(1).split(", "), results=sig.group(2).split(", "),
                            i32=re.search(r"i32_scalars = dense<([^>]*)>", line).group(1)))
    return out


@pytest.mark.compile
@pytest.mark.skipif(not has_compiler(), reason="needs jax_fa4[compile]")
def test_grad_lowers_to_forward_and_backward_calls():
    q, k, v = SDS((2, 333, 8, 128), BF16), SDS((2, 333, 2, 128), BF16), SDS((2, 333, 2, 128), BF16)
    sinks = SDS((8,), jnp.float32)
    f = lambda q, k, v, s: jnp.sum(jax_fa4.attention(  # noqa: E731
        q, k, v, sinks=s, local_window_size=(100, 20)).astype(jnp.float32))
    fwd, bwd = _custom_calls(jax.grad(f, argnums=(0, 1, 2, 3)), q, k, v, sinks)
    assert fwd["symbol"].startswith("jax_fa4_fwd_") and bwd["symbol"].startswith("jax_fa4_bwd_")
    qt, kt, ot, st = ("tensor<2x333x8x128xbf16>", "tensor<2x333x2x128xbf16>",
                      "tensor<2x8x333xf32>", "tensor<8xf32>")
    assert bwd["operands"] == [qt, kt, kt, qt, qt, ot, ot, st]  # q k v o do lse dlse sinks
    # dq dk dv dsinks, then dq_accum, dpsum, lse_log2, dk_accum, dv_accum (tile 64x128:
    # 333 rows pad to 384 for both).
    assert bwd["results"] == [qt, kt, kt, st, "tensor<2x8x49152xf32>", "tensor<2x8x384xf32>",
                              "tensor<2x8x384xf32>", "tensor<2x2x49152xf32>",
                              "tensor<2x2x49152xf32>"]
    assert bwd["i32"] == fwd["i32"] == "[100, 20]"


@pytest.mark.compile
@pytest.mark.skipif(not has_compiler(), reason="needs jax_fa4[compile]")
def test_varlen_grad_lowers_to_packed_backward_call():
    q, k = SDS((300, 4, 64), BF16), SDS((310, 4, 64), BF16)
    cu = SDS((4,), jnp.int32)
    f = lambda q, k, v, cq, ck: jnp.sum(jax_fa4.varlen_attention(  # noqa: E731
        q, k, v, cq, ck, max_seqlen_q=200, max_seqlen_k=200, is_causal=True
    ).astype(jnp.float32))
    calls = _custom_calls(jax.grad(f, argnums=(0, 1, 2)), q, k, k, cu, cu)
    bwd = [c for c in calls if c["symbol"].startswith("jax_fa4_bwd_")]
    assert len(bwd) == 1
    assert bwd[0]["operands"][5:] == ["tensor<4x300xf32>", "tensor<4x300xf32>",
                                      "tensor<4xi32>", "tensor<4xi32>"]


BWD_VARIANTS = [
    BackwardVariant("bfloat16", 64, 64, 4, mask="local", window_left=True, window_right=True,
                    has_sinks=True),
    BackwardVariant("float16", 256, 256, 8, softcap=30.0),
    BackwardVariant("bfloat16", 128, 128, 4, mask="causal", layout="packed",
                    has_seqused_q=True, has_seqused_k=True),
    BackwardVariant("bfloat16", 192, 128, 1, mask="causal"),
]


@pytest.mark.compile
@pytest.mark.skipif(not has_compiler(), reason="needs jax_fa4[compile]")
@pytest.mark.parametrize("variant", BWD_VARIANTS, ids=lambda v: v.describe())
def test_backward_variants_compile(variant, kernel_cache):
    from jax_fa4.kernels import get_object

    obj = get_object(variant)
    assert obj[:4] == b"\x7fELF" and variant.symbol.encode() in obj
