"""Bad arguments to `jax_fa4.attention` fail at trace time with ValueError /
NotImplementedError naming the argument; `implementation=` errors say why."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa4

SDS = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16


def qkv(b=2, t=16, s=16, n=4, kh=2, h=64, hv=None, dtype=BF16):
    hv = h if hv is None else hv
    return (SDS((b, t, n, h), dtype), SDS((b, s, kh, h), dtype), SDS((b, s, kh, hv), dtype))


def trace(*args, **kwargs):
    """Traces attention on abstract values only (no compile, no data)."""
    arrays = [a for a in args]
    fn = functools.partial(jax_fa4.attention, **kwargs)
    return jax.jit(fn).trace(*arrays)


def test_valid_call_traces():
    out = jax.eval_shape(functools.partial(jax_fa4.attention, return_lse=True), *qkv())
    assert out[0].shape == (2, 16, 4, 64) and out[0].dtype == BF16
    assert out[1].shape == (2, 16, 4) and out[1].dtype == jnp.float32


SHAPE_ERRORS = [
    # (q, k, v), words the message must contain
    pytest.param((SDS((2, 16, 4, 64), BF16), SDS((16, 2, 64), BF16), SDS((16, 2, 64), BF16)),
                 ["query", "key", "value", "4-D"], id="rank-mismatch"),
    pytest.param((SDS((2, 16, 4, 64, 1), BF16),) * 3, ["query", "4-D", "3-D"], id="rank-5"),
    pytest.param((SDS((16, 64), BF16),) * 3, ["query", "4-D", "3-D"], id="rank-2"),
    pytest.param((SDS((2, 16, 4, 64), BF16), SDS((2, 16, 2, 64), BF16), SDS((2, 12, 2, 64), BF16)),
                 ["key", "value"], id="key-value-seq-mismatch"),
    pytest.param((SDS((2, 16, 4, 64), BF16), SDS((2, 16, 2, 64), BF16), SDS((2, 16, 4, 64), BF16)),
                 ["key", "value"], id="key-value-heads-mismatch"),
    pytest.param((SDS((2, 16, 4, 64), BF16), SDS((3, 16, 2, 64), BF16), SDS((3, 16, 2, 64), BF16)),
                 ["query", "key", "batch"], id="batch-mismatch"),
    pytest.param((SDS((2, 16, 4, 64), BF16), SDS((2, 16, 2, 32), BF16), SDS((2, 16, 2, 32), BF16)),
                 ["head_dim", "query", "key"], id="head-dim-mismatch"),
    pytest.param((SDS((2, 16, 6, 64), BF16), SDS((2, 16, 4, 64), BF16), SDS((2, 16, 4, 64), BF16)),
                 ["heads", "multiple"], id="heads-not-multiple"),
    pytest.param((SDS((2, 16, 4, 64), BF16), SDS((2, 16, 0, 64), BF16), SDS((2, 16, 0, 64), BF16)),
                 ["key/value", "at least one head"], id="zero-kv-heads"),
    # the default scale is 1/sqrt(head_dim): a ZeroDivisionError before 2026-12-08
    pytest.param((SDS((2, 16, 4, 0), BF16),) * 3, ["head dims", ">= 1"], id="zero-head-dim"),
    pytest.param((SDS((2, 16, 4, 64), BF16), SDS((2, 16, 4, 64), BF16), SDS((2, 16, 4, 0), BF16)),
                 ["head dims", ">= 1", "value 0"], id="zero-value-head-dim"),
    pytest.param((SDS((2, 16, 4, 64), BF16), SDS((2, 16, 2, 64), jnp.float16),
                  SDS((2, 16, 2, 64), BF16)), ["dtype"], id="dtype-mismatch"),
    pytest.param((SDS((2, 16, 4, 64), jnp.int32),) * 3, ["floating"], id="integer-dtype"),
    pytest.param((SDS((2, 16, 4, 64), jnp.bool_),) * 3, ["floating"], id="bool-dtype"),
]


@pytest.mark.parametrize("args,words", SHAPE_ERRORS)
def test_bad_shapes_and_dtypes(args, words):
    with pytest.raises(ValueError) as e:
        trace(*args)
    msg = str(e.value)
    for w in words:
        assert w in msg, (w, msg)


def test_errors_also_raised_eagerly_with_arrays():
    q = jnp.ones((1, 8, 4, 64), BF16)
    k = jnp.ones((1, 8, 3, 64), BF16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        jax_fa4.attention(q, k, k)


def test_none_inputs_are_rejected():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="key"):
        jax_fa4.attention(q, None, v)


@pytest.mark.parametrize("window", [(-2, 0), (0, -5), -3])
def test_window_below_minus_one(window):
    """varlen/paged take FA's convention (-1 = unbounded, nothing lower); attention
    takes jax.nn's (every int is a bound)."""
    q = jax.ShapeDtypeStruct((16, 4, 64), BF16)
    cu = jax.ShapeDtypeStruct((3,), jnp.int32)
    with pytest.raises(ValueError, match="local_window_size.*>= -1"):
        jax.eval_shape(functools.partial(jax_fa4.varlen_attention, max_seqlen_q=8,
                                         max_seqlen_k=8, local_window_size=window),
                       q, q, q, cu, cu)
    assert trace(*qkv(), local_window_size=window) is not None


