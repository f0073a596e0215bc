"""Public entry points for dense attention: validate (validate.py), route (dispatch.py),
carry the route out (execute.py)."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import execute, validate
from .device import platform_reason
from .dispatch import DenseCall, Unsupported, plan_backward, route_dense


class _Call(NamedTuple):
    """A validated `attention` call in the 4-D layout and its static description."""
    q: object
    k: object
    v: object
    bias: object
    mask: object
    sinks: object
    q_len: object
    kv_len: object
    scale: object  # a float, or a tracer
    softcap: float | None
    window: tuple
    static: DenseCall


def _batched(x):
    """x with a leading batch axis of 1 (an array or a ShapeDtypeStruct)."""
    if x is None or isinstance(x, jax.ShapeDtypeStruct):
        return x if x is None else jax.ShapeDtypeStruct((1,) + x.shape, x.dtype)
    return jnp.asarray(x)[None]


def _prepare(query, key, value, bias, mask, scale, is_causal, local_window_size,
             logits_soft_cap, sinks, implementation, query_seq_lengths,
             key_value_seq_lengths) -> _Call:
    """What `attention` and `explain` both start from: every argument validated, 3-D
    inputs given their batch axis, the call's static description for route_dense."""
    q, k, v, sinks, scale, softcap, window = validate.attention_args(
        query, key, value, scale, is_causal, local_window_size, logits_soft_cap, sinks,
        implementation)
    mask = validate.mask(mask)
    if q.ndim == 3:
        q, k, v, bias, mask = map(_batched, (q, k, v, bias, mask))
    b, t, n, h = q.shape
    q_len = validate.seq_lengths(query_seq_lengths, "query_seq_lengths", b)
    kv_len = validate.seq_lengths(key_value_seq_lengths, "key_value_seq_lengths", b)
    static = DenseCall(
        dtype=np.dtype(q.dtype).name, batch=b, seq_q=t, seq_k=k.shape[1], heads_q=n,
        heads_k=k.shape[2], head_dim=h, head_dim_v=v.shape[-1], window=window,
        softcap=softcap, has_sinks=sinks is not None, has_bias=bias is not None,
        has_mask=mask is not None, q_lengths=q_len is not None,
        kv_lengths=kv_len is not None, traced_scale=validate.traced(scale))
    return _Call(q, k, v, bias, mask, sinks, q_len, kv_len, scale, softcap, window, static)


def attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
              query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
              logits_soft_cap=None, sinks=None, implementation=None, return_residual=False,
              return_lse=False, deterministic=False):
    """Scaled dot-product attention, FA4's SM90 kernel where it can run.

    `jax.nn.dot_product_attention`'s arguments, layout and results: query (B, T, N, H),
    key (B, S, K, H), value (B, S, K, Hv) (or without B), N a multiple of K (GQA/MQA);
    a bool `mask` (True = visible) and an additive `bias` broadcastable to (B, N, T, S);
    causal masks and `local_window_size=(left, right)` (ints taken literally, as jax.nn)
    align query i with key i (top-left); `query_seq_lengths` / `key_value_seq_lengths`
    (int32 (B,)) pad each sequence (lengths past the padded shape mean all of it).
    Extras: `logits_soft_cap` c gives logits c * tanh(scale * q.k / c); `sinks` (N,)
    adds per-head sink logits to each softmax denominator (gpt-oss style), in units of
    the scaled logits.

    Rows that see no key (padded query rows, or every key masked, padded or outside
    the window) give zeros and lse -inf on every path (jax.nn's XLA path gives the
    mean of V there; docs/DESIGN.md).

    implementation: None picks FA4 on CUDA SM90 devices when the call is supported, else
    `jax.nn.dot_product_attention`; 'fa4' insists (NotImplementedError saying why it
    can't); 'cudnn' / 'xla' pass through to jax.nn ('xla' with softcap or sinks uses
    jax_fa4's pure-JAX attention).

    return_residual: also return jax.nn's residual, the log-sum-exp of each softmax row
    (B, T, N) in the input dtype, without gradient.  return_lse: also return it in
    float32 and differentiable (natural log; both include the sink term).

    deterministic: gradients with the same bits on every run.  FA4's backward then
    adds into dQ (and, for GQA, dK/dV) in a fixed order behind semaphores (slower);
    the pure-JAX and jax.nn XLA backwards are deterministic already.  The forward is
    unchanged.  (implementation='cudnn': cuDNN's backward follows XLA's
    --xla_gpu_exclude_nondeterministic_ops, not this flag.)
    """
    validate.residual_flags(return_residual, return_lse)
    deterministic = validate.flag(deterministic, "deterministic")
    c = _prepare(query, key, value, bias, mask, scale, is_causal, local_window_size,
                 logits_soft_cap, sinks, implementation, query_seq_lengths,
                 key_value_seq_lengths)
    route = route_dense(c.static, implementation, wants_lse=return_lse)
    o, lse = execute.dense(route, c.q, c.k, c.v, c.bias, c.mask, c.sinks, c.q_len, c.kv_len,
                           scale=c.scale, window=c.window, softcap=c.softcap,
                           forced=implementation == "fa4", deterministic=deterministic)
    if jnp.ndim(query) == 3:
        o, lse = o[0], lse[0]
    if return_residual:
        return o, jax.lax.stop_gradient(lse).astype(o.dtype)
    return (o, lse) if return_lse else o


def _route(query, key, value, bias, mask, scale, is_causal, local_window_size,
           logits_soft_cap, sinks, query_seq_lengths=None, key_value_seq_lengths=None):
    """The route `attention(...)` with implementation=None takes (arrays or
    ShapeDtypeStructs)."""
    return route_dense(_prepare(query, key, value, bias, mask, scale, is_causal,
                                local_window_size, logits_soft_cap, sinks, None,
                                query_seq_lengths, key_value_seq_lengths).static)


def explain(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
            query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
            logits_soft_cap=None, sinks=None, platform=None, backward=False):
    """Why `attention(...)` with these arguments would not run the FA4 kernel, or None
    if it would.  Arguments may be arrays or jax.ShapeDtypeStruct.  platform: where it
    would run ('cuda', 'cpu', ...); default: JAX's default backend.  backward=True: why
    its gradient would not run FA4's SM90 backward kernel (the reason starts with
    'backward: ' when only the backward falls back to pure JAX), or None."""
    route = _route(query, key, value, bias, mask, scale, is_causal, local_window_size,
                   logits_soft_cap, sinks, query_seq_lengths, key_value_seq_lengths)
    return explain_route(route, platform=platform, backward=backward)


def explain_route(route, *, platform=None, backward=False) -> str | None:
    """Why a route does not run the kernel (or, with backward, FA4's backward), or None."""
    if route.path != "kernel":
        return route.reason
    if backward:
        try:
            backward_reason(route.plan)
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
                query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
                logits_soft_cap=None, sinks=None):
    """The kernel variant (and runtime window arguments) `attention(...)` would use on
    an SM90 GPU; raises dispatch.Unsupported with the reason if it would fall back.
    Needs no GPU and no compiler: used by `python -m jax_fa4.precompile`."""
    route = _route(query, key, value, bias, mask, scale, is_causal, local_window_size,
                   logits_soft_cap, sinks, query_seq_lengths, key_value_seq_lengths)
    if route.path != "kernel":
        raise Unsupported(route.reason)
    return route.plan
