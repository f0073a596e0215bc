"""Which path a call takes: the FA4 SM90 kernel, or the fallback, and why.

`plan_dense` is a pure function of static call properties (shapes, dtypes,
options): it either names the kernel variant and its runtime window arguments or
gives the reason the kernel cannot run.  The device check (an SM90 GPU) happens
at lowering time, per platform, in device.py.
"""
from __future__ import annotations

import dataclasses


from .fallback_forward import jax_nn_can_run
from .kernels.backward_config import MAX_HEAD_DIM as BWD_MAX_HEAD_DIM
from .kernels.backward_config import BackwardVariant
from .kernels.config import (ForwardVariant, cp_async_tile, persistent_tile,
                             sm90_forward_tile)
from .kernels.split import DESIGNS as SPLIT_DESIGNS
from .kernels.split import MAX_HEAD_DIM as SPLIT_MAX_HEAD_DIM
from .kernels.split import choose_num_splits, decode_variant, split_options, split_variant

_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class DenseCall:
    """Static description of one `attention` call (4-D BTNH layout)."""

    dtype: str
    batch: int
    seq_q: int
    seq_k: int
    heads_q: int
    heads_k: int
    head_dim: int
    head_dim_v: int
    window: tuple[int | None, int | None]  # top-left aligned (jax.nn); None = unbounded
    softcap: float | None = None
    has_sinks: bool = False
    has_bias: bool = False
    has_mask: bool = False
    q_lengths: bool = False  # query_seq_lengths given
    kv_lengths: bool = False  # key_value_seq_lengths given
    traced_scale: bool = False


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    variant: ForwardVariant
    window_left: int  # runtime window bounds in FA4's bottom-right convention
    window_right: int
    num_splits: int = 1  # > 1: split-KV kernel (kernels/split.py) + combine
    # The key blocks the split heuristic sized num_splits for; None when the caller
    # forced num_splits or nothing is split.  Lets the lowering re-plan the count for
    # the shapes it sees (splits_for).
    split_key_blocks: int | None = None
    # A dense call with key_value_seq_lengths and a window whose right bound is <= 0
    # (causal): the plain kernel is exact when no query row's window reaches a padded
    # key, a device-side fact (execute.py checks it, else runs the pure-JAX path).
    lengths_check: bool = False
    # The split kernel's combine and launch (kernels/split.split_options), fixed when
    # the call is planned: the plan, not the lowering, owns them (a benchmark switching
    # split plans per call gets the kernel it planned with).
    combine: str = "fa4"
    split_pdl: bool = False
    split_prefetch: int = 0

    @property
    def kernel_variant(self):
        """The compiled object this plan runs: `variant`, or its split-KV kernel."""
        return (self.variant if self.num_splits == 1
                else split_variant(self.variant, self.combine, self.split_pdl,
                                   self.split_prefetch))

    def splits_for(self, batch: int, heads_k: int) -> int:
        """The split count for the shapes the call is lowered with: a heuristic count is
        re-chosen for `batch` sequences and `heads_k` KV heads (a shard under jit or
        shard_map, or a batch folded by vmap, fills its GPU differently from the shapes
        the plan saw); a forced count is kept.  The kernel stays the split kernel (at
        least 2 splits)."""
        if self.split_key_blocks is None:
            return self.num_splits
        return max(2, choose_num_splits(batch, heads_k, 1, self.split_key_blocks,
                                        head_dim=self.variant.head_dim))


class Unsupported(Exception):
    """The kernel cannot run this call; str(self) says why."""


# (head_dim, value head_dim) pairs above FA4's 256 that the head-dim-512 kernels
# (kernels/forward_hdim512_splitk.py by default, kernels/forward_hdim512.py) take:
# Gemma-4's global layers.  A smaller head_dim
# with value head_dim 512 would need its own shared-memory layout: FA4 writes the
# output tile (tile_m x hdim_v) over the Q tile (tile_m x head_dim).
_WIDE_HEAD_DIMS = ((512, 512),)


def _check_head_dim(name: str, d: int) -> None:
    if d % 8 or not 8 <= d <= 256:
        raise Unsupported(f"{name} {d} is not supported by the SM90 kernel "
                          "(a multiple of 8 between 8 and 256, or 512 with value "
                          "head_dim 512)")


