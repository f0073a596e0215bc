"""The `jax_fa4_bwd` primitive: FA4's SM90 backward as one custom call.

Operands follow kernels/backward_abi.py (q, k, v, o, do, lse, dlse, then the int32
metadata and sinks of the forward call); results are dq, dk, dv (and dsinks).  The
CUDA lowering adds FA4's workspaces (float32 sums; int32 semaphores for a
deterministic backward) as extra results of the custom call, so XLA allocates them
(and may reuse their memory after the call); they never reach JAX.  Every other
platform, and a CUDA device without the kernel, lowers the pure-JAX backward of
fallback_backward.py.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from jax.extend import core
from jax.interpreters import batching, mlir

from . import fallback_backward, sharding
from .layout import packed_rows
from .dispatch import BackwardPlan, Unsupported, plan_backward
from .ffi_target import TARGET, call_attributes, ensure_registered
from .kernels.backward_abi import (gradient_names, operands, size_dims, workspace_dtype,
                                   workspace_shapes)
from .forward_primitive import FwdParams, kernel_object, mapped_axis_first, per_map_entry


@dataclasses.dataclass(frozen=True)
class BwdParams:
    fwd: FwdParams  # the forward call (kind, scale, window, softcap for the fallback)
    plan: BackwardPlan


fa4_bwd_p = core.Primitive("jax_fa4_bwd")
fa4_bwd_p.multiple_results = True

_GRAD_OF = {"dq": "q", "dk": "k", "dv": "v", "dsinks": "sinks"}


def gradients(args: dict, o, lse, do, dlse, fwd: FwdParams) -> dict:
    """Gradients of a forward call with operands `args` (forward_abi names): name ->
    cotangent of each float operand.  FA4's backward where it runs, else pure JAX
    (which needs nothing for fwd.deterministic: it has no atomics, see _pure_jax)."""
    try:
        plan = plan_backward(fwd.plan, fwd.deterministic)
    except Unsupported:
        return _pure_jax(args, o, lse, do, dlse, fwd)
    params = BwdParams(fwd, plan)
    vals = dict(args, o=o, lse=lse, do=do, dlse=dlse)
    outs = fa4_bwd_p.bind(*(vals[n] for n, _ in operands(plan.variant)), params=params)
    grads = {_GRAD_OF[n]: x for n, x in zip(gradient_names(plan.variant), outs)}
    if plan.variant.layout == "packed":
        _zero_rows_outside_sequences(grads, args)
    return grads


def _zero_rows_outside_sequences(grads: dict, a: dict) -> None:
    """Packed rows that belong to no sequence (past seqused, or after cu_seqlens[-1])
    get zero gradients; the kernels never visit them."""
    for side, names in (("q", ("q",)), ("k", ("k", "v"))):
        cu = a[f"cu_seqlens_{side}"]
        used = a.get(f"seqused_{side}", cu[1:] - cu[:-1])
        _, _, ok = packed_rows(cu, used, a[side].shape[0])
        for n in names:
            grads[n] = jnp.where(ok[:, None, None], grads[n], 0).astype(grads[n].dtype)


def _pure_jax(args, o, lse, do, dlse, fwd: FwdParams) -> dict:
    # Deterministic as it stands: XLA's GPU reductions and the scan's sums have a fixed
    # order for a compiled program; the one scatter (packed rows back from padded
    # blocks) adds exact zeros where rows repeat, so no order can change its bits.
    grads = fallback_backward.run(fwd.kind, args, o, lse, do, dlse, scale=fwd.scale,
                                  window=fwd.window, softcap=fwd.softcap,
                                  max_seqlen_q=fwd.max_seqlen_q, max_seqlen_k=fwd.max_seqlen_k)
    return {n: x for n, x in grads.items() if x is not None}


def _impl(*args, params):
    return jax.jit(functools.partial(fa4_bwd_p.bind, params=params))(*args)


def _abstract_eval(*args, params: BwdParams):
    a = dict(zip((n for n, _ in operands(params.plan.variant)), args))
    out = [jax.core.ShapedArray(a[n].shape, a[n].dtype) for n in ("q", "k", "v")]
    if "sinks" in a:
        out.append(jax.core.ShapedArray(a["sinks"].shape, jnp.float32))
    return out


def _fallback(*args, params: BwdParams):
    a = dict(zip((n for n, _ in operands(params.plan.variant)), args))
    o, lse, do, dlse = (a.pop(n) for n in ("o", "lse", "do", "dlse"))
    grads = _pure_jax(a, o, lse, do, dlse, params.fwd)
    return [grads[_GRAD_OF[n]] for n in gradient_names(params.plan.variant)]


def _lower_fallback(ctx, *args, params: BwdParams):
    return mlir.lower_fun(functools.partial(_fallback, params=params),
                          multiple_results=True)(ctx, *args)


def _lower_cuda(ctx, *args, params: BwdParams):
    v = params.plan.variant
    obj, reason = kernel_object(v)
    if reason is not None:
        if params.fwd.forced:
            raise NotImplementedError(f"jax_fa4: implementation='fa4' cannot run the "
                                      f"backward: {reason}")
        warnings.warn(f"jax_fa4: pure JAX attention backward: {reason}", stacklevel=2)
        return _lower_fallback(ctx, *args, params=params)
    a = dict(zip((n for n, _ in operands(v)), ctx.avals_in))
    batch = a["cu_seqlens_q"].shape[0] - 1 if v.layout == "packed" else a["q"].shape[0]
    ws = workspace_shapes(v, a["q"].shape, a["k"].shape, a["v"].shape, batch)
    ws_avals = [jax.core.ShapedArray(shape, workspace_dtype(name)) for name, shape in ws.items()]
    n_out = len(ctx.avals_out)
    outs = jax.ffi.ffi_lowering(TARGET)(
        ctx.replace(avals_out=[*ctx.avals_out, *ws_avals]),
        *args,
        **call_attributes(obj, v.symbol, size_dims(v),
                          [params.plan.window_left, params.plan.window_right],
                          [params.fwd.scale]),
    )
    return outs[:n_out]


def _partitions_default(params: BwdParams) -> bool:
    """Whether a multi-device lowering off CUDA goes through the partitioning rule:
    for dense attention (the rule's layout), unless implementation='fa4' was forced."""
    return params.fwd.kind == "dense" and not params.fwd.forced


def _partitions_cuda(params: BwdParams) -> bool:
    """Whether a multi-device CUDA lowering goes through the partitioning rule: for
    dense attention, where _lower_cuda emits the custom call."""
    return params.fwd.kind == "dense" and kernel_object(params.plan.variant)[1] is None


def _batch(args, dims, *, params: BwdParams):
    """vmap rule: dense calls without sinks fold the mapped axis into batch (one
    launch); the rest run one call per mapped element (d_sinks sums over the batch)."""
    v = params.plan.variant
    if v.layout != "dense" or v.has_sinks:
        outs, out_dims = per_map_entry(fa4_bwd_p, args, dims, params)
        return list(outs), list(out_dims)
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    front = [mapped_axis_first(a, d, size) for a, d in zip(args, dims)]
    outs = fa4_bwd_p.bind(*(x.reshape((-1,) + x.shape[2:]) for x in front), params=params)
    return [x.reshape((size, -1) + x.shape[1:]) for x in outs], [0] * len(outs)


# ----------------------------------------------------------------------------
# Registration, in one place (as forward_primitive.py does for the forward).
# ----------------------------------------------------------------------------

fa4_bwd_p.def_impl(_impl)
fa4_bwd_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[fa4_bwd_p] = _batch
ensure_registered()
# Each lowering is registered once, wrapped by the multi-device partitioning rule.
mlir.register_lowering(fa4_bwd_p, sharding.backward_lowering(
    fa4_bwd_p, _lower_fallback, _partitions_default))
mlir.register_lowering(fa4_bwd_p, sharding.backward_lowering(
    fa4_bwd_p, _lower_cuda, _partitions_cuda), platform="cuda")
