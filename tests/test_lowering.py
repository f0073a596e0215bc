"""Cross-lowering for CUDA from a CPU-only host: which calls become the FA4 custom call
(`stablehlo.custom_call @jax_fa4_cute_call`), with which operands, results and
attributes, and which fall back (and why, per `jax_fa4.explain`).

Tests that lower a supported call compile its kernel (CuTe DSL, no GPU needed); they
are marked `compile` and share the session's kernel cache.  They use 5 distinct
kernel variants.
"""
from __future__ import annotations

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import pytest

from conftest import has_compiler

import jax_fa4
from jax_fa4.kernels import ForwardVariant, get_object

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

compile_test = [pytest.mark.compile,
                pytest.mark.skipif(not has_compiler(),
                                   reason="needs jax_fa4[compile] (flash_attn and cutlass)")]


def compiles(f):
    for m in compile_test:
        f = m(f)
    return f


@pytest.fixture(scope="module", autouse=True)
def _own_kernel_cache(tmp_path_factory):
    """This module compiles what it lowers, into its own cache: an externally set
    JAX_FA4_CACHE_DIR / JAX_FA4_COMPILE=never (precompiled GPU runs) does not apply."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_FA4_CACHE_DIR", str(tmp_path_factory.mktemp("lowering_kernels")))
        mp.delenv("JAX_FA4_COMPILE", raising=False)
        yield


SDS = jax.ShapeDtypeStruct
BF16, FP16 = jnp.bfloat16, jnp.float16
TARGET = "stablehlo.custom_call @jax_fa4_cute_call"


def qkv(b=2, t=128, s=128, n=4, kh=2, h=64, dtype=BF16):
    return SDS((b, t, n, h), dtype), SDS((b, s, kh, h), dtype), SDS((b, s, kh, h), dtype)


def lower(f, *args, platforms=("cuda",)):
    return jax.jit(f).trace(*args).lower(lowering_platforms=platforms).as_text()


def attn(**kw):
    return functools.partial(jax_fa4.attention, **kw)


def calls(text):
    return [line for line in text.splitlines() if TARGET in line]


def parse_dense(text, name, n=None):
    """The values of attribute `name = dense<...> : tensor<n x ...>` (splats expanded);
    n=None accepts any length."""
    m = re.search(name + r" = dense<([^>\"]*)> : tensor<(\d+)x(\w+)>", text)
    assert m, (name, text[:300])
    n = int(m.group(2)) if n is None else n
    assert int(m.group(2)) == n
    body = m.group(1).strip("[]")
    vals = [float(x) for x in body.split(",")]
    return vals * n if len(vals) == 1 else vals


class Call:
    """One parsed custom call line."""

    def __init__(self, line):
        self.line = line
        self.operands = re.search(r"@jax_fa4_cute_call\(([^)]*)\)", line).group(1).split(", ")
        sig = re.search(r":\s*\(([^()]*)\)\s*->\s*\(([^()]*)\)\s*$", line)
        assert sig, line[-400:]
        self.operand_types = sig.group(1).split(", ")
        self.result_types = sig.group(2).split(", ")
        self.symbol = re.search(r'symbol = "([^"]+)"', line).group(1)
        obj = re.search(r'object = dense<"0x([0-9A-F]+)"> : tensor<(\d+)xui8>', line)
        assert obj, "object attribute missing"
        self.object = bytes.fromhex(obj.group(1))
        assert len(self.object) == int(obj.group(2))
        self.size_dims = [int(x) for x in parse_dense(line, "size_dims")]
        self.i32 = [int(x) for x in parse_dense(line, "i32_scalars", 2)]
        self.f32 = parse_dense(line, "f32_scalars", 1)


def one_call(text) -> Call:
    cs = calls(text)
    assert len(cs) == 1, f"expected one custom call, found {len(cs)}"
    return Call(cs[0])


# Size dims: (operand, axis) of every dimension of q, k and v (ranks 4), flattened.
SIZE_DIMS = [x for op in range(3) for axis in range(4) for x in (op, axis)]


# ----------------------------------------------------------------------------
# Supported calls: one custom call each (kernel variants A-E)
# ----------------------------------------------------------------------------

@compiles
def test_window_call():
    """Variant A: bf16, hdim 64, GQA 2, window (5, 0) with T == S."""
    c = one_call(lower(attn(local_window_size=(5, 0)), *qkv()))
    assert c.operands == ["%arg0", "%arg1", "%arg2"]
    assert c.operand_types == ["tensor<2x128x4x64xbf16>", "tensor<2x128x2x64xbf16>",
                               "tensor<2x128x2x64xbf16>"]
    assert c.result_types == ["tensor<2x128x4x64xbf16>", "tensor<2x4x128xf32>"]
    assert c.i32 == [5, 0]
    assert c.f32 == [0.125]  # 1/sqrt(64)
    assert c.size_dims == SIZE_DIMS
    v = ForwardVariant("bfloat16", 64, 64, 2, mask="local", window_left=True, window_right=True)
    assert c.symbol == v.symbol
    assert c.object[:4] == b"\x7fELF"
    assert c.object == get_object(v)


@compiles
def test_sinks_softcap_and_residual():
    """Variant B: window (5, 0), softcap, sinks; return_residual transposes the LSE."""
    q, k, v = qkv()
    sinks = SDS((4,), jnp.float32)
    f = lambda q, k, v, s: jax_fa4.attention(  # noqa: E731
        q, k, v, local_window_size=(5, 0), logits_soft_cap=20.0, sinks=s, return_lse=True)
    text = lower(f, q, k, v, sinks)
    c = one_call(text)
    assert c.operands == ["%arg0", "%arg1", "%arg2", "%arg3"]
    assert c.operand_types[3] == "tensor<4xf32>"
    assert c.result_types == ["tensor<2x128x4x64xbf16>", "tensor<2x4x128xf32>"]
    assert c.i32 == [5, 0] and c.f32 == [0.125]
    want = ForwardVariant("bfloat16", 64, 64, 2, mask="local", window_left=True,
                          window_right=True, softcap=20.0, has_sinks=True)
    assert c.symbol == want.symbol
    # The function returns (out, lse as B,T,N).
    main = re.search(r"func.func public @main\((.*)", text).group(1)
    assert "tensor<2x128x4x64xbf16>" in main and "tensor<2x128x4xf32>" in main


@compiles
def test_half_precision_sinks_are_passed_as_float32():
    q, k, v = qkv()
    f = lambda q, k, v, s: jax_fa4.attention(  # noqa: E731
        q, k, v, local_window_size=(5, 0), logits_soft_cap=20.0, sinks=s)
    c = one_call(lower(f, q, k, v, SDS((4,), BF16)))
    assert c.operand_types[3] == "tensor<4xf32>"


@compiles
def test_scale_and_unequal_lengths_without_mask():
    """Variant C: fp16, hdim 128, MHA, T != S without mask, explicit scale."""
    c = one_call(lower(attn(scale=0.3), *qkv(b=3, t=64, s=128, n=8, kh=8, h=128, dtype=FP16)))
    assert c.operand_types == ["tensor<3x64x8x128xf16>", "tensor<3x128x8x128xf16>",
                               "tensor<3x128x8x128xf16>"]
    assert c.result_types == ["tensor<3x64x8x128xf16>", "tensor<3x8x64xf32>"]
    assert c.f32 == [pytest.approx(0.3, rel=1e-6)]
    assert c.i32 == [0, 0]
    assert c.symbol == ForwardVariant("float16", 128, 128, 1).symbol


@compiles
def test_causal_equal_lengths():
    """Variant D: causal with T == S is FA4's causal mask."""
    c = one_call(lower(attn(is_causal=True), *qkv()))
    assert c.symbol == ForwardVariant("bfloat16", 64, 64, 2, mask="causal").symbol
    assert c.i32 == [0, 0]


