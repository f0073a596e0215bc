"""Partitioning rules for the attention primitives: jit with batch- or head-sharded
q/k/v runs one call per shard, without all-gathers.

How: each primitive's module registers its lowerings once, wrapped by
`forward_lowering` / `backward_lowering` below (as JAX's cuDNN attention wraps its
lowering in custom_partitioning).  When `jax_fa4_fwd` is lowered into a jit
computation over several devices, the wrapped lowering emits a
`jax.experimental.custom_partitioning` call instead of the call itself.  XLA's
partitioner (Shardy, or GSPMD) then asks the rule below how to split it; the
per-shard computation binds the primitive again, with per-shard shapes, and lowers it
the usual way: the FA4 custom call on CUDA, the pure-JAX fallback elsewhere.  Doing
it at lowering time (not around the bind at trace time) keeps every transformation
working: vmap and the custom_vjp see the plain primitive, and only the lowered call
carries the partitioning.  This module imports neither primitive module: the
primitive to bind per shard comes in as an argument.

The rule (Shardy's `sharding_rule`; GSPMD's callbacks decide the same):

    q (b, t, k*g, h), k (b, s, k, h), v (b, s, k, d), sinks (k*g,)
        -> out (b, t, k*g, d), lse (b, k*g, t)

* batch `b` keeps the mesh axes it is sharded over in q (or, if q's batch is not
  sharded, in k), as far as they divide B;
* heads are sharded through the KV-head factor `k`: query head n uses KV head n // g,
  so a block of KV heads carries exactly its g query heads each (a GQA group never
  straddles shards).  The head axes of q (else k) are kept as far as they divide K,
  the KV head count, and are not batch axes;
* sequence (t, s) and head dims (h, d) are replicated: XLA undoes a sharding there
  (all-gathers) before the call, as it does for the part of a batch or head sharding
  that does not divide.  Sequence parallelism needs shard_map (e.g. ring attention).

varlen and paged attention follow the same rule: page tables and lengths shard with
the batch, the page pool with the KV heads (each shard reads its pages of its heads);
packed (cu_seqlens) layouts shard over heads only, since their rows mix sequences.

The backward primitive (`jax_fa4_bwd`, FA4's SM90 backward of dense attention) has
the same rule: q, k, v, o, dO, lse, dLSE, sinks -> dq, dk, dv, dsinks split by batch
and KV-head blocks (d_sinks, a sum over the batch, is summed across batch shards).

Not partitioned by the rule: the backward of varlen attention; calls in a partially manual
shard_map; jax.export (the rule is a callback of this process, so an exported module
keeps the plain call, which XLA replicates); lowerings without a device assignment.
Inside a fully manual shard_map the call is per shard already.  `set_enabled(False)`
turns the rule off, e.g. to lower against an AbstractMesh alone (see there).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax._src import dispatch as _jax_dispatch
from jax._src import sharding_impls as _sharding_impls
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec

from .kernels.forward_abi import operands

__all__ = ["backward_call_specs", "backward_lowering", "backward_shardy_rule", "call_specs",
           "forward_lowering", "set_enabled", "shardy_rule"]


@dataclasses.dataclass(frozen=True)
class _Call:
    """custom_partitioning's static argument: the primitive each shard binds again and
    its parameters.  The primitive travels here (not by import) so that this module
    needs neither primitive module; both fields are hashable, as static args must be."""

    primitive: object
    params: object


def _per_shard(call: _Call, *args):
    return tuple(call.primitive.bind(*args, params=call.params))


# One custom_partitioning per rule: the forward's (every entry point) and the
# backward's (dense attention).  Their callbacks follow "The rule" below.
_partitioned = custom_partitioning(_per_shard, static_argnums=(0,))
_bwd_partitioned = custom_partitioning(_per_shard, static_argnums=(0,))


# ----------------------------------------------------------------------------
# The rule
# ----------------------------------------------------------------------------

def _axes(entry) -> tuple[str, ...]:
    """A PartitionSpec entry as a tuple of mesh axis names."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _dims(arg) -> tuple[tuple[str, ...], ...]:
    """Mesh axes of each dimension of an argument (a ShapeDtypeStruct with .sharding)."""
    s = getattr(arg, "sharding", None)
    spec = tuple(s.spec) if isinstance(s, NamedSharding) else ()
    spec = spec + (None,) * (len(arg.shape) - len(spec))
    return tuple(_axes(e) for e in spec)


