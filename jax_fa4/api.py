"""Public entry points: argument validation, then dispatch to the kernel or fallback."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from . import fallback, fallback_backward
from .dispatch import (BWD_MAX_HEAD_DIM, DenseCall, Unsupported, plan_backward, plan_dense,
                       platform_reason)
from .autodiff import fa4_call
from .primitive import FwdParams
from . import sharding  # noqa: F401  (multi-device jit: the primitive's partitioning rule)

_IMPLEMENTATIONS = (None, "fa4", "cudnn", "xla")


def _as_array(x, name):
    if x is None:
        raise ValueError(f"{name} must be an array, got None")
    return x if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) else jnp.asarray(x)


def _window(is_causal, local_window_size):
    """Normalizes is_causal and local_window_size to (left, right), None = unbounded
    (the alignment, top-left or bottom-right, is the caller's convention)."""
    if local_window_size is None:
        left = right = None
    else:
        if isinstance(local_window_size, (int, np.integer)):
            pair = (local_window_size, local_window_size)
        else:
            try:
                pair = tuple(local_window_size)
            except TypeError:
                pair = ()
            if len(pair) != 2:
                raise ValueError("local_window_size must be an int or a (left, right) pair, "
                                 f"got {local_window_size!r}")
        for w in pair:
            if not isinstance(w, (int, np.integer)) or isinstance(w, bool):
                raise ValueError(f"local_window_size entries must be ints, got {local_window_size!r}")
            if w < -1:
                raise ValueError(f"local_window_size entries must be >= -1 (-1 means unbounded), "
                                 f"got {local_window_size!r}")
        left, right = (None if w == -1 else int(w) for w in pair)
    if is_causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def _scalar(x, name, *, positive=False):
    if x is None:
        return None
    try:
        val = float(x)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(f"{name} must be a static Python number, got {x!r}") from e
    if not math.isfinite(val) or (positive and val <= 0):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {val}")
    return val


def _validate(query, key, value, bias, mask, scale, is_causal, local_window_size,
              logits_soft_cap, sinks, implementation):
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}")
    if not isinstance(is_causal, (bool, np.bool_)):
        raise ValueError(f"is_causal must be a bool, got {is_causal!r}")
    q, k, v = (_as_array(x, n) for x, n in ((query, "query"), (key, "key"), (value, "value")))
    if q.ndim not in (3, 4) or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError("query, key and value must all be 4-D (B, T, N, H) or all 3-D (T, N, H); "
                         f"got query {q.shape}, key {k.shape}, value {v.shape}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"key {k.shape} and value {v.shape} must agree in all but the last axis")
    if q.shape[:-3] != k.shape[:-3]:
        raise ValueError(f"query {q.shape} and key {k.shape} must have the same batch size")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"query head_dim {q.shape[-1]} must equal key head_dim {k.shape[-1]}")
    n, kh = q.shape[-2], k.shape[-2]
    if kh == 0 or n % kh:
        raise ValueError(f"query heads ({n}) must be a multiple of key/value heads ({kh})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"query, key and value must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"query/key/value must be floating point, got {q.dtype}")
    scale = _scalar(scale, "scale")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    softcap = _scalar(logits_soft_cap, "logits_soft_cap", positive=True)
    return q, k, v, _sinks(sinks, n), scale, softcap, _window(is_causal, local_window_size)


def _sinks(sinks, n):
    """Validated sinks of shape (n,), as float32 (what the kernel reads)."""
    if sinks is None:
        return None
    sinks = _as_array(sinks, "sinks")
    if sinks.shape != (n,) or not jnp.issubdtype(sinks.dtype, jnp.floating):
        raise ValueError(f"sinks must be a float array of shape (num_query_heads,) = ({n},), "
                         f"got {sinks.dtype}{list(sinks.shape)}")
    return sinks if isinstance(sinks, jax.ShapeDtypeStruct) else sinks.astype(jnp.float32)


def _describe(q, k, v, window, softcap, sinks, bias, mask) -> DenseCall:
    q4 = q.shape if q.ndim == 4 else (1,) + q.shape
    k4 = k.shape if k.ndim == 4 else (1,) + k.shape
    return DenseCall(
        dtype=np.dtype(q.dtype).name, batch=q4[0], seq_q=q4[1], seq_k=k4[1], heads_q=q4[2],
        heads_k=k4[2], head_dim=q4[3], head_dim_v=v.shape[-1], window=window, softcap=softcap,
        has_sinks=sinks is not None, has_bias=bias is not None, has_mask=mask is not None)


def attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
              local_window_size=None, logits_soft_cap=None, sinks=None, implementation=None,
              return_residual=False):
    """Scaled dot-product attention, FA4's SM90 kernel where it can run.

    Same layout and meaning as `jax.nn.dot_product_attention`: query (B, T, N, H),
    key (B, S, K, H), value (B, S, K, Hv) (or without B), N a multiple of K (GQA/MQA);
    causal masks and `local_window_size=(left, right)` align query i with key i
    (top-left), as jax.nn does.  Extras: `logits_soft_cap` c gives logits
    c * tanh(scale * q.k / c); `sinks` (N,) adds per-head sink logits to each softmax
    denominator (gpt-oss style), in units of the scaled logits.

    implementation: None picks FA4 on CUDA SM90 devices when the call is supported, else
    `jax.nn.dot_product_attention`; 'fa4' insists (NotImplementedError saying why it
    can't); 'cudnn' / 'xla' pass through to jax.nn ('xla' with softcap or sinks uses
    jax_fa4's pure-JAX attention).

    return_residual: also return the log-sum-exp of each softmax row, float32, shape
    (B, T, N) like jax.nn's residual (natural log; it includes the sink term).
    A row that sees no key gives zeros (lse -inf) on the FA4 path.
    """
    q, k, v, sinks, scale, softcap, window = _validate(
        query, key, value, bias, mask, scale, is_causal, local_window_size, logits_soft_cap,
        sinks, implementation)
    squeeze = q.ndim == 3
    if squeeze:
        q, k, v = q[None], k[None], v[None]

    def finish(o, lse_bnt):
        lse = jnp.swapaxes(lse_bnt, 1, 2)
        if squeeze:
            o, lse = o[0], lse[0]
        return (o, lse) if return_residual else o

    call = _describe(q, k, v, window, softcap, sinks, bias, mask)
    reason = None
    if implementation in (None, "fa4"):
        try:
            plan = plan_dense(call)
        except Unsupported as e:
            reason = str(e)
        if reason is None:
            params = FwdParams("dense", plan, scale, window, softcap,
                               forced=implementation == "fa4")
            args = dict(q=q, k=k, v=v) if sinks is None else dict(q=q, k=k, v=v, sinks=sinks)
            return finish(*fa4_call(args, params))
        if implementation == "fa4":
            raise NotImplementedError(f"jax_fa4: implementation='fa4' cannot run this call: {reason}")

    if bias is not None:
        bias = jnp.asarray(bias)
        bias = bias[None] if squeeze else bias
    if mask is not None:
        mask = jnp.asarray(mask)
        mask = mask[None] if squeeze else mask
    can_jax_nn = fallback.jax_nn_can_run(q, k, v, softcap=softcap, has_sinks=sinks is not None)
    is_c, local = fallback.jax_nn_window(window)
    nn_kwargs = dict(scale=scale, is_causal=is_c, local_window_size=local)
    if implementation in ("cudnn", "xla") and can_jax_nn:  # explicit pass-through
        out = jax.nn.dot_product_attention(q, k, v, bias, mask, implementation=implementation,
                                           return_residual=return_residual, **nn_kwargs)
        if not return_residual:
            return out[0] if squeeze else out
        o, res = out
        return (o[0], res[0].astype(jnp.float32)) if squeeze else (o, res.astype(jnp.float32))
    if implementation == "cudnn":
        raise NotImplementedError("implementation='cudnn' cannot apply logits_soft_cap, sinks "
                                  "or a value head_dim different from the key's")
    # Otherwise jax.nn (XLA) when it expresses the call.  return_residual takes jax_fa4's
    # own attention instead (jax.nn's residual is rounded to the input dtype and carries
    # no gradient), and so does float16 (jax.nn's F16_F16_F32 dot does not lower on CPU),
    # and so do head dims beyond the SM90 backward's (jax_fa4's has a chunked backward).
    if (can_jax_nn and not return_residual and q.dtype != jnp.float16
            and max(call.head_dim, call.head_dim_v) <= BWD_MAX_HEAD_DIM):
        o = jax.nn.dot_product_attention(q, k, v, bias, mask, **nn_kwargs)
        return o[0] if squeeze else o
    if bias is None and mask is None:  # gradient: the memory-frugal pure-JAX backward
        return finish(*fallback_backward.reference_attention(q, k, v, sinks, scale, window,
                                                             softcap))
    return finish(*fallback.reference_attention(
        q, k, v, sinks, scale=scale, window=window, softcap=softcap, bias=bias, mask=mask))


def explain(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
            local_window_size=None, logits_soft_cap=None, sinks=None, platform=None,
            backward=False):
    """Why `attention(...)` with these arguments would not run the FA4 kernel, or None
    if it would.  Arguments may be arrays or jax.ShapeDtypeStruct.  platform: where it
    would run ('cuda', 'cpu', ...); default: JAX's default backend.  backward=True: why
    its gradient would not run FA4's SM90 backward kernel (the reason starts with
    'backward: ' when only the backward falls back to pure JAX), or None."""
    q, k, v, sinks, scale, softcap, window = _validate(
        query, key, value, bias, mask, scale, is_causal, local_window_size, logits_soft_cap,
        sinks, None)
    if q.ndim == 3:
        q, k, v = (jax.ShapeDtypeStruct((1,) + x.shape, x.dtype) for x in (q, k, v))
    try:
        plan = plan_dense(_describe(q, k, v, window, softcap, sinks, bias, mask))
        if backward:
            backward_reason(plan)
    except Unsupported as e:
        return str(e)
    return platform_reason(platform)


def backward_reason(plan) -> None:
    """Raises Unsupported('backward: ...') if the forward `plan`'s gradient takes the
    pure-JAX backward."""
    try:
        plan_backward(plan)
    except Unsupported as e:
        raise Unsupported(f"backward: {e}") from None


def is_supported(*args, **kwargs) -> bool:
    """True if `attention(*args, **kwargs)` would run the FA4 kernel (see `explain`)."""
    return explain(*args, **kwargs) is None


def kernel_plan(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                local_window_size=None, logits_soft_cap=None, sinks=None):
    """The kernel variant (and runtime window arguments) `attention(...)` would use on
    an SM90 GPU; raises dispatch.Unsupported with the reason if it would fall back.
    Needs no GPU and no compiler: used by `python -m jax_fa4.precompile`."""
    q, k, v, sinks, scale, softcap, window = _validate(
        query, key, value, bias, mask, scale, is_causal, local_window_size, logits_soft_cap,
        sinks, None)
    if q.ndim == 3:
        q, k, v = (jax.ShapeDtypeStruct((1,) + x.shape, x.dtype) for x in (q, k, v))
    return plan_dense(_describe(q, k, v, window, softcap, sinks, bias, mask))