@pytest.mark.parametrize("window", [(1, 2, 3), (4,), "ab", 2.5, (2.0, 0), (True, 0), True,
                                    {"left": 1}])
def test_window_of_wrong_form(window):
    with pytest.raises(ValueError, match="local_window_size"):
        trace(*qkv(), local_window_size=window)


@pytest.mark.parametrize("window", [np.int64(3), (np.int32(2), 0), [3, 1]])
def test_window_numpy_ints_and_lists_are_accepted(window):
    out = jax.eval_shape(functools.partial(jax_fa4.attention, local_window_size=window), *qkv())
    assert out.shape == (2, 16, 4, 64)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, np.float32("nan")])
def test_non_finite_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        trace(*qkv(), scale=scale)


def test_traced_scale_runs_off_the_kernel():
    """A traced scale works (as in jax.nn), on the pure-JAX/jax.nn path: the kernel
    takes the scale as a compile-time constant, and explain says so."""
    q, k, v = (jnp.ones(x.shape, x.dtype) for x in qkv(t=8, s=8))
    out = jax.jit(lambda q, k, v, s: jax_fa4.attention(q, k, v, scale=s))(q, k, v, 0.5)
    assert out.shape == q.shape
    why = []
    jax.jit(lambda s: why.append(jax_fa4.explain(q, k, v, scale=s, platform="cuda")) or s)(0.5)
    assert "scale is traced" in why[0]


@pytest.mark.parametrize("name", ["scale", "logits_soft_cap"])
def test_non_numeric_scalar_names_the_argument(name):
    with pytest.raises(ValueError, match=name):
        trace(*qkv(), **{name: "big"})


@pytest.mark.parametrize("name", ["scale", "logits_soft_cap"])
def test_non_numeric_scalar_is_a_value_error(name):
    with pytest.raises(ValueError):
        trace(*qkv(), **{name: "big"})
    with pytest.raises(ValueError, match=name):
        trace(*qkv(), **{name: [1.0, 2.0]})


@pytest.mark.parametrize("cap", [0.0, -1.0, math.nan, math.inf])
def test_bad_logits_soft_cap(cap):
    with pytest.raises(ValueError, match="logits_soft_cap"):
        trace(*qkv(), logits_soft_cap=cap)


@pytest.mark.parametrize("sinks", [SDS((2,), jnp.float32), SDS((4, 1), jnp.float32),
                                   SDS((1, 4), jnp.float32), SDS((), jnp.float32),
                                   SDS((4,), jnp.int32)])
def test_bad_sinks(sinks):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="sinks"):
        jax.jit(lambda q, k, v, s: jax_fa4.attention(q, k, v, sinks=s)).trace(q, k, v, sinks)


@pytest.mark.parametrize("impl", ["triton", "FA4", "", "pallas"])
def test_unknown_implementation(impl):
    with pytest.raises(ValueError, match="implementation"):
        trace(*qkv(), implementation=impl)


@pytest.mark.parametrize("is_causal", [1, "yes", None])
def test_is_causal_must_be_bool(is_causal):
    with pytest.raises(ValueError, match="is_causal"):
        trace(*qkv(), is_causal=is_causal)


# ----------------------------------------------------------------------------
# implementation=
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("h", [260, 12, 4])
def test_fa4_unsupported_head_dim(h):
    with pytest.raises(NotImplementedError, match=f"head_dim {h}"):
        trace(*qkv(h=h), implementation="fa4")


@pytest.mark.parametrize("kw,words", [
    ({"dtype": jnp.float32}, "dtype float32"),
])
def test_fa4_unsupported_dtype(kw, words):
    with pytest.raises(NotImplementedError, match=words):
        trace(*qkv(**kw), implementation="fa4")