def _size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _entry(axes):
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def _divisible_prefix(mesh, axes, n, taken=()):
    """The longest leading part of `axes` that splits n evenly and uses no axis in
    `taken` (resharding to a leading part is a partial all-gather, no shuffle)."""
    for i in range(len(axes), 0, -1):
        head = axes[:i]
        if n % _size(mesh, head) == 0 and not set(head) & set(taken):
            return head
    return ()


def _batch_heads(mesh, q, k):
    """(batch, heads) mesh-axis entries of the per-shard call: the batch and head
    sharding of q (else of k), cut to the mesh axes that divide B and the KV head
    count K."""
    qd, kd = _dims(q), _dims(k)
    batch = _divisible_prefix(mesh, qd[0] or kd[0], q.shape[0])
    heads = _divisible_prefix(mesh, qd[2] or kd[2], k.shape[2], taken=batch)
    return _entry(batch), _entry(heads)


# Each operand's dimensions by role: "b" batch, "n" query heads, "k" KV heads, None
# replicated (sequence, head dim, page and offset dimensions).  Keyed by forward_abi
# operand name, then by rank where the layout changes it.
_ROLES = {
    "q": {4: ("b", None, "n", None), 3: (None, "n", None)},  # dense | packed
    "k": {4: ("b", None, "k", None), 3: (None, "k", None)},  # dense (or paged) | packed
    "cu_seqlens_q": {1: (None,)},
    "cu_seqlens_k": {1: (None,)},
    "seqused_q": {1: ("b",)},
    "seqused_k": {1: ("b",)},
    "page_table": {2: ("b", None)},
    "sinks": {1: ("n",)},
}
_ROLES["v"] = _ROLES["k"]
_DENSE = ("q", "k", "v", "sinks")


def _roles(name: str, rank: int, kind: str):
    if kind == "paged" and name in ("k", "v"):  # (pages, page_size, K, d): a shared pool
        return (None, None, "k", None)
    return _ROLES[name][rank]


def call_specs(mesh, arg_shapes, names=_DENSE, kind: str = "dense"):
    """(operand specs, (out spec, lse spec)) of the per-shard call for operands with
    these shardings (operands named as in forward_abi, in order): the batch and head
    sharding of q (else of k), cut to the mesh axes that divide B and the KV head
    count K; everything else replicated.  Batch is split only where every operand
    is per sequence or shared: dense q with dense or paged k/v (packed rows and
    cu_seqlens are offsets into the whole batch)."""
    a = dict(zip(names, arg_shapes))
    q, k = a["q"], a["k"]
    qd, kd = _dims(q), _dims(k)
    qroles, kroles = _roles("q", q.ndim, kind), _roles("k", k.ndim, kind)
    batch = ()
    if qroles[0] == "b" and "cu_seqlens_k" not in a:
        b_axes = qd[0] or (kd[0] if kroles[0] == "b" else ())
        batch = _divisible_prefix(mesh, b_axes, q.shape[0])
    hq, hk = qroles.index("n"), kroles.index("k")
    heads = _divisible_prefix(mesh, qd[hq] or kd[hk], k.shape[hk], taken=batch)
    entry = {"b": _entry(batch), "n": _entry(heads), "k": _entry(heads), None: None}
    ops = [PartitionSpec(*(entry[r] for r in _roles(n, x.ndim, kind)))
           for n, x in zip(names, arg_shapes)]
    out = ops[0]
    lse = PartitionSpec(entry["b"], entry["n"], None) if q.ndim == 4 else (
        PartitionSpec(entry["n"], None))
    return ops, (out, lse)


def backward_call_specs(mesh, arg_shapes):
    """(operand specs, result specs) of the per-shard backward call: operands q, k, v,
    o, do, lse, dlse[, sinks], results dq, dk, dv[, dsinks] (d_sinks, a sum over the
    batch, is summed over the batch shards by the per-shard function)."""
    b, n = _batch_heads(mesh, arg_shapes[0], arg_shapes[1])
    qkv, stats = PartitionSpec(b, None, n, None), PartitionSpec(b, n, None)
    tail = [PartitionSpec(n)] if len(arg_shapes) == 8 else []
    return [qkv] * 5 + [stats] * 2 + tail, [qkv] * 3 + tail


def _named(mesh, specs):
    return tuple(NamedSharding(mesh, s) for s in specs)


def _specs(params, mesh, arg_shapes):
    """call_specs of a forward call with parameters `params` (a FwdParams)."""
    names = tuple(n for n, _ in operands(params.plan.variant))
    return call_specs(mesh, arg_shapes, names, params.kind)


def _infer(call: _Call, mesh, arg_shapes, result_shape):
    del result_shape
    return _named(mesh, _specs(call.params, mesh, arg_shapes)[1])


