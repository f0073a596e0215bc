"""Split-KV forward on CUDA, lowered in place of the primitive (so autodiff, vmap and
sharding rules see the same (out, lse) primitive as the unsplit path).

The split kernel (kernels/forward_split.py) writes one float32 workspace, a result XLA
allocates: lse_partial (S, B, N, Tq) (padded) then o_partial (S, B, N, Tq, Hv), each
split's softmax normalized over its own keys.  Normally the same custom call then runs
FA4's combine kernel, which writes out and lse: one custom call per decode step.

With attention sinks the call returns the workspace only and `combine` below merges in
JAX: it weighs split s by exp(lse_s - lse) with lse = log(sum_s exp(lse_s) + exp(sink)),
so the sink enters once, never in a split.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.interpreters import mlir

from . import validate
from .ffi_target import TARGET, call_attributes
from .kernels.forward_abi import operands, size_dims
from .kernels.split import fused_regions, lse_region, workspace_size


def combine(o_part, lse_part, sinks, dtype):
    """o_part (S, B, N, T, Hv) f32, lse_part (S, B, N, T) f32, sinks (N,) or None ->
    out (B, T, N, Hv) `dtype`, lse (B, N, T) f32.  Rows with no key and no sink give
    zeros and -inf."""
    m = jnp.max(lse_part, axis=0)
    if sinks is not None:
        sink = sinks.astype(jnp.float32)[None, :, None]
        m = jnp.maximum(m, sink)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse_part - m)
    den = jnp.sum(w, axis=0)
    if sinks is not None:
        den = den + jnp.exp(sink - m)
    o = jnp.sum(w[..., None] * o_part, axis=0)
    safe = jnp.where(den > 0, den, 1.0)
    o = jnp.where(den[..., None] > 0, o / safe[..., None], 0.0)
    lse = jnp.where(den > 0, m + jnp.log(safe), -jnp.inf)
    return jnp.swapaxes(o, 1, 2).astype(dtype), lse


def _forward(*args, params, obj: bytes):
    plan = params.plan
    a = dict(zip((n for n, _ in operands(plan.variant)), args))
    sv = plan.kernel_variant  # the split kernel, with the combine the plan chose
    q = a["q"]
    b, t, n, _ = q.shape
    hv = a["v"].shape[-1]
    # From the shapes lowered here: a shard's, or a vmap-folded batch's, not the plan's.
    s = plan.splits_for(b, a["k"].shape[-2])
    validate.split_grid(s, b)
    if "seqused_k" not in a:  # dense k/v: every key is used
        a["seqused_k"] = jnp.full((b,), a["k"].shape[1], jnp.int32)
    in_kernel = sv.combine == "fused"
    ws_shape = jax.ShapeDtypeStruct((workspace_size(b, n, t, hv, s, fused=in_kernel),),
                                    jnp.float32)
    out_shape = jax.ShapeDtypeStruct((b, t, n, hv), q.dtype)
    results = (ws_shape,)
    if in_kernel:  # the LSE is a workspace region (kernels/forward_split_fused.py)
        results = (out_shape, ws_shape)
    elif sv.fused_combine:
        results = (out_shape, jax.ShapeDtypeStruct((b, n, t), jnp.float32), ws_shape)
    res = jax.ffi.ffi_call(TARGET, results)(
        *(a[name] for name, _ in operands(sv.base)),
        **call_attributes(obj, sv.symbol, size_dims(sv.base),
                          [plan.window_left, plan.window_right, s], [params.scale]),
    )
    if in_kernel:  # XLA drops this slice when nothing reads the LSE
        at = fused_regions(b, n, t, hv, s)[0]
        return res[0], res[1][at: at + b * n * t].reshape(b, n, t)
    if sv.fused_combine:
        return res[0], res[1]
    ws = res[0]
    lse_part = ws[: s * b * n * t].reshape(s, b, n, t)
    o_part = ws[lse_region(b, n, t, s):].reshape(s, b, n, t, hv)
    return combine(o_part, lse_part, a.get("sinks"), q.dtype)


def lower(ctx, *args, params, obj: bytes):
    """Lowering of the primitive for a plan with num_splits > 1 (obj: the split
    kernel's object)."""
    return mlir.lower_fun(functools.partial(_forward, params=params, obj=obj),
                          multiple_results=True)(ctx, *args)