@compiles
def test_causal_more_queries_than_keys_is_a_right_window():
    """Variant E: causal with T > S (top-left) is FA4's bottom-right window (-inf, T - S)."""
    c = one_call(lower(attn(is_causal=True), *qkv(t=128, s=64)))
    assert c.symbol == ForwardVariant("bfloat16", 64, 64, 2, mask="local",
                                      window_right=True).symbol
    assert c.i32 == [0, 64]
    assert c.result_types == ["tensor<2x128x4x64xbf16>", "tensor<2x4x128xf32>"]


@compiles
def test_same_variant_serves_every_shape():
    """Shapes are runtime arguments: other batch/lengths/heads reuse variant A's object."""
    a = one_call(lower(attn(local_window_size=(5, 0)), *qkv()))
    b = one_call(lower(attn(local_window_size=(5, 0)), *qkv(b=1, t=200, s=200, n=8, kh=4)))
    assert a.symbol == b.symbol and a.object == b.object
    assert b.operand_types[0] == "tensor<1x200x8x64xbf16>"


@compiles
def test_three_d_inputs():
    q, k, v = (SDS(x.shape[1:], x.dtype) for x in qkv())
    c = one_call(lower(attn(local_window_size=(5, 0)), q, k, v))
    assert c.operand_types[0] == "tensor<1x128x4x64xbf16>"
    assert c.result_types == ["tensor<1x128x4x64xbf16>", "tensor<1x4x128xf32>"]