def _partition(call: _Call, mesh, arg_shapes, result_shape):
    del result_shape
    ops, outs = _specs(call.params, mesh, arg_shapes)
    return mesh, functools.partial(_per_shard, call), _named(mesh, outs), _named(mesh, ops)


# Shardy factor names of the replicated dimensions, per operand and rank.
_SDY_OTHER = {
    "q": {4: ("b", "t", None, "h"), 3: ("r", None, "h")},
    "k": {4: ("b", "s", "k", "h"), 3: ("u", "k", "h")},
    "v": {4: ("b", "s", "k", "d"), 3: ("u", "k", "d")},
    "cu_seqlens_q": {1: ("cq",)},
    "cu_seqlens_k": {1: ("ck",)},
    "seqused_q": {1: ("b",)},
    "seqused_k": {1: ("b",)},
    "page_table": {2: ("b", "m")},
    "sinks": {1: (None,)},
}


def _query_heads_factor(g: int, kv_heads: int | None) -> str:
    """Shardy's factor of the query-head dimension: the compound (k g), so query heads
    shard with their KV head k; just k without GQA; with a single KV head a factor of
    its own, `n`, which needs replication -- Shardy refuses a compound factor with a
    size-1 part ("dim mapping can't have a factor of size 1 if there are multiple
    factors"), and one KV head cannot carry a split of the query heads."""
    if g == 1:
        return "k"
    return "n" if kv_heads == 1 else "(k g)"


def _kv_heads(value_types) -> int:
    """KV heads of a call from its operand types (k is operand 1 in every layout; its
    heads are the next-to-last dimension)."""
    return mlir.ir.RankedTensorType(value_types[1]).shape[-2]


def shardy_rule(params, num_operands: int | None = None, *,
                kv_heads: int | None = None) -> tuple[str, dict]:
    """Shardy's rule for a forward call with parameters `params` (a FwdParams):
    einsum-like string and factor options.  Query heads are the compound factor (k g)
    so they shard with the KV heads k (see _query_heads_factor for one KV head); every
    other factor but the batch b needs replication.  Where the batch cannot be split
    (packed k/v, or packed q, whose rows mix sequences) it needs replication too."""
    del num_operands  # implied by the variant
    v = params.plan.variant
    g = v.qhead_per_kvhead
    n = _query_heads_factor(g, kv_heads)
    paged = v.kv_layout == "paged"
    terms = []
    for name, rank in operands(v):
        dims = list(_SDY_OTHER[name][rank])
        if paged and name in ("k", "v"):  # (pages, page_size, K, d)
            dims = ["p", "z", "k", "h" if name == "k" else "d"]
        terms.append(" ".join(n if f is None else f for f in dims))
    dense_q = v.q_layout == "dense"
    out = f"b t {n} d" if dense_q else f"r {n} d"
    lse = f"b {n} t" if dense_q else f"{n} r"
    rule = ", ".join(terms) + f" -> {out}, {lse}"
    keep = {"k", "g"} | ({"b"} if dense_q and v.kv_layout != "packed" else set())
    return rule, _rule_options(rule, lambda f: f not in keep, g)


def _rule_options(rule: str, replicated, g: int) -> dict:
    """Factor options of an einsum-like Shardy `rule`: the factors `replicated(f)` names
    need replication, listed in the order the rule first names them (Shardy wants the
    special factors sorted so); `g`'s size where the rule has the compound (k g)."""
    factors = list(dict.fromkeys(
        rule.replace(",", " ").replace("->", " ").replace("(", " ").replace(")", " ").split()))
    opts = dict(need_replication_factors=tuple(f for f in factors if replicated(f)))
    if "g" in factors:
        opts["g"] = g
    return opts


def _sdy_rule(call: _Call, mesh, value_types, result_types):
    del mesh, result_types
    return shardy_rule(call.params, kv_heads=_kv_heads(value_types))


_partitioned.def_partition(
    partition=_partition,
    infer_sharding_from_operands=_infer,
    sharding_rule=_sdy_rule,
)


def _bwd_infer(call: _Call, mesh, arg_shapes, result_shape):
    del call, result_shape
    return _named(mesh, backward_call_specs(mesh, arg_shapes)[1])


def _bwd_partition(call: _Call, mesh, arg_shapes, result_shape):
    del result_shape
    ops, outs = backward_call_specs(mesh, arg_shapes)
    batch = _axes(ops[0][0])

    def per_shard(*args):
        grads = _per_shard(call, *args)
        if len(grads) == 4 and batch:  # each shard's d_sinks covers its batch rows
            grads = grads[:3] + (jax.lax.psum(grads[3], batch),)
        return grads

    return mesh, per_shard, _named(mesh, outs), _named(mesh, ops)


