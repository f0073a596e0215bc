"""The `jax_fa4_fwd` primitive: abstract eval, per-platform lowering, batching.

Outputs are (out (B,T,N,Hv), lse (B,N,T) float32).  On CUDA with an SM90 device
the lowering emits one `stablehlo.custom_call` to the FFI handler with the kernel
object as an attribute; on every other platform (and on CUDA devices that are not
SM90) it lowers the pure-JAX fallback.  Choosing at lowering time lets one jitted
function run on CPU and on H100, and keeps kernel compilation (which needs the
CuTe DSL) out of CPU-only runs.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core
from jax.interpreters import batching, mlir

from . import fallback
from .dispatch import KernelPlan, device_reason
from .ffi_target import TARGET, ensure_registered
from .kernels import MissingKernelError, get_object

logger = logging.getLogger("jax_fa4")


@dataclasses.dataclass(frozen=True)
class FwdParams:
    """Static parameters of one forward call (hashable: a primitive parameter)."""

    plan: KernelPlan
    scale: float
    window: tuple[int | None, int | None]  # top-left (jax.nn) convention, for the fallback
    softcap: float | None
    forced: bool  # implementation='fa4': never fall back silently


fa4_fwd_p = core.Primitive("jax_fa4_fwd")
fa4_fwd_p.multiple_results = True


def fa4_forward(q, k, v, sinks, params: FwdParams):
    args = (q, k, v) if sinks is None else (q, k, v, sinks)
    return tuple(fa4_fwd_p.bind(*args, params=params))


@fa4_fwd_p.def_impl
def _impl(*args, params):
    return jax.jit(functools.partial(fa4_fwd_p.bind, params=params))(*args)


@fa4_fwd_p.def_abstract_eval
def _abstract_eval(q, k, v, *sinks, params):
    b, t, n, _ = q.shape
    hv = v.shape[-1]
    return (
        jax.core.ShapedArray((b, t, n, hv), q.dtype),
        jax.core.ShapedArray((b, n, t), jnp.float32),
    )


def _fallback(q, k, v, *sinks, params: FwdParams, platform: str):
    return fallback.dense_fallback(
        q, k, v, sinks[0] if sinks else None,
        scale=params.scale, window=params.window, softcap=params.softcap,
        implementation="cudnn-if-possible" if platform == "cuda" else None,
    )


def _lower_fallback(ctx, *args, params: FwdParams, platform: str):
    return mlir.lower_fun(
        functools.partial(_fallback, params=params, platform=platform), multiple_results=True
    )(ctx, *args)


def _lower_default(ctx, *args, params: FwdParams):
    platforms = ctx.module_context.platforms
    if params.forced:
        raise NotImplementedError(
            f"jax_fa4: implementation='fa4' needs a CUDA SM90 device; lowering for {platforms}"
        )
    return _lower_fallback(ctx, *args, params=params, platform=platforms[0])


def _lower_cuda(ctx, *args, params: FwdParams):
    plan = params.plan
    reason = device_reason()
    obj = None
    if reason is None:
        try:
            obj = get_object(plan.variant)
        except MissingKernelError as e:
            reason = str(e)
    if reason is not None:
        if params.forced:
            raise NotImplementedError(f"jax_fa4: implementation='fa4' cannot run: {reason}")
        warnings.warn(f"jax_fa4: falling back to jax.nn.dot_product_attention: {reason}",
                      stacklevel=2)
        return _lower_fallback(ctx, *args, params=params, platform="cuda")
    from .kernels.forward_abi import SIZE_DIMS

    return jax.ffi.ffi_lowering(TARGET)(
        ctx,
        *args,
        object=np.frombuffer(obj, dtype=np.uint8),
        symbol=plan.variant.symbol,
        size_dims=np.asarray(SIZE_DIMS, dtype=np.int64).reshape(-1),
        i32_scalars=np.asarray([plan.window_left, plan.window_right], dtype=np.int32),
        f32_scalars=np.asarray([params.scale], dtype=np.float32),
    )


# Registered at import, not at lowering, so deserialized (jax.export) executables
# find the handler too.  Registering the CUDA target also works on CPU-only jaxlib.
ensure_registered()
mlir.register_lowering(fa4_fwd_p, _lower_default)
mlir.register_lowering(fa4_fwd_p, _lower_cuda, platform="cuda")


def _batch(args, dims, *, params: FwdParams):
    """vmap: fold the mapped axis into batch, or into heads when sinks are mapped
    (sinks are per head).  Either way it is one kernel launch."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)

    def front(x, d):  # mapped axis first; unmapped operands are broadcast
        return jnp.broadcast_to(x, (size,) + x.shape) if d is None else jnp.moveaxis(x, d, 0)

    q, k, v = (front(a, d) for a, d in zip(args[:3], dims[:3]))
    sinks = args[3] if len(args) > 3 else None
    if sinks is None or dims[3] is None:
        fold = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731
        o, lse = fa4_forward(fold(q), fold(k), fold(v), sinks, params)
        return (o.reshape((size, -1) + o.shape[1:]),
                lse.reshape((size, -1) + lse.shape[1:])), (0, 0)
    # (V, B, T, N, H) -> (B, T, V*N, H): head v*N + n still maps to kv head v*K + n//G.
    heads = lambda x: jnp.moveaxis(x, 0, 2).reshape(x.shape[1:3] + (-1, x.shape[-1]))  # noqa: E731
    o, lse = fa4_forward(heads(q), heads(k), heads(v), front(sinks, dims[3]).reshape(-1), params)
    b, t = o.shape[:2]
    o = jnp.moveaxis(o.reshape(b, t, size, -1, o.shape[-1]), 2, 0)
    lse = jnp.moveaxis(lse.reshape(b, size, -1, t), 1, 0)
    return (o, lse), (0, 0)


batching.primitive_batchers[fa4_fwd_p] = _batch
