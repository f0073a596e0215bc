"""SM90 backward kernel variants and tiles, as pure Python (no cutlass import).

A `BackwardVariant` names what FA4's SM90 backward (preprocess + main kernel +
postprocess, run by one launcher, see backward.py) specializes on; batch, lengths,
head counts, scale and window bounds stay runtime arguments, as in the forward.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

from .config import (BACKWARD_SOURCES, CUTLASS_DSL_VERSION, DTYPES, FA4_VERSION, MASKS,
                     kernel_source_digest)

# Bump when the backward launcher's argument convention (backward_abi.py) changes.
BACKWARD_ABI = 1
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
class BackwardVariant:
    """One compiled SM90 backward launcher (preprocess, main kernel, postprocess).

    mask / window_left / window_right / softcap / has_sinks as in ForwardVariant.
    layout: 'dense' (b, s, h, d) q and k/v, or 'packed' (total, h, d) both, with
    cu_seqlens_q/k.  GQA (qhead_per_kvhead > 1) accumulates dK/dV in float32
    workspaces that a postprocess sums into dK/dV.
    """

    dtype: str
    head_dim: int
    head_dim_v: int
    qhead_per_kvhead: int
    mask: str = "none"
    window_left: bool = False
    window_right: bool = False
    softcap: float | None = None
    has_sinks: bool = False
    layout: str = "dense"
    has_seqused_q: bool = False
    has_seqused_k: bool = False
    tile: BackwardTile | None = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {self.mask!r}")
        if self.layout not in ("dense", "packed"):
            raise ValueError(f"layout must be 'dense' or 'packed', got {self.layout!r}")
        if (self.mask == "local") != (self.window_left or self.window_right):
            raise ValueError("mask='local' needs a window bound, and only it has them")
        if self.layout == "dense" and (self.has_seqused_q or self.has_seqused_k):
            raise ValueError("seqused_q/k need layout='packed'")
        if self.softcap is not None:
            object.__setattr__(self, "softcap", float(self.softcap))
        if self.tile is None:
            object.__setattr__(self, "tile", sm90_backward_tile(
                self.head_dim, self.head_dim_v, self.mask == "causal", self.mask == "local"))

    @property
    def gqa_accum(self) -> bool:
        """dK/dV go through float32 accumulators (several query heads add into them)."""
        return self.qhead_per_kvhead > 1

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tile"] = dataclasses.asdict(self.tile)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BackwardVariant":
        d = dict(d)
        d["tile"] = BackwardTile(**d["tile"]) if d.get("tile") else None
        return cls(**d)

    def key(self) -> str:
        return json.dumps({"kind": "sm90_backward", "abi": BACKWARD_ABI, "fa4": FA4_VERSION,
                           "cutlass_dsl": CUTLASS_DSL_VERSION,
                           "source": kernel_source_digest(*BACKWARD_SOURCES), **self.as_dict()},
                          sort_keys=True)

    @property
    def symbol(self) -> str:
        return "jax_fa4_bwd_" + hashlib.sha256(self.key().encode()).hexdigest()[:20]

    def describe(self) -> str:
        parts = [f"sm90 bwd {self.dtype} hdim {self.head_dim}"
                 + (f"/{self.head_dim_v}" if self.head_dim_v != self.head_dim else ""),
                 f"group {self.qhead_per_kvhead}", self.mask]
        if self.mask == "local":
            parts[-1] += (f"(left={'y' if self.window_left else 'n'},"
                          f"right={'y' if self.window_right else 'n'})")
        if self.softcap is not None:
            parts.append(f"softcap {self.softcap:g}")
        if self.has_sinks:
            parts.append("sinks")
        if self.layout != "dense":
            parts.append(self.layout + (" seqused " + "q" * self.has_seqused_q
                                        + "k" * self.has_seqused_k
                                        if self.has_seqused_q or self.has_seqused_k else ""))
        t = self.tile
        parts.append(f"tile {t.m_block_size}x{t.n_block_size}")
        return ", ".join(parts)