@compiles
def test_vmap_lowers_to_one_call():
    q, k, v = (SDS((3,) + x.shape, x.dtype) for x in qkv())
    c = one_call(lower(jax.vmap(attn(local_window_size=(5, 0))), q, k, v))
    assert c.operand_types[0] == "tensor<6x128x4x64xbf16>"  # folded into the batch
    assert c.result_types[0] == "tensor<6x128x4x64xbf16>"


@compiles
def test_vmap_over_sinks_lowers_to_one_call():
    q, k, v = qkv()
    f = lambda q, k, v, s: jax_fa4.attention(  # noqa: E731
        q, k, v, local_window_size=(5, 0), logits_soft_cap=20.0, sinks=s)
    g = jax.vmap(f, in_axes=(None, None, None, 0))
    c = one_call(lower(g, q, k, v, SDS((3, 4), jnp.float32)))
    assert c.operand_types == ["tensor<2x128x12x64xbf16>", "tensor<2x128x6x64xbf16>",
                               "tensor<2x128x6x64xbf16>", "tensor<12xf32>"]  # folded into heads
    nested = jax.vmap(jax.vmap(f, in_axes=(0, 0, 0, None)), in_axes=(None, None, None, 0))
    args = [SDS((5,) + x.shape, x.dtype) for x in (q, k, v)]
    c = one_call(lower(nested, *args, SDS((3, 4), jnp.float32)))
    assert c.operand_types[3] == "tensor<12xf32>"


@compiles
def test_value_and_grad_lowers_forward_call_once():
    """One forward call (its out and lse are the backward's residuals) and one FA4
    backward call (tests/test_backward.py checks its operands)."""
    q, k, v = qkv()
    f = lambda q, k, v: jax_fa4.attention(  # noqa: E731
        q, k, v, local_window_size=(5, 0)).astype(jnp.float32).sum()
    text = lower(jax.value_and_grad(f, argnums=(0, 1, 2)), q, k, v)
    symbols = sorted(Call(line).symbol[:12] for line in calls(text))
    assert symbols == ["jax_fa4_bwd_", "jax_fa4_fwd_"]


@compiles
def test_implementation_fa4_lowers_for_cuda():
    c = one_call(lower(attn(local_window_size=(5, 0), implementation="fa4"), *qkv()))
    assert c.i32 == [5, 0]


@compiles
def test_multi_platform_lowering():
    text = lower(attn(local_window_size=(5, 0)), *qkv(), platforms=("cpu", "cuda"))
    assert len(calls(text)) == 1


@compiles
def test_export_for_cuda():
    exp = jax.export.export(
        jax.jit(attn(local_window_size=(5, 0))), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("jax_fa4_cute_call")],
    )(*qkv())
    assert exp.platforms == ("cuda",)
    assert len(calls(exp.mlir_module())) == 1
    assert exp.out_avals[0].shape == (2, 128, 4, 64)


# ----------------------------------------------------------------------------
# Calls that fall back (no kernel compiled)
# ----------------------------------------------------------------------------