def _check_head_dims(head_dim: int, head_dim_v: int) -> None:
    if (head_dim, head_dim_v) in _WIDE_HEAD_DIMS:
        return
    if head_dim_v == 512 or head_dim == 512:
        raise Unsupported(f"head_dim {head_dim} with value head_dim {head_dim_v} is not "
                          "supported by the SM90 kernel (above 256 it takes "
                          + " or ".join(f"{d}/{dv}" for d, dv in _WIDE_HEAD_DIMS) + ")")
    _check_head_dim("head_dim", head_dim)
    _check_head_dim("value head_dim", head_dim_v)
    if head_dim_v > head_dim:
        # FA4's SM90 epilogue stages the output tile (tile_m x hdim_v) in the Q tile's
        # shared memory (tile_m x head_dim): a wider O spills into K/V, and with FA4's
        # tiles the K/V/P buffers can exceed shared memory (seen on the GPU: head dims
        # 88/192 failed to launch).  Not covered by GPU tests, so refused.
        raise Unsupported(f"value head_dim {head_dim_v} above head_dim {head_dim} is not "
                          "supported by the SM90 kernel (FA4 stages O in the Q tile)")


def _check_common(dtype: str, head_dim: int, head_dim_v: int, heads_q: int, heads_k: int):
    if dtype not in ("bfloat16", "float16"):
        raise Unsupported(f"dtype {dtype} is not supported by the FA4 kernel "
                          "(bfloat16 or float16)")
    _check_head_dims(head_dim, head_dim_v)
    if heads_q == 0 or heads_k == 0:
        raise Unsupported("an empty dimension (heads is 0)")
    if heads_q % heads_k:
        raise Unsupported("query heads are not a multiple of key/value heads")


def _check_int32(**numels: int) -> None:
    for name, n in numels.items():
        if n > _INT32_MAX:
            raise Unsupported(f"{name} has more than 2**31-1 elements (int32 indexing)")


def _fa_mask(left: int | None, right: int | None) -> tuple[str, int, int]:
    """FA's bottom-right window (None = unbounded) -> (mask kind, wl, wr)."""
    if left is None and right is None:
        return "none", 0, 0
    if left is None and right == 0:
        return "causal", 0, 0
    return "local", left or 0, right or 0


def plan_dense(c: DenseCall) -> KernelPlan:
    """The kernel variant for `c`, or raises Unsupported with the reason."""
    if c.has_bias:
        raise Unsupported("bias is not supported by the FA4 kernel")
    if c.has_mask:
        raise Unsupported("an explicit mask is not supported by the FA4 kernel "
                          "(use is_causal / local_window_size)")
    if c.traced_scale:
        raise Unsupported("scale is traced; the kernel takes it as a compile-time constant")
    _check_common(c.dtype, c.head_dim, c.head_dim_v, c.heads_q, c.heads_k)
    if min(c.batch, c.seq_q, c.seq_k) == 0:
        raise Unsupported("an empty dimension (batch or sequence length is 0)")
    hd = max(c.head_dim, c.head_dim_v)
    _check_int32(query=c.batch * c.seq_q * c.heads_q * hd,
                 key_value=c.batch * c.seq_k * c.heads_k * hd)

    # jax.nn aligns query i with key i (top-left); FA4 aligns the last query with the
    # last key (bottom-right), i.e. query i with key i + offset.
    offset = c.seq_k - c.seq_q
    left, right = c.window
    fa_left = None if left is None else left + offset
    fa_right = None if right is None else right - offset
    for name, w in (("left", fa_left), ("right", fa_right)):
        if w is not None and w < 0:
            raise Unsupported(
                f"with seq_q={c.seq_q} and seq_k={c.seq_k} the {name} window bound is "
                f"{w} in FA4's bottom-right-aligned convention; the kernel needs >= 0"
            )
    lengths, check = _dense_lengths(c)
    plan = _kernel_plan(c, (fa_left, fa_right), cap=c.seq_k + c.seq_q, **lengths)
    plan = dataclasses.replace(plan, lengths_check=check)
    plan = _with_splits(plan, c.batch, c.heads_k, c.seq_q, c.seq_k, None, None)
    if plan.num_splits == 1:  # the persistent kernel, where configured (config.py)
        v = plan.variant
        plan = dataclasses.replace(plan, variant=dataclasses.replace(v, tile=persistent_tile(v)))
    return plan


