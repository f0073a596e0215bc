"""SM90 forward kernel variants and tile configurations, as pure Python.

A `ForwardVariant` names everything the CuTe DSL specializes on (dtype, head dims,
GQA group, mask kind, softcap, sinks, tiles); shapes (batch, sequence lengths,
head counts) and the softmax scale and window sizes stay runtime arguments, so
one compiled object serves every shape.  Nothing here imports cutlass, so the
dispatch layer can name a variant on hosts without the compiler.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os

# Re-exported: callers and tests read the pins and the digest from here.
from .variant import (CUTLASS_DSL_VERSION, DTYPES, FA4_VERSION, MASKS,  # noqa: F401
                      AttentionVariant, kernel_source_digest)

# Bump when the launcher's argument convention (see forward.py) changes.
LAUNCHER_ABI = 3  # 3: 64-bit strides inside the launcher

Q_LAYOUTS = ("dense", "packed")
KV_LAYOUTS = ("dense", "packed", "paged")
# Kernel designs: FA4's own SM90 forward, or one of the head-dim-512 forwards for value
# head dims above WGMMA's N limit of 256: split_k (kernels/forward_hdim512_splitk.py,
# the default: fastest, measured), split_pv and single_qk (kernels/forward_hdim512.py).
DESIGNS = ("fa4", "split_k", "split_pv", "single_qk")
HDIM512_DESIGNS = DESIGNS[1:]


# The kernel sources behind each kind of compiled object (modules of jax_fa4/kernels
# that generate device code or fix a launcher's arguments).  The planning modules
# (variant.py, config.py, split.py, backward_config.py, errors.py, cache.py, compile.py)
# reach the keys as data (tiles, flags, ABI numbers), so editing them invalidates nothing.
FORWARD_SOURCES = ("forward.py", "forward_abi.py", "forward_hdim512.py",
                   "forward_hdim512_splitk.py")
SPLIT_SOURCES = ("forward_split.py",)  # on top of the base variant's FORWARD_SOURCES
# and, for a split variant whose combine is "fused" (the merge inside the split kernel)
FUSED_SPLIT_SOURCES = ("forward_split_fused.py",)
# and, for one that prefetches before its PDL wait (SplitVariant.prefetch)
PREFETCH_SPLIT_SOURCES = ("forward_split_prefetch.py",)
# and, for a forward whose CTAs loop over tiles (TileConfig.persistent)
PERSISTENT_SOURCES = ("forward_persistent.py",)
# and, for one with two CTAs resident per SM (TileConfig.ctas_per_sm)
OCCUPANCY_SOURCES = ("forward_occupancy.py",)
BACKWARD_SOURCES = ("backward.py", "backward_abi.py", "forward.py")


@dataclasses.dataclass(frozen=True)
class TileConfig:
    tile_m: int
    tile_n: int
    mma_pv_is_rs: bool  # P stays in registers for the PV GEMM
    intra_wg_overlap: bool  # overlap softmax of one block with the GEMMs of the next
    num_stages: int = 2  # K/V pipeline depth
    design: str = "fa4"  # one of DESIGNS
    # One CTA per SM looping over the tiles (kernels/forward_persistent.py) instead of
    # one CTA per tile: FA4's design, dense queries only
    persistent: bool = False
    # CTAs resident per SM: 2 halves FA4's registers per CTA (kernels/forward_occupancy.py)
    # for a 64-row tile whose shared memory fits twice (occupancy_tile_fits); a tile-sweep
    # candidate for short sequences, not planned for calls
    ctas_per_sm: int = 1

    def __post_init__(self):
        if self.design not in DESIGNS:
            raise ValueError(f"design must be one of {DESIGNS}, got {self.design!r}")
        if self.persistent and self.design != "fa4":
            raise ValueError("a persistent tile needs FA4's design")
        if self.ctas_per_sm not in (1, 2):
            raise ValueError(f"ctas_per_sm must be 1 or 2, got {self.ctas_per_sm}")
        if self.ctas_per_sm == 2 and (self.design != "fa4" or self.persistent
                                      or self.tile_m != 64):
            raise ValueError("two CTAs per SM need FA4's design, a 64-row tile (one MMA "
                             "warpgroup) and no persistent schedule")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.design == "fa4":  # keeps the keys of variants that predate `design`
            del d["design"]
        if not self.persistent:  # ... and `persistent`
            del d["persistent"]
        if self.ctas_per_sm == 1:  # ... and `ctas_per_sm`
            del d["ctas_per_sm"]
        return d

    def describe(self) -> str:
        return (f"tile {self.tile_m}x{self.tile_n}{' rs' if self.mma_pv_is_rs else ''}"
                + (f" {self.num_stages} stage{'s' * (self.num_stages > 1)}"
                   if self.num_stages != 2 else "")
                + (f" {self.design}" if self.design != "fa4" else "")
                + (" persistent" if self.persistent else "")
                + (f" {self.ctas_per_sm}/SM" if self.ctas_per_sm != 1 else ""))


def hdim512_tile(design: str) -> TileConfig:
    """The tile of a head-dim-512 design: 64 x 64 and one K/V stage are what fits the
    64 KiB Q, K and V tiles in shared memory.  split_k keeps P in registers (each
    warpgroup holds the whole S after the exchange); split_pv and single_qk pass P
    through shared memory."""
    if design not in HDIM512_DESIGNS:
        raise ValueError(f"design must be one of {HDIM512_DESIGNS}, got {design!r}")
    return TileConfig(64, 64, design == "split_k", True, num_stages=1, design=design)


# The head-dim-512 design new calls get: split_k, the fastest design that passed the
# whole GPU matrix (docs/PERF.md).  JAX_FA4_HDIM512_DESIGN picks another process-wide
# (the GPU matrix and Nsight Compute runs of a candidate design); use_hdim512_design
# switches inside a block.
DEFAULT_HDIM512_DESIGN = "split_k"
HDIM512_DESIGN = os.environ.get("JAX_FA4_HDIM512_DESIGN", DEFAULT_HDIM512_DESIGN)
if HDIM512_DESIGN not in HDIM512_DESIGNS:
    raise ValueError(f"JAX_FA4_HDIM512_DESIGN={HDIM512_DESIGN!r}: expected one of "
                     f"{HDIM512_DESIGNS}")


@contextlib.contextmanager
def use_hdim512_design(design: str):
    """Plans head-dim-512 calls with `design` inside the block (like split.use_plan;
    a plan keeps the tile it chose)."""
    global HDIM512_DESIGN
    hdim512_tile(design)  # validates
    saved, HDIM512_DESIGN = HDIM512_DESIGN, design
    try:
        yield
    finally:
        HDIM512_DESIGN = saved


# Whether dense forward calls run the persistent kernel (TileConfig.persistent).  Off
# until measured: its first version was slower (H100, docs/PERF.md), the second (FA4's
# LPT order, O in its own buffer) is not yet measured.  JAX_FA4_FORWARD_PERSISTENT=on
# turns it on process-wide, use_forward_persistent inside a block.
FORWARD_PERSISTENT = os.environ.get("JAX_FA4_FORWARD_PERSISTENT", "off")
if FORWARD_PERSISTENT not in ("on", "off"):
    raise ValueError(f"JAX_FA4_FORWARD_PERSISTENT={FORWARD_PERSISTENT!r}: expected on or off")


@contextlib.contextmanager
def use_forward_persistent(on: bool):
    """Plans dense forward calls with (or without) the persistent kernel inside the
    block (benchmarks compare both in one process; a plan keeps what it chose)."""
    global FORWARD_PERSISTENT
    saved, FORWARD_PERSISTENT = FORWARD_PERSISTENT, "on" if on else "off"
    try:
        yield
    finally:
        FORWARD_PERSISTENT = saved


# Shared memory an SM90 thread block may use
SM90_SMEM_BYTES = 227 * 1024


def fa4_smem_bytes(tile: TileConfig, head_dim: int, head_dim_v: int,
                   own_o: bool = False) -> int:
    """Bytes of FA4's SM90 forward buffers (16-bit elements, head dims padded to 16): Q,
    the K/V stages and P (unless P stays in registers); FA4 stages O in Q's buffer, and
    `own_o` adds the separate O buffer of the persistent kernel
    (kernels/forward_persistent.py)."""
    d, dv = (-(-x // 16) * 16 for x in (head_dim, head_dim_v))
    p = 0 if tile.mma_pv_is_rs else tile.tile_m * tile.tile_n
    o = tile.tile_m * dv if own_o else 0
    return 2 * (tile.tile_m * d + tile.num_stages * tile.tile_n * (d + dv) + p + o)


# Shared memory of one SM (an SM holds its CTAs' buffers and 1 KiB reserved per CTA)
SM90_SM_SMEM_BYTES = 228 * 1024


def occupancy_tile_fits(tile: TileConfig, head_dim: int, head_dim_v: int) -> bool:
    """Whether `tile.ctas_per_sm` (2) CTAs' FA4 buffers (fa4_smem_bytes, plus 1 KiB for
    the pipeline barriers and 1 KiB the SM reserves, each) fit one SM."""
    per_cta = fa4_smem_bytes(tile, head_dim, head_dim_v) + 2 * 1024
    return tile.ctas_per_sm * per_cta <= SM90_SM_SMEM_BYTES


def persistent_tile(v: "ForwardVariant") -> TileConfig:
    """v's tile, persistent where FORWARD_PERSISTENT is on, FA4 would schedule v's
    tiles one CTA each with a fixed grid (dense queries without per-sequence query
    lengths: FA4 schedules those by its varlen scheduler; dense K/V; FA4's design) and
    shared memory holds the extra O buffer.  Kept to what it was built for and what the
    GPU matrix covers with it: head dims up to 128 (K and V) with P in registers (FA4's
    tiles at head dims 40-64 and 97-128; 65-96 keep P in shared memory)."""
    on = (FORWARD_PERSISTENT == "on" and v.tile.design == "fa4" and v.q_layout == "dense"
          and v.kv_layout == "dense" and not v.has_seqused_q and v.tile.mma_pv_is_rs
          and max(v.head_dim, v.head_dim_v) <= 128
          and fa4_smem_bytes(v.tile, v.head_dim, v.head_dim_v, own_o=True) <= SM90_SMEM_BYTES)
    return dataclasses.replace(v.tile, persistent=on)


def sm90_forward_tile(head_dim: int, head_dim_v: int, causal: bool, local: bool) -> TileConfig:
    """FA4 4.0.0b36's SM90 forward tile heuristic (`_tile_size_fwd_sm90`), benchmarked
    by FA4's authors on H100 SXM; mirrored here so that choosing a tile needs no GPU
    and no import of flash_attn.  Value head dims above 256 (FA4 stops at 256) take a
    head-dim-512 design (HDIM512_DESIGN: split-K exchange unless switched)."""
    if head_dim_v > 256:
        return hdim512_tile(HDIM512_DESIGN)
    if head_dim <= 64:
        return TileConfig(192, 128, True, True)
    if head_dim <= 96:
        return TileConfig(192, 128 if (causal or local) else 144, False, True)
    if head_dim <= 128:
        return TileConfig(128, 128, True, True)
    if head_dim <= 192:
        return TileConfig(128, 96 if local else (128 if head_dim_v <= 128 else 112), True, True)
    return TileConfig(128, 64 if local else 80, True, True)


# FA4's cp.async page loader (flash_attn/cute/paged_kv.py, PagedKVManager) copies K/V
# rows with the 128 threads of the producer warpgroup, 16 bytes each: a row of the
# (16-padded) head dims is split over gcd(hdim, hdim_v, 64) / 8 threads, so one pass
# covers 128 / that rows.  Its load predicate checks the sequence length but never
# `row < tile_n`: when tile_n is not a multiple of the rows per pass, the last pass
# writes past the K/V tile in shared memory (into sP/sV, or past the allocation when
# sK is the last buffer).  That was the head-dim-96 wrong output (tile_n 144) and the
# head-dim-160/224 illegal address (tile_n 112/80); see docs/DESIGN.md.
CP_ASYNC_THREADS = 128


def cp_async_rows_per_pass(head_dim: int, head_dim_v: int) -> int:
    """Rows of a K/V tile one pass of FA4's cp.async page loader covers (16-bit dtypes)."""
    pad = lambda d: -(-d // 16) * 16  # noqa: E731  (FA4's tile_hdim rounding)
    threads_per_row = math.gcd(pad(head_dim), pad(head_dim_v), 64) // 8
    return CP_ASYNC_THREADS // threads_per_row


def cp_async_tile(tile: TileConfig, head_dim: int, head_dim_v: int) -> TileConfig:
    """`tile` with tile_n rounded down to a whole number of cp.async loader passes (see
    cp_async_rows_per_pass), so paged K/V loads stay inside the tile."""
    rows = cp_async_rows_per_pass(head_dim, head_dim_v)
    if tile.tile_n % rows == 0:
        return tile
    return dataclasses.replace(tile, tile_n=max(rows, tile.tile_n // rows * rows))


@dataclasses.dataclass(frozen=True)
class ForwardVariant(AttentionVariant):
    """One compiled SM90 forward kernel.

    dtype .. has_sinks: see AttentionVariant.
    q_layout: "dense" (b, s, h, d) or "packed" (total, h, d) with cu_seqlens_q.
    kv_layout: "dense", "packed" (with cu_seqlens_k) or "paged" (pages of a cache with
    a page table); `paged_tma`: pages are loaded by TMA (page size == tile_n), else by
    cp.async.  has_seqused_q/k: per-sequence used lengths are given.
    """

    KIND = "sm90_forward"
    ABI = LAUNCHER_ABI
    SOURCES = FORWARD_SOURCES
    SYMBOL_PREFIX = "jax_fa4_fwd_"
    DIRECTION = "fwd"

    q_layout: str = "dense"
    kv_layout: str = "dense"
    has_seqused_q: bool = False
    has_seqused_k: bool = False
    paged_tma: bool = False
    tile: TileConfig | None = None

    def __post_init__(self):
        if self.q_layout not in Q_LAYOUTS or self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"bad layouts q={self.q_layout!r} kv={self.kv_layout!r}")
        if self.paged_tma and self.kv_layout != "paged":
            raise ValueError("paged_tma needs kv_layout='paged'")
        super().__post_init__()
        if self.tile is None:
            # Looked up as a module global: tests patch config.sm90_forward_tile.
            tile = sm90_forward_tile(
                self.head_dim, self.head_dim_v, self.mask == "causal", self.mask == "local"
            )
            object.__setattr__(self, "tile", tile)
        if self.tile.ctas_per_sm != 1 and not occupancy_tile_fits(
                self.tile, self.head_dim, self.head_dim_v):
            raise ValueError(f"{self.tile.ctas_per_sm} CTAs of {self.tile.describe()} at head "
                             f"dims {self.head_dim}/{self.head_dim_v} do not fit one SM's "
                             "shared memory")
        if self.tile.persistent and (self.q_layout != "dense" or self.has_seqused_q):
            raise ValueError("a persistent tile needs dense queries without seqused_q "
                             "(FA4 schedules the others with its varlen scheduler)")
        if self.kv_layout == "paged" and not self.paged_tma:
            rows = cp_async_rows_per_pass(self.head_dim, self.head_dim_v)
            if self.tile.tile_n % rows:
                raise ValueError(
                    f"paged K/V by cp.async needs tile_n a multiple of {rows} (the loader's "
                    f"rows per pass at head dims {self.head_dim}/{self.head_dim_v}), got "
                    f"{self.tile.tile_n}; use cp_async_tile")

    def key_extras(self) -> dict:
        # a persistent or two-per-SM kernel's code is in one more module
        if self.tile.persistent:
            return {"persistent_source": kernel_source_digest(*PERSISTENT_SOURCES)}
        if self.tile.ctas_per_sm != 1:
            return {"occupancy_source": kernel_source_digest(*OCCUPANCY_SOURCES)}
        return {}

    @property
    def pack_gqa(self) -> bool:
        # FA4's default: the query heads of one KV head share a tile (one K/V read).
        return self.qhead_per_kvhead > 1

    def describe_parts(self) -> list[str]:
        parts = super().describe_parts()
        if self.q_layout != "dense" or self.kv_layout != "dense":
            parts.append(f"q {self.q_layout}, kv {self.kv_layout}"
                         + (" (tma)" if self.paged_tma else ""))
        if self.has_seqused_q or self.has_seqused_k:
            parts.append("seqused " + "q" * self.has_seqused_q + "k" * self.has_seqused_k)
        parts.append(self.tile.describe())
        return parts
