"""The `jax_fa4_fwd` primitive: abstract eval, per-platform lowering, batching.

Operands follow the kernel ABI (kernels/forward_abi.py): q, k, v, then the optional
int32 metadata (cu_seqlens, seqused, page table) and sinks.  Outputs are
(out, lse float32): lse is (B, N, T) for dense q and (N, total_q) for packed q.

On CUDA with an SM90 device the lowering emits one `stablehlo.custom_call` to the
FFI handler with the kernel object as an attribute; on every other platform (and on
CUDA devices that are not SM90) it lowers the pure-JAX fallback.  Choosing at
lowering time lets one jitted function run on CPU and on H100, and keeps kernel
compilation (which needs the CuTe DSL) out of CPU-only runs.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from jax.extend import core
from jax.interpreters import batching, mlir

from . import fallback_forward, sharding, split_primitive
from .device import device_reason
from .dispatch import KernelPlan
from .ffi_target import TARGET, call_attributes, ensure_registered
from .kernels import MissingKernelError, get_object
from .kernels.forward_abi import operands, size_dims


@dataclasses.dataclass(frozen=True)
class FwdParams:
    """Static parameters of one forward call (hashable: a primitive parameter).

    kind: 'dense' (attention), 'varlen' or 'paged'.  window: for 'dense' jax.nn's
    top-left convention, else FA's bottom-right one (None = unbounded); the plan holds
    the kernel's own bounds.  max_seqlen_q/k: static bounds for the fallback.
    deterministic: the gradient's backward kernel runs FA4's deterministic schedule
    (the forward is deterministic anyway; this rides here to reach the custom_vjp)."""

    kind: str
    plan: KernelPlan
    scale: float
    window: tuple[int | None, int | None]
    softcap: float | None
    forced: bool  # implementation='fa4': never fall back silently
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None
    deterministic: bool = False


fa4_fwd_p = core.Primitive("jax_fa4_fwd")
fa4_fwd_p.multiple_results = True


def fa4_forward(args: dict, params: FwdParams):
    """Binds the primitive; `args` maps forward_abi operand names to arrays."""
    ordered = [args[name] for name, _ in operands(params.plan.variant)]
    return tuple(fa4_fwd_p.bind(*ordered, params=params))


def _impl(*args, params):
    return jax.jit(functools.partial(fa4_fwd_p.bind, params=params))(*args)


def _abstract_eval(q, k, v, *rest, params):
    out = jax.core.ShapedArray(q.shape[:-1] + (v.shape[-1],), q.dtype)
    if q.ndim == 4:
        b, t, n, _ = q.shape
        lse = jax.core.ShapedArray((b, n, t), jnp.float32)
    else:
        lse = jax.core.ShapedArray((q.shape[1], q.shape[0]), jnp.float32)
    return out, lse


def _fallback(*args, params: FwdParams, platform: str):
    a = dict(zip((n for n, _ in operands(params.plan.variant)), args))
    return fallback_forward.run(params.kind, a, scale=params.scale, window=params.window,
                        softcap=params.softcap, max_seqlen_q=params.max_seqlen_q,
                        max_seqlen_k=params.max_seqlen_k, platform=platform)


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


def kernel_object(variant) -> tuple[bytes | None, str | None]:
    """(object, None) where the CUDA lowering can emit the custom call for `variant`
    (an SM90 device, the object cached or compilable), else (None, why not)."""
    if (reason := device_reason()) is not None:
        return None, reason
    try:
        return get_object(variant), None
    except MissingKernelError as e:
        return None, str(e)


def _lower_cuda(ctx, *args, params: FwdParams):
    plan = params.plan
    obj, reason = kernel_object(plan.kernel_variant)
    if reason is not None:
        if params.forced:
            raise NotImplementedError(f"jax_fa4: implementation='fa4' cannot run: {reason}")
        warnings.warn(f"jax_fa4: falling back to pure JAX attention: {reason}", stacklevel=2)
        return _lower_fallback(ctx, *args, params=params, platform="cuda")
    if plan.num_splits > 1:
        return split_primitive.lower(ctx, *args, params=params, obj=obj)
    return jax.ffi.ffi_lowering(TARGET)(
        ctx, *args, **call_attributes(obj, plan.variant.symbol, size_dims(plan.variant),
                                      [plan.window_left, plan.window_right], [params.scale]))


def _partitions_default(params: FwdParams) -> bool:
    """Whether a multi-device lowering off CUDA goes through the partitioning rule:
    unless implementation='fa4' was forced, which _lower_default refuses as is."""
    return not params.forced


def _partitions_cuda(params: FwdParams) -> bool:
    """Whether a multi-device CUDA lowering goes through the partitioning rule: where
    _lower_cuda emits the custom call (else it falls back or raises as is)."""
    return kernel_object(params.plan.kernel_variant)[1] is None


def mapped_axis_first(x, d, size):
    """The mapped axis first; an unmapped operand is broadcast."""
    return jnp.broadcast_to(x, (size,) + x.shape) if d is None else jnp.moveaxis(x, d, 0)


def _batch(args, dims, *, params: FwdParams):
    """vmap rule: one kernel launch for the whole mapped batch, except where sinks are
    mapped together with what folds into batch (they are per head): one call per map
    entry then."""
    names = [n for n, _ in operands(params.plan.variant)]
    d = dict(zip(names, dims))
    sinks_mapped = d.get("sinks") is not None
    if sinks_mapped and (params.kind != "dense" or any(
            d.get(n) is not None for n in ("seqused_q", "seqused_k"))):
        return per_map_entry(fa4_fwd_p, args, dims, params)
    if params.kind != "dense":
        return _batch_varlen(args, dims, params)
    return _batch_dense(args, dims, params)


def per_map_entry(primitive, args, dims, params):
    """The vmap rule for mappings no single launch expresses (the forward's and the
    backward's): one call of `primitive` per map entry (lax.map: one custom call in a
    loop).  Unmapped operands (a shared page pool) are passed as they are, never
    broadcast.  Returns (outputs, out_dims) as a batching rule does."""
    mapped = [i for i, d in enumerate(dims) if d is not None]

    def one(xs):
        full = list(args)
        for i, x in zip(mapped, xs):
            full[i] = x
        return tuple(primitive.bind(*full, params=params))

    outs = jax.lax.map(one, [jnp.moveaxis(args[i], dims[i], 0) for i in mapped])
    return outs, (0,) * len(outs)


def _batch_dense(args, dims, params: FwdParams):
    """Dense: fold the mapped axis into batch (with the sequence lengths), or into heads
    when sinks are mapped (sinks are per head; _batch sends mapped sinks with mapped
    lengths to per_map_entry)."""
    names = [n for n, _ in operands(params.plan.variant)]
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    front = functools.partial(mapped_axis_first, size=size)
    a = dict(zip(names, args))
    d = dict(zip(names, dims))
    q, k, v = (front(a[n], d[n]) for n in ("q", "k", "v"))
    lengths = [n for n in ("seqused_q", "seqused_k") if n in a]
    if "sinks" not in a or d["sinks"] is None:
        fold = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731
        out = dict(q=fold(q), k=fold(k), v=fold(v))
        out.update({n: fold(front(a[n], d[n])) for n in lengths})
        if "sinks" in a:
            out["sinks"] = a["sinks"]
        o, lse = fa4_forward(out, params)
        return (o.reshape((size, -1) + o.shape[1:]),
                lse.reshape((size, -1) + lse.shape[1:])), (0, 0)
    # (V, B, T, N, H) -> (B, T, V*N, H): head v*N + n still maps to kv head v*K + n//G.
    heads = lambda x: jnp.moveaxis(x, 0, 2).reshape(x.shape[1:3] + (-1, x.shape[-1]))  # noqa: E731
    out = dict(q=heads(q), k=heads(k), v=heads(v), sinks=front(a["sinks"], d["sinks"]).reshape(-1))
    out.update({n: a[n] for n in lengths})
    o, lse = fa4_forward(out, params)
    b, t = o.shape[:2]
    o = jnp.moveaxis(o.reshape(b, t, size, -1, o.shape[-1]), 2, 0)
    lse = jnp.moveaxis(lse.reshape(b, size, -1, t), 1, 0)
    return (o, lse), (0, 0)


def _merge_cu(cu, used, total):
    """(V, B+1) cu_seqlens over V packed blocks of `total` rows -> cu_seqlens (V*B+1,) of
    the concatenated rows and the matching seqused (V*B,): each sequence keeps its rows
    and used length; the padding rows of a block belong to no sequence."""
    v, b1 = cu.shape
    starts = (cu[:, :-1] + total * jnp.arange(v, dtype=cu.dtype)[:, None]).reshape(-1)
    return jnp.concatenate([starts, jnp.full((1,), v * total, cu.dtype)]), used.reshape(-1)


def _batch_varlen(args, dims, params: FwdParams):
    """varlen / paged: the mapped axis becomes more sequences.  Packed rows are
    concatenated (cu_seqlens shifted, lengths passed as seqused); dense q, page tables
    and lengths fold into batch; mapped caches are concatenated into one pool with
    the page tables shifted accordingly."""
    v = params.plan.variant
    names = [n for n, _ in operands(v)]
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    a = {n: mapped_axis_first(x, d, size)
         for n, x, d in zip(names, args, dims) if n != "sinks"}
    out = {"sinks": args[names.index("sinks")]} if "sinks" in names else {}
    fold = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731
    new_v = {}
    for side in ("q", "k"):  # packed rows: more sequences
        if (v.q_layout if side == "q" else v.kv_layout) == "packed":
            cu = a[f"cu_seqlens_{side}"]
            used = a.get(f"seqused_{side}", cu[:, 1:] - cu[:, :-1])
            out[f"cu_seqlens_{side}"], out[f"seqused_{side}"] = _merge_cu(
                cu, used, a[side].shape[1])
            new_v[f"has_seqused_{side}"] = True
    out["q"] = fold(a["q"])
    if v.kv_layout == "packed":
        out["k"], out["v"] = fold(a["k"]), fold(a["v"])
    elif v.kv_layout == "paged":
        pages = a["k"].shape[1]
        shift = pages * jnp.arange(size, dtype=jnp.int32)[:, None, None]
        caches_mapped = any(dims[names.index(n)] is not None for n in ("k", "v"))
        out["page_table"] = fold(a["page_table"] + shift if caches_mapped else a["page_table"])
        out["seqused_k"] = fold(a["seqused_k"])
        if caches_mapped:
            out["k"], out["v"] = fold(a["k"]), fold(a["v"])
        else:  # one shared pool: no copies
            out["k"], out["v"] = args[names.index("k")], args[names.index("v")]
    if new_v:
        plan = dataclasses.replace(params.plan,
                                   variant=dataclasses.replace(v, **new_v))
        params = dataclasses.replace(params, plan=plan)
    o, lse = fa4_forward(out, params)
    o = o.reshape((size, -1) + o.shape[1:])
    if v.q_layout == "packed":  # lse (N, V*total) -> (V, N, total)
        lse = jnp.moveaxis(lse.reshape(lse.shape[0], size, -1), 1, 0)
    else:  # (V*B, N, T) -> (V, B, N, T)
        lse = lse.reshape((size, -1) + lse.shape[1:])
    return (o, lse), (0, 0)


# ----------------------------------------------------------------------------
# Registration: everything JAX needs to know about the primitive, in one place (as
# JAX's cuDNN attention does in jax/_src/cudnn/fused_attention_stablehlo.py).
# ----------------------------------------------------------------------------

fa4_fwd_p.def_impl(_impl)
fa4_fwd_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[fa4_fwd_p] = _batch
# The FFI handler is registered at import, not at lowering, so deserialized
# (jax.export) executables find it too.  Registering the CUDA target also works on
# CPU-only jaxlib.
ensure_registered()
# Each lowering is registered once, wrapped by the multi-device partitioning rule
# (sharding.py; sharding.set_enabled turns it off and on at lowering time).
mlir.register_lowering(fa4_fwd_p, sharding.forward_lowering(
    fa4_fwd_p, _lower_default, _partitions_default))
mlir.register_lowering(fa4_fwd_p, sharding.forward_lowering(
    fa4_fwd_p, _lower_cuda, _partitions_cuda), platform="cuda")