def _dense_lengths(c: DenseCall) -> tuple[dict, bool]:
    """How a dense call carries jax.nn's sequence lengths to the kernel: (seqused
    flags, whether the device-side check applies).

    FA4 aligns windows bottom-right per sequence (query row t sits at key position
    t + seqused_k - seqused_q), jax.nn top-left on the padded shape, so seqused goes
    to the kernel only without a window, where alignment does not matter.  Query
    lengths alone need no kernel support: padded rows are zeroed after the kernel.
    With key lengths and a right bound <= 0 (causal), the unpadded kernel is exact
    whenever no valid query row's window reaches a padded key (always, when each
    sequence has no more query than key rows): checked on the device."""
    if not c.kv_lengths:
        return {}, False
    left, right = c.window
    if left is None and right is None:
        return dict(has_seqused_q=c.q_lengths, has_seqused_k=True), False
    if right is not None and right <= 0:
        return {}, True
    raise Unsupported("key_value_seq_lengths with a window that reaches right of the "
                      "query (FA4 aligns windows to each sequence's end, jax.nn to the "
                      "padded start)")


def _with_splits(plan: KernelPlan, batch: int, heads_k: int, seq_q: int, max_seq_k: int,
                 num_splits: int | None, page_size: int | None) -> KernelPlan:
    """`plan` with its split count: `num_splits` if given, else (when all query rows of
    a KV head fit one tile) the heuristic from the grid FA4 would launch (KV heads x
    batch) and the key blocks of the longest possible sequence.  A split plan runs the
    decode tile (kernels/split.py: decode_variant)."""
    v = plan.variant
    if (max(v.head_dim, v.head_dim_v) > SPLIT_MAX_HEAD_DIM or v.tile.design not in SPLIT_DESIGNS
            or v.has_seqused_q):
        if num_splits not in (None, 1):
            raise Unsupported(f"num_splits={num_splits}: split-KV supports head dims up to "
                              f"{SPLIT_MAX_HEAD_DIM} and the {SPLIT_DESIGNS} kernel designs, "
                              f"not {v.describe()}")
        return plan
    key_blocks = None
    if num_splits is None:
        rows = seq_q * (v.qhead_per_kvhead if v.pack_gqa else 1)
        # Automatic only for decode-like calls: one query tile per (sequence, KV head).
        key_blocks = -(-max_seq_k // v.tile.tile_n)
        num_splits = 1 if rows > v.tile.tile_m else choose_num_splits(
            batch, heads_k, 1, key_blocks, head_dim=v.head_dim)
    if num_splits == 1:
        return plan
    v = decode_variant(v, page_size)
    opts = split_options(v)
    return dataclasses.replace(plan, variant=v, num_splits=num_splits,
                               split_key_blocks=key_blocks, combine=opts["combine"],
                               split_pdl=opts["pdl"], split_prefetch=opts["prefetch"])


def _kernel_plan(c, window, *, cap: int, **layout) -> KernelPlan:
    """The plan for call `c` (a DenseCall or VarlenCall) with `window` in FA's
    bottom-right convention; bounds are clipped to `cap` (larger ones change nothing
    but could overflow the kernel's int32 position arithmetic)."""
    mask, wl, wr = _fa_mask(*window)
    variant = ForwardVariant(
        dtype=c.dtype,
        head_dim=c.head_dim,
        head_dim_v=c.head_dim_v,
        qhead_per_kvhead=c.heads_q // c.heads_k,
        mask=mask,
        window_left=mask == "local" and window[0] is not None,
        window_right=mask == "local" and window[1] is not None,
        softcap=c.softcap,
        has_sinks=c.has_sinks,
        **layout,
    )
    return KernelPlan(variant, min(wl, cap), min(wr, cap))


@dataclasses.dataclass(frozen=True)
class VarlenCall:
    """Static description of a `varlen_attention` or `paged_attention` call.
    kv_layout 'packed' (varlen) or 'paged'; q_layout 'packed' or 'dense'."""

    dtype: str
    q_layout: str
    kv_layout: str
    batch: int
    total_q: int  # rows of q (packed), or b * s_q (dense)
    heads_q: int
    heads_k: int
    head_dim: int
    head_dim_v: int
    kv_rows: int  # total_k (packed), or pages * page_size (paged)
    window: tuple[int | None, int | None]  # FA's bottom-right convention
    softcap: float | None = None
    has_sinks: bool = False
    has_seqused_q: bool = False
    has_seqused_k: bool = False
    page_size: int | None = None
    max_pages: int | None = None  # page table columns (paged)
    num_splits: int | None = None  # split-KV override (None: heuristic)


# Cap on windows passed to the kernel: larger bounds change nothing (sequences are
# int32-indexed) and the kernel adds them to positions.
_WINDOW_CAP = 1 << 30


def plan_varlen(c: VarlenCall) -> KernelPlan:
    """Kernel plan for packed (varlen) or paged attention, or raises Unsupported."""
    _check_common(c.dtype, c.head_dim, c.head_dim_v, c.heads_q, c.heads_k)
    if c.batch == 0 or c.total_q == 0 or c.kv_rows == 0 or c.max_pages == 0:
        raise Unsupported("an empty dimension (no sequences, query rows, key rows or "
                          "page-table columns)")
    hd = max(c.head_dim, c.head_dim_v)
    _check_int32(query=c.total_q * c.heads_q * hd, key_value=c.kv_rows * c.heads_k * hd)
    mask = _fa_mask(*c.window)[0]
    tile = sm90_forward_tile(c.head_dim, c.head_dim_v, mask == "causal", mask == "local")
    paged_tma = False
    if c.kv_layout == "paged":
        if c.page_size % 8:
            raise Unsupported(f"page_size {c.page_size} is not a multiple of 8")
        # TMA loads whole pages when a page is exactly one K/V tile; hdim 256's tile_n
        # (80, or 64 with windows) also runs well at 64, so 64-token pages take TMA there
        # (hdim 512's tile_n is 64).
        if c.page_size == tile.tile_n or (c.page_size == 64 and c.head_dim > 192):
            paged_tma = True
            tile = dataclasses.replace(tile, tile_n=c.page_size)
        elif c.head_dim % 16 or c.head_dim_v % 16:
            raise Unsupported("paged KV with page_size != tile_n uses FA4's cp.async path, "
                              "which needs head dims that are multiples of 16")
        else:
            tile = cp_async_tile(tile, c.head_dim, c.head_dim_v)
    plan = _kernel_plan(c, c.window, cap=_WINDOW_CAP, q_layout=c.q_layout,
                        kv_layout=c.kv_layout, has_seqused_q=c.has_seqused_q,
                        has_seqused_k=c.has_seqused_k, paged_tma=paged_tma, tile=tile)
    # Split-KV serves dense (B, Tq, N, H) queries against a paged cache (validate.py
    # accepts num_splits > 1 only there).
    if c.q_layout != "dense" or c.kv_layout != "paged":
        return plan
    return _with_splits(plan, c.batch, c.heads_k, c.total_q // c.batch,
                        c.max_pages * c.page_size, c.num_splits, c.page_size)


@dataclasses.dataclass(frozen=True)
class Route:
    """Which path a call takes (execute.py carries it out).

    path: 'kernel' (the jax_fa4 primitive: FA4 on an SM90 GPU, its pure-JAX lowering on
    other platforms), 'jax_nn' (jax.nn.dot_product_attention with `nn_implementation`),
    'reference' (jax_fa4's pure-JAX attention) or 'error' (the call cannot run as asked:
    `error` is the NotImplementedError's text).  reason: why not the kernel (None on it).
    """

    path: str
    plan: KernelPlan | None = None
    reason: str | None = None
    nn_implementation: str | None = None
    error: str | None = None


def _forced_error(reason: str) -> Route:
    return Route("error", reason=reason,
                 error=f"jax_fa4: implementation='fa4' cannot run this call: {reason}")


def route_dense(c: DenseCall, implementation: str | None = None, *,
                wants_lse: bool = False) -> Route:
    """The route of an `attention` call: the kernel when it can run the call (and
    `implementation` allows it); else jax.nn when it expresses the call (and the call
    wants neither jax_fa4's float32 lse nor float16 on XLA's CPU dot nor a head dim past
    the SM90 backward's, which only the chunked pure-JAX backward handles); else the
    pure-JAX reference."""
    reason = None
    if implementation in (None, "fa4"):
        try:
            return Route("kernel", plan=plan_dense(c))
        except Unsupported as e:
            reason = str(e)
        if implementation == "fa4":
            return _forced_error(reason)
    can_nn = jax_nn_can_run(c.head_dim, c.head_dim_v, softcap=c.softcap,
                            has_sinks=c.has_sinks)
    if implementation in ("cudnn", "xla"):
        reason = f"implementation={implementation!r}"
        if can_nn:
            return Route("jax_nn", reason=reason, nn_implementation=implementation)
        if implementation == "cudnn":
            return Route("error", reason=reason, error=(
                "implementation='cudnn' cannot apply logits_soft_cap, sinks or a value "
                "head_dim different from the key's"))
    if (can_nn and not wants_lse and c.dtype != "float16"
            and max(c.head_dim, c.head_dim_v) <= BWD_MAX_HEAD_DIM):
        return Route("jax_nn", reason=reason)
    return Route("reference", reason=reason)


def route_varlen(c: VarlenCall, implementation: str | None = None) -> Route:
    """The route of a `varlen_attention` / `paged_attention` call: the kernel, or the
    pure-JAX reference ('xla', or a call the kernel cannot run)."""
    try:
        plan = plan_varlen(c)
    except Unsupported as e:
        if implementation == "fa4":
            return _forced_error(str(e))
        return Route("reference", reason=str(e))
    if implementation == "xla":
        return Route("reference", reason="implementation='xla'")
    return Route("kernel", plan=plan)


# ---------------------------------------------------------------------------------------
# Backward: whether a call whose forward runs the kernel gets FA4's SM90 backward.

# Head dims whose SM90 backward tiles FA4 configures for (and our GPU tests cover);
# others take the pure-JAX backward.
_BWD_HEAD_DIMS = {(64, 64), (96, 96), (128, 128), (192, 192), (192, 128), (256, 256)}


@dataclasses.dataclass(frozen=True)
class BackwardPlan:
    variant: BackwardVariant
    window_left: int  # same runtime bounds as the forward's
    window_right: int


def plan_backward(plan: KernelPlan, deterministic: bool = False) -> BackwardPlan:
    """The backward kernel for a call whose forward runs `plan`, or raises Unsupported
    with the reason (then the gradient is computed in pure JAX, see fallback_backward).
    deterministic: FA4's deterministic schedule (same gradient bits on every run); it
    exists wherever the backward kernel does, so it never changes the answer's reason."""
    fv = plan.variant
    if fv.kv_layout == "paged":
        raise Unsupported("FA4 has no backward for a paged KV cache")
    if fv.q_layout != fv.kv_layout:
        raise Unsupported("the SM90 backward needs q and k/v in the same layout")
    if fv.q_layout == "dense" and (fv.has_seqused_q or fv.has_seqused_k):
        raise Unsupported("FA4's SM90 backward takes sequence lengths only for packed "
                          "sequences (varlen)")
    if (fv.head_dim, fv.head_dim_v) not in _BWD_HEAD_DIMS:
        raise Unsupported(
            f"head dims ({fv.head_dim}, {fv.head_dim_v}) have no SM90 backward kernel "
            f"(FA4's SM90 backward covers {sorted(_BWD_HEAD_DIMS)}, at most "
            f"{BWD_MAX_HEAD_DIM})")
    if fv.qhead_per_kvhead > 1 and fv.head_dim != fv.head_dim_v:
        raise Unsupported("FA4's GQA backward needs head_dim == value head_dim")
    return BackwardPlan(BackwardVariant.for_forward(fv, deterministic), plan.window_left,
                        plan.window_right)