def backward_shardy_rule(params, num_operands: int | None = None, *,
                         kv_heads: int | None = None) -> tuple[str, dict]:
    """Shardy's rule for a backward call with parameters `params` (a BwdParams; see
    shardy_rule); d_sinks has no batch factor (the per-shard function sums it over
    the batch shards)."""
    del num_operands  # implied by the variant
    v = params.plan.variant
    g = v.qhead_per_kvhead
    n = _query_heads_factor(g, kv_heads)
    sinks = [n] if v.has_sinks else []
    ops = [f"b t {n} h", "b s k h", "b s k d", f"b t {n} d", f"b t {n} d", f"b {n} t",
           f"b {n} t"] + sinks
    outs = [f"b t {n} h", "b s k h", "b s k d"] + sinks
    rule = ", ".join(ops) + " -> " + ", ".join(outs)
    return rule, _rule_options(rule, {"t", "h", "s", "d", "n"}.__contains__, g)


_bwd_partitioned.def_partition(
    partition=_bwd_partition,
    infer_sharding_from_operands=_bwd_infer,
    sharding_rule=lambda call, mesh, values, results: backward_shardy_rule(
        call.params, kv_heads=_kv_heads(values)),
)


# ----------------------------------------------------------------------------
# The wrapped lowering
# ----------------------------------------------------------------------------

# Read by the wrapped lowerings at lowering time (set_enabled flips it), so turning the
# rule off or on never registers a lowering again: each primitive registers its own once.
_enabled = True
# The primitives whose lowerings are wrapped: set_enabled keeps JAX's list of primitives
# that need devices at lowering time in step with the flag.
_wrapped: list = []


def _spmd(ctx) -> bool:
    """Whether the lowering is into an automatically partitioned (jit) computation
    over several devices, with the devices known (custom_partitioning needs them),
    and not for jax.export: the rule is a Python callback of this process, which a
    serialized module cannot carry."""
    mc = ctx.module_context
    ac = mc.axis_context
    return (isinstance(ac, _sharding_impls.ShardingContext) and ac.num_devices > 1
            and ac.device_assignment is not None
            and not mc.lowering_parameters.for_export)


def _require_devices(primitive) -> None:
    if _enabled:
        _jax_dispatch.prim_requires_devices_during_lowering.add(primitive)
    else:
        _jax_dispatch.prim_requires_devices_during_lowering.discard(primitive)


def _wrap(partitioned, primitive, lower, applies):
    """`lower` (a lowering rule of `primitive`), emitting the partitioned call instead
    in multi-device jit lowerings where `applies(params)`: the plain lowering would
    emit the kernel's custom call (elsewhere it falls back or raises, and does so
    itself).  `applies` is asked only then, since on CUDA it may compile the kernel."""
    if primitive not in _wrapped:
        _wrapped.append(primitive)
        _require_devices(primitive)

    def rule(ctx, *args, params):
        if _enabled and _spmd(ctx) and applies(params):
            return mlir.lower_fun(functools.partial(partitioned, _Call(primitive, params)),
                                  multiple_results=True)(ctx, *args)
        return lower(ctx, *args, params=params)

    rule.__wrapped__ = lower
    return rule


def forward_lowering(primitive, lower, applies):
    """The lowering to register for the forward primitive: `lower` wrapped by the
    forward rule (see _wrap)."""
    return _wrap(_partitioned, primitive, lower, applies)


def backward_lowering(primitive, lower, applies):
    """The lowering to register for the backward primitive: `lower` wrapped by the
    backward rule (see _wrap)."""
    return _wrap(_bwd_partitioned, primitive, lower, applies)


def set_enabled(enabled: bool = True) -> None:
    """Turns the partitioning rule on (the default, from import) or off.

    On: multi-device jit lowerings of attention go through the rule, and JAX
    is told that `jax_fa4_fwd` and `jax_fa4_bwd` need the device assignment at
    lowering time (what custom_partitioning needs), which makes JAX refuse to lower
    them against an AbstractMesh alone ("AbstractMesh cannot be used when jaxpr
    contains primitives that require devices ...").  Off: the primitives' plain
    lowerings (XLA replicates the FA4 call under sharding), and AbstractMesh lowering
    works again.  Applies to lowerings from then on; functions already traced or
    compiled keep what they had (`jax.clear_caches()` drops them)."""
    global _enabled
    _enabled = bool(enabled)
    for primitive in _wrapped:
        _require_devices(primitive)