FALLBACKS = [
    # (kwargs for qkv, attention kwargs, extra array args, words explain must contain)
    pytest.param({"t": 64, "s": 128}, {"is_causal": True}, None,
                 ["seq_q=64", "seq_k=128", "right window bound"], id="causal-T<S"),
    pytest.param({"t": 64, "s": 128}, {"local_window_size": (3, 2)}, None,
                 ["seq_q=64", "seq_k=128", "right"], id="window-T<S"),
    pytest.param({"t": 128, "s": 64}, {"local_window_size": (3, 2)}, None,
                 ["seq_q=128", "seq_k=64", "left"], id="window-T>S"),
    pytest.param({}, {}, "bias", ["bias"], id="bias"),
    pytest.param({}, {}, "mask", ["mask"], id="mask"),
    pytest.param({"h": 260}, {}, None, ["head_dim 260"], id="hdim260"),
    pytest.param({"h": 12}, {}, None, ["head_dim 12"], id="hdim12"),
    pytest.param({"dtype": jnp.float32}, {}, None, ["dtype float32"], id="float32"),
]


@pytest.mark.parametrize("shape_kw,kw,extra,words", FALLBACKS)
def test_unsupported_calls_fall_back(shape_kw, kw, extra, words):
    q, k, v = qkv(**shape_kw)
    b, t, n, s = q.shape[0], q.shape[1], q.shape[2], k.shape[1]
    if extra == "bias":
        arr = SDS((b, n, t, s), q.dtype)
        f = lambda q, k, v, x: jax_fa4.attention(q, k, v, x, **kw)  # noqa: E731
    elif extra == "mask":
        arr = SDS((b, n, t, s), jnp.bool_)
        f = lambda q, k, v, x: jax_fa4.attention(q, k, v, mask=x, **kw)  # noqa: E731
    else:
        arr = None
        f = lambda q, k, v, x: jax_fa4.attention(q, k, v, **kw)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the decision is made before lowering: no warning
        text = lower(f, q, k, v, arr)
    assert "jax_fa4_cute_call" not in text
    assert "stablehlo.dot_general" in text  # the fallback's attention is there
    reason = jax_fa4.explain(q, k, v, bias=arr if extra == "bias" else None,
                             mask=arr if extra == "mask" else None, platform="cuda", **kw)
    assert reason is not None
    for w in words:
        assert w in reason, (w, reason)
    assert not jax_fa4.is_supported(q, k, v, bias=arr if extra == "bias" else None,
                                    mask=arr if extra == "mask" else None, platform="cuda", **kw)


def test_cpu_lowering_has_no_custom_call():
    q, k, v = qkv()
    for kw in ({}, {"is_causal": True}, {"local_window_size": (5, 0), "logits_soft_cap": 20.0}):
        text = lower(attn(**kw), q, k, v, platforms=("cpu",))
        assert "jax_fa4_cute_call" not in text and "custom_call" not in text


def test_implementation_xla_has_no_custom_call_on_cuda():
    text = lower(attn(local_window_size=(5, 0), implementation="xla"), *qkv())
    assert "jax_fa4_cute_call" not in text


def test_explain():
    q, k, v = qkv()
    assert jax_fa4.explain(q, k, v, platform="cuda") is None
    assert jax_fa4.explain(q, k, v, local_window_size=(5, 0), platform="gpu") is None
    assert jax_fa4.is_supported(q, k, v, platform="cuda")
    assert "cpu" in jax_fa4.explain(q, k, v, platform="cpu")
    if jax.default_backend() == "cpu":
        assert "cpu" in jax_fa4.explain(q, k, v)  # JAX's default backend
    assert "SM90" in jax_fa4.explain(q, k, v, platform="cpu")
    q3, k3, v3 = (SDS(x.shape[1:], x.dtype) for x in (q, k, v))
    assert jax_fa4.explain(q3, k3, v3, platform="cuda") is None


def test_missing_kernel_with_compile_never_falls_back(kernel_cache, monkeypatch):
    """Without the kernel in the cache and JAX_FA4_COMPILE=never, lowering for CUDA warns
    and falls back; implementation='fa4' refuses.  (No compiler needed.)"""
    monkeypatch.setenv("JAX_FA4_COMPILE", "never")
    q, k, v = qkv(h=40)  # a variant no test compiles
    with pytest.warns(UserWarning, match="falling back.*JAX_FA4_COMPILE=never"):
        text = lower(attn(is_causal=True), q, k, v)
    assert "jax_fa4_cute_call" not in text
    with pytest.raises(NotImplementedError, match="JAX_FA4_COMPILE=never"):
        lower(attn(is_causal=True, implementation="fa4"), q, k, v)
