"""SM90 backward kernel variants and tiles, as pure Python (no cutlass import).

A `BackwardVariant` names what FA4's SM90 backward (preprocess + main kernel +
postprocess, run by one launcher, see backward.py) specializes on; batch, lengths,
head counts, scale and window bounds stay runtime arguments, as in the forward.
"""
from __future__ import annotations

import dataclasses

from .config import BACKWARD_SOURCES, ForwardVariant
from .variant import AttentionVariant

# Bump when the backward launcher's argument convention (backward_abi.py) changes.
# 2: workspaces may be int32 (the deterministic backward's semaphores).
BACKWARD_ABI = 2
# FA4's SM90 backward covers head dims up to 256 (its tile table stops there).
MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class BackwardTile:
    """FA4's `BwdConfig` for SM90 (fields named as there)."""

    m_block_size: int
    n_block_size: int
    num_stages_Q: int
    num_stages_dO: int
    num_stages_PdS: int
    SdP_swapAB: bool
    dKV_swapAB: bool
    dQ_swapAB: bool
    AtomLayoutMSdP: int
    AtomLayoutNdKV: int
    AtomLayoutMdQ: int
    num_wg: int = 2
    dQ_single_wg: bool = False

    def describe(self) -> str:
        return f"tile {self.m_block_size}x{self.n_block_size}"

    @property
    def hdim_multiple_of(self) -> int:
        """Head dims of the float32 accumulators are rounded up to this (FA4: 64 when
        dK/dV put head_dim on WGMMA's M axis, else 32)."""
        return 64 if self.dKV_swapAB else 32


def sm90_backward_tile(head_dim: int, head_dim_v: int, causal: bool, local: bool) -> BackwardTile:
    """FA4 4.0.0b36's `_tile_size_bwd_sm90` (no block sparsity), mirrored so that
    planning a backward needs neither GPU nor flash_attn."""
    T = BackwardTile
    if head_dim <= 64:
        return T(128, 128, 2, 2, 2, True, False, False, 1, 2, 2)
    if head_dim <= 96:
        return T(64, 128, 2, 2, 2, True, False, False, 1, 2, 1, dQ_single_wg=True)
    if head_dim <= 128:
        m = 64 if (causal or local) else 80
        return T(m, 128, 2, 2, 2, True, False, m % 64 != 0, 1, 2, 1)
    if head_dim <= 192:
        return T(64, 96, 2, 2 if head_dim_v <= 128 else 1, 1, False, True, False, 1, 2, 1)
    return T(64, 48, 2, 1, 1, False, True, False, 1, 1, 1)


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@dataclasses.dataclass(frozen=True)
class BackwardVariant(AttentionVariant):
    """One compiled SM90 backward launcher (preprocess, main kernel, postprocess).

    dtype .. has_sinks: see AttentionVariant (as in ForwardVariant).
    layout: 'dense' (b, s, h, d) q and k/v, or 'packed' (total, h, d) both, with
    cu_seqlens_q/k.  GQA (qhead_per_kvhead > 1) accumulates dK/dV in float32
    workspaces that a postprocess sums into dK/dV.
    deterministic: FA4's deterministic schedule: the blocks that add into one dQ tile
    (and, for GQA, the query heads that add into one dK/dV tile) take turns in a fixed
    order behind int32 semaphores, so the float32 sums, and the gradients, are the
    same bits on every run (slower: the adds serialize).
    """

    KIND = "sm90_backward"
    ABI = BACKWARD_ABI
    SOURCES = BACKWARD_SOURCES
    SYMBOL_PREFIX = "jax_fa4_bwd_"
    DIRECTION = "bwd"

    layout: str = "dense"
    has_seqused_q: bool = False
    has_seqused_k: bool = False
    tile: BackwardTile | None = None
    deterministic: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.layout not in ("dense", "packed"):
            raise ValueError(f"layout must be 'dense' or 'packed', got {self.layout!r}")
        if self.layout == "dense" and (self.has_seqused_q or self.has_seqused_k):
            raise ValueError("seqused_q/k need layout='packed'")
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"deterministic must be a bool, got {self.deterministic!r}")
        if self.tile is None:
            object.__setattr__(self, "tile", sm90_backward_tile(
                self.head_dim, self.head_dim_v, self.mask == "causal", self.mask == "local"))

    def as_dict(self) -> dict:
        d = super().as_dict()
        if not self.deterministic:  # the key (and spec) of variants that predate it
            del d["deterministic"]
        return d

    @classmethod
    def for_forward(cls, fv: ForwardVariant, deterministic: bool = False) -> "BackwardVariant":
        """The backward of calls whose forward runs `fv`: the attention fields carry
        over, q's layout names both (the caller refuses q and k/v layouts that differ,
        and paged k/v), and the tile is the backward's own.  Built from the fields, not
        copied by hand, so a field added to AttentionVariant reaches the backward."""
        return cls(**fv.attention_fields(), layout=fv.q_layout,
                   has_seqused_q=fv.has_seqused_q, has_seqused_k=fv.has_seqused_k,
                   deterministic=deterministic)

    @property
    def gqa_accum(self) -> bool:
        """dK/dV go through float32 accumulators (several query heads add into them)."""
        return self.qhead_per_kvhead > 1

    @property
    def semaphores(self) -> tuple[str, ...]:
        """The int32 semaphore workspaces FA4's deterministic schedule takes: one per
        dQ tile; for GQA one per dK and per dV tile (the query heads of a KV head add
        in turn)."""
        if not self.deterministic:
            return ()
        return ("dq_semaphore",) + (("dk_semaphore", "dv_semaphore") if self.gqa_accum else ())

    def describe_parts(self) -> list[str]:
        parts = super().describe_parts()
        if self.layout != "dense":
            parts.append(self.layout + (" seqused " + "q" * self.has_seqused_q
                                        + "k" * self.has_seqused_k
                                        if self.has_seqused_q or self.has_seqused_k else ""))
        parts.append(self.tile.describe())
        if self.deterministic:
            parts.append("deterministic")
        return parts