def test_fa4_with_bias_or_mask():
    q, k, v = qkv()
    bias = SDS((2, 4, 16, 16), BF16)
    mask = SDS((2, 4, 16, 16), jnp.bool_)
    with pytest.raises(NotImplementedError, match="bias"):
        jax.jit(lambda q, k, v, b: jax_fa4.attention(q, k, v, b, implementation="fa4")).trace(
            q, k, v, bias)
    with pytest.raises(NotImplementedError, match="mask"):
        jax.jit(lambda q, k, v, m: jax_fa4.attention(q, k, v, mask=m, implementation="fa4")
                ).trace(q, k, v, mask)


def test_fa4_causal_with_fewer_queries_than_keys():
    with pytest.raises(NotImplementedError, match="seq_q=16 and seq_k=32"):
        trace(*qkv(t=16, s=32), is_causal=True, implementation="fa4")


def test_fa4_on_cpu_fails_at_lowering_mentioning_sm90():
    q, k, v = qkv()
    traced = trace(q, k, v, implementation="fa4")  # tracing is fine: the kernel could run
    with pytest.raises(NotImplementedError, match="SM90"):
        traced.lower(lowering_platforms=("cpu",))
    with jax.default_device(jax.devices("cpu")[0]):
        with pytest.raises(NotImplementedError, match="SM90"):
            jax_fa4.attention(*(jnp.ones(x.shape, x.dtype) for x in (q, k, v)),
                              implementation="fa4")


@pytest.mark.parametrize("kw", [{"logits_soft_cap": 10.0},
                                {"sinks": SDS((4,), jnp.float32)}])
def test_cudnn_cannot_apply_softcap_or_sinks(kw):
    q, k, v = qkv()
    sinks = kw.pop("sinks", None)

    def f(q, k, v, sinks):
        return jax_fa4.attention(q, k, v, sinks=sinks, implementation="cudnn", **kw)

    with pytest.raises(NotImplementedError, match="cudnn"):
        jax.jit(f).trace(q, k, v, sinks)


def test_cudnn_with_value_head_dim_different():
    with pytest.raises(NotImplementedError, match="cudnn"):
        trace(*qkv(hv=32), implementation="cudnn")


def test_explain_validates_too():
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        jax_fa4.explain(*qkv(n=3, kh=2))
    with pytest.raises(ValueError, match="logits_soft_cap"):
        jax_fa4.explain(*qkv(), logits_soft_cap=-1.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int32, jnp.float16])
def test_non_bool_mask_is_rejected_like_jax_nn(dtype):
    """An additive 0/-inf (or int) mask must not be read as 'nonzero = visible'."""
    q = jnp.ones((1, 8, 2, 64), jnp.float16)
    mask = jnp.zeros((1, 1, 8, 8), dtype)
    for kw in ({}, {"return_residual": True}, {"implementation": "xla"}):
        with pytest.raises(ValueError, match="mask dtype should be bool"):
            jax_fa4.attention(q, q, q, mask=mask, **kw)
    with pytest.raises(ValueError, match="mask dtype should be bool"):
        jax_fa4.explain(q, q, q, mask=mask)


@pytest.mark.parametrize("what", ["head_dim", "value_head_dim", "kv_heads"])
@pytest.mark.parametrize("fn", ["varlen_attention", "paged_attention"])
def test_zero_heads_and_head_dims_in_varlen_and_paged(fn, what):
    """Zero key/value heads or a zero head dim: ValueError at trace time (a zero head
    dim was a ZeroDivisionError in the default scale before 2026-12-08)."""
    h, hv, kh = {"head_dim": (0, 0, 2), "value_head_dim": (64, 0, 2), "kv_heads": (64, 64, 0)}[what]
    i32 = lambda *s: SDS(s, jnp.int32)  # noqa: E731
    if fn == "varlen_attention":
        args = (SDS((16, 4, h), BF16), SDS((16, kh, h), BF16), SDS((16, kh, hv), BF16),
                i32(3), i32(3))
        f = functools.partial(jax_fa4.varlen_attention, max_seqlen_q=8, max_seqlen_k=8)
    else:
        args = (SDS((2, 1, 4, h), BF16), SDS((4, 16, kh, h), BF16), SDS((4, 16, kh, hv), BF16),
                i32(2, 2), i32(2))
        f = jax_fa4.paged_attention
    with pytest.raises(ValueError, match="head dims must be >= 1|at least one head"):
        jax.jit(f).trace(*args)
