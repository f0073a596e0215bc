"""Split-KV (decode) kernel variants and the split-count heuristic, as pure Python.

A decode step has 1-8 query tokens per sequence: one thread block per (sequence, KV
head) leaves most of an H100 idle and reads the cache at a fraction of its bandwidth.
The split-KV kernel (forward_split.py) gives each block a slice of the key blocks and
writes float32 partial outputs and log-sum-exps; FA4's combine kernel, launched by the
same launcher right after it, merges them into the output and LSE (one custom call, two
kernels).  Calls with attention sinks merge in pure JAX instead (jax_fa4/split_primitive.py):
FA4's combine has no sink term, and the sink must enter exactly once.  Nothing here
imports cutlass.

Workspace (one float32 result of the custom call, allocated by XLA), for S splits:
    lse_partial (S, B, N, Tq), padded to a multiple of 4 floats,  then
    o_partial (S, B, N, Tq, Hv)            (16-byte aligned: the combine's vector loads)
The kernel sees S*B "virtual" sequences, virtual batch index s*B + b.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os

from .config import (FUSED_SPLIT_SOURCES, PREFETCH_SPLIT_SOURCES, SPLIT_SOURCES,
                     ForwardVariant, TileConfig)
from .variant import KernelVariant, kernel_source_digest

# Bump when the split launcher's argument convention (forward_split.py) changes.
SPLIT_ABI = 2  # 2: padded LSE region; out and lse results when the combine is fused
# H100 SXM.  The heuristic is tuned for it; other SM90 parts only see a different
# wave count.
NUM_SMS = 132
# Grid z holds S*B virtual sequences, at most CUDA's limit; more than 128 splits never
# paid off in FA2/FA3's heuristics either.
MAX_SPLITS = 128
MAX_GRID_Z = 65535
# A split shorter than this many key blocks costs more in fixed per-block work (Q load,
# pipeline fill, epilogue) than it saves.
MIN_BLOCKS_PER_SPLIT = 2
# A grid of at most this many (sequence, KV head, query tile) tiles -- a decode batch
# of one or two sequences -- is split for SMALL_GRID_WAVE of a wave, not a full one: one
# split block streams ~45 GB/s, so ~64-80 blocks already read the cache at HBM speed,
# and every further split adds a serial step to the combine.  Measured on H100 at batch
# 1 with 4 KV heads (docs/PERF.md): 16-20 splits beat 30 by 1-12 % at head dims 128,
# 256 and 512; batches of 4 and 8 (16 and 32 tiles) are fastest with a full wave.
SMALL_GRID_TILES = 8
SMALL_GRID_WAVE = 0.6
# ... except head dims up to 128, whose blocks stream faster: bench_decode --sweep at
# batch 1 (4 KV heads, hdim 128, H100; docs/PERF.md) peaks at 16 splits -- 64 blocks --
# at 8k, 16k, 32k and 128k alike (+1.8 to +3.2 % over 20), on 2026-11-25 and again on
# 2026-12-07; head dims 256 and 512 peak at 20.  The planned 16 then measured 1.81 and
# 2.23 TB/s at b1 x 16k / 32k (1.77 / 2.20 at 20 splits; H100, docs/PERF.md).
SMALL_GRID_WAVE_HDIM128 = 64 / 132
# Head dims the split epilogue serves: FA4's kernel up to 256, and the head-dim-512
# split-K kernel (its epilogue places both warpgroups' O halves; kernels/forward_split.py).
MAX_HEAD_DIM = 512
# Kernel designs whose epilogue the split-KV mixin replaces (validated on the GPU);
# the other head-dim-512 designs (split-PV, single-QK) run unsplit.
DESIGNS = ("fa4", "split_k")


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """How split calls are planned: the combine (COMBINES), the head dims (K and V
    alike) and page sizes that take a decode tile (decode_tile; one page per K/V tile,
    loaded by TMA), and whether split kernels launch as programmatic dependents
    (SplitVariant.pdl)."""

    combine: str
    decode_head_dims: tuple[int, ...]
    decode_page_sizes: tuple[int, ...]
    pdl: bool = False
    # K/V tiles each split block asks L2 for before it waits for the preceding grid
    # (SplitVariant.prefetch; needs pdl)
    prefetch: int = 0


SPLIT_PLANS = {
    # What the GPU suite validated before issue 18: FA4's combine block shape, decode
    # tiles for head dims 64/128 with dense keys or 64-token pages.
    "issue17": SplitPlan("fa4", (64, 128), (64,)),
    # Issue 18: the wide combine, decode tiles for head dims 64-256 and 128-token pages.
    "issue18": SplitPlan("wide", (64, 96, 128, 192, 256), (64, 128)),
    # issue18's tiles with the combine inside the split kernel (forward_split_fused.py):
    # the last split block of each (sequence, head, query tile) merges; one kernel.
    "issue18f": SplitPlan("fused", (64, 96, 128, 192, 256), (64, 128)),
    # issue18 with the split kernel launched as a programmatic dependent of the kernel
    # before it and both kernels at the maximum shared-memory carveout (the combine
    # used a smaller one: SMs reconfigure between the kernels).  H100, 2026-12-07: the
    # same time as issue18 at every benchmarked row (docs/PERF.md).
    "issue18p": SplitPlan("wide", (64, 96, 128, 192, 256), (64, 128), pdl=True),
    # issue18p whose split blocks prefetch their first 4 K/V tiles to L2 before the
    # wait, and whose combine lets the next PDL launch start as it begins waiting
    # (kernels/forward_split_prefetch.py).  H100, 2026-12-07: right, but 0.3-1.6 µs
    # slower per call.
    "issue18q": SplitPlan("wide", (64, 96, 128, 192, 256), (64, 128), pdl=True, prefetch=4),
}
# The plan new calls get: the newest whose kernels passed the GPU suite.  "issue18"
# did on 2026-12-07 (H100: every GPU case whose kernel differs from issue17's, 169 of
# 169, fuzz seed 20261208; docs/PERF.md).  "issue18f" is not the default until its
# cases pass.  JAX_FA4_SPLIT_PLAN picks another (benchmarks, the GPU suite, the Gemma
# example's before/after); bench_decode.py switches per call.
DEFAULT_PLAN = "issue18"
# Plans built but not yet decided on a GPU: what tests/precompile_device.sh builds besides
# the default unless PLANS names others (issue17, issue18p and issue18q were measured and
# rejected; building every plan costs ~500 more variants, ~16 min on 2 cores).
CANDIDATE_PLANS = ("issue18f",)
_plan_name = os.environ.get("JAX_FA4_SPLIT_PLAN", DEFAULT_PLAN)
if _plan_name not in SPLIT_PLANS:
    raise ValueError(f"JAX_FA4_SPLIT_PLAN={_plan_name!r}: expected one of {sorted(SPLIT_PLANS)}")
PLAN = SPLIT_PLANS[_plan_name]


@contextlib.contextmanager
def use_plan(name: str):
    """Plans split calls with SPLIT_PLANS[name] inside the block (benchmarks and tests
    compare plans in one process; a plan keeps what it chose, see split_options)."""
    global PLAN
    saved, PLAN = PLAN, SPLIT_PLANS[name]
    try:
        yield
    finally:
        PLAN = saved


# Shared memory a decode tile may fill with Q and its K/V stages: the H100's 227 KiB
# per block less room for the pipeline barriers and 1 KiB buffer alignment.
DECODE_SMEM_BYTES = 220 * 1024
# Largest split count FA4's combine kernel is compiled for (its log_max_splits).
COMBINE_LOG_MAX_SPLITS = 7


@dataclasses.dataclass(frozen=True)
class CombineConfig:
    """The block shape of FA4's combine kernel (flash_fwd_combine.py): each thread block
    merges `tile_m` output rows (query token x head) over `k_block` value columns with
    `threads` threads, keeping `stages - 1` splits' O-partial loads in flight."""

    tile_m: int
    k_block: int
    threads: int
    stages: int


# The combines a split variant may use: FA4's combine kernel with one of
# combine_config's block shapes, or "fused" (no combine kernel: the split kernel's
# last-arriving block merges, kernels/forward_split_fused.py).
COMBINES = ("fa4", "wide", "fused")


def combine_config(name: str, head_dim_v: int) -> CombineConfig:
    """"fa4": FA4 interface.py's own choice (128-column blocks of 8 rows, 64 and 16 for
    value head dims <= 64, 256 threads) with 8 stages.  A decode batch has few rows (32
    at batch 1: 4 thread blocks), so each block walks every split through 7 loads in
    flight: ~3 us after the split kernel at batch 1 (the issue-18 timeline, H100).
    "wide" (the "issue18" plan): 32-column blocks of 8 rows, 64 threads (one 16-byte load per
    thread and split), 16 stages: 4x the thread blocks at head dim 128, each reading
    a quarter of the bytes with 15 splits in flight."""
    if name == "fa4":
        return CombineConfig(8, 128, 256, 8) if head_dim_v > 64 else CombineConfig(16, 64, 256, 8)
    if name == "wide":
        return CombineConfig(8, 32, 64, 16)
    raise ValueError(f"unknown combine config {name!r} (wide, fa4)")


@dataclasses.dataclass(frozen=True)
class SplitVariant(KernelVariant):
    """The split-KV kernel for `base`, a dense-q variant with seqused_k and no sinks
    (the combine adds sinks once, so no split adds them)."""

    KIND = "sm90_forward_split"
    ABI = SPLIT_ABI
    SOURCES = SPLIT_SOURCES  # the base's FORWARD_SOURCES enter through its key
    SYMBOL_PREFIX = "jax_fa4_fwds_"

    base: ForwardVariant
    # FA4's combine kernel runs in the same launcher (results: out, lse, workspace);
    # False: the launcher writes the workspace only and JAX merges (sinks).
    fused_combine: bool = True
    # One of COMBINES: combine_config's block shape ("fa4" or "wide") for FA4's combine
    # kernel, or "fused" (the merge inside the split kernel).  An unfused variant keeps
    # "fa4", so it names no second object for the same code.
    combine: str = "fa4"
    # Launch the split kernel as a programmatic dependent of the kernel before it (its
    # launch and prologue overlap that kernel's tail; it waits before touching global
    # memory), and split and combine kernels with the maximum shared-memory carveout.
    pdl: bool = False
    # With pdl and a combine kernel: K/V tiles each split block prefetches to L2 before
    # it waits, and the combine lets its own dependents launch early
    # (kernels/forward_split_prefetch.py; 0: neither, and no key entry).
    prefetch: int = 0

    def __post_init__(self):
        if self.combine not in COMBINES:
            raise ValueError(f"unknown combine {self.combine!r} ({', '.join(COMBINES)})")
        if not self.fused_combine and self.combine != "fa4":
            raise ValueError("an unfused split variant has no combine block shape")
        if self.prefetch and not (self.pdl and self.fused_combine and self.combine != "fused"):
            raise ValueError("prefetch needs a PDL launch and a combine kernel")
        b = self.base
        if b.q_layout != "dense" or b.kv_layout == "packed":
            raise ValueError("split-KV needs dense q and dense or paged k/v")
        if b.has_sinks or not b.has_seqused_k or b.has_seqused_q:
            raise ValueError("split-KV variants take seqused_k, no seqused_q, no sinks")

    def key_extras(self) -> dict:
        # The base's whole key (its kind, ABI and sources too) and the combine kernel's
        # compiled split limit name the object as well.
        extras = {"combine_log_max_splits": COMBINE_LOG_MAX_SPLITS,
                  "base_key": json.loads(self.base.key())}
        if self.combine == "fused":  # its kernel code is in one more module
            extras["fused_source"] = kernel_source_digest(*FUSED_SPLIT_SOURCES)
        if self.prefetch:
            extras["prefetch_source"] = kernel_source_digest(*PREFETCH_SPLIT_SOURCES)
        return extras

    def as_dict(self) -> dict:
        d = super().as_dict()
        if not self.prefetch:  # the key (and spec) of variants that predate it
            del d["prefetch"]
        return d

    def describe_parts(self) -> list[str]:
        return [self.base.describe(), "split-KV" + (
            (" + combine" + ("" if self.combine == "fa4" else f" ({self.combine})"))
            if self.fused_combine else "")]


def decode_tile(head_dim: int, tile_n: int) -> TileConfig | None:
    """The decode tile for (head_dim, head_dim) K/V blocks of tile_n keys: 64 query rows
    (one MMA warpgroup: a decode step fills 8 rows at GQA 8, FA4's 128-row tiles use 8
    of 128) and as many K/V stages as fit DECODE_SMEM_BYTES, at most 4; None if fewer
    than 2 fit.  (hdim 128, 64 keys: 4 stages; hdim 256: 2; hdim 128 with 128-token
    pages: 3.)"""
    pad = -(-head_dim // 16) * 16
    q_bytes = 64 * pad * 2
    stage_bytes = 2 * tile_n * pad * 2
    stages = min(4, (DECODE_SMEM_BYTES - q_bytes) // stage_bytes)
    if stages < 2:
        return None
    return TileConfig(64, tile_n, mma_pv_is_rs=True, intra_wg_overlap=True, num_stages=stages)


def decode_variant(v: ForwardVariant, page_size: int | None) -> ForwardVariant:
    """The variant the split kernel builds on for calls planned as `v` (page_size: the
    paged cache's, None for dense k/v).

    Head dims in PLAN.decode_head_dims (K and V alike) with dense keys or 64-token pages
    take a 64 x 64 decode tile (decode_tile), 128-token pages (if in
    PLAN.decode_page_sizes) a 64 x 128 one; pages are then
    loaded by TMA, one page per K/V tile, instead of FA4's cp.async gathers.  Measured
    on H100 at head dim 128 (docs/PERF.md): up to 26 % less kernel time at batch 1, the
    same at batch 8.  Other head dims and page sizes keep `v`."""
    if (v.tile.design != "fa4" or v.head_dim != v.head_dim_v
            or v.head_dim not in PLAN.decode_head_dims):
        return v
    if v.kv_layout == "dense":
        tile = decode_tile(v.head_dim, 64)
        return dataclasses.replace(v, tile=tile) if tile else v
    if v.kv_layout == "paged" and page_size in PLAN.decode_page_sizes:
        tile = decode_tile(v.head_dim, page_size)
        return dataclasses.replace(v, tile=tile, paged_tma=True) if tile else v
    return v


def split_options(v: ForwardVariant) -> dict:
    """What PLAN gives the split kernel of calls planned as `v`: its combine and whether
    it launches as a programmatic dependent (SplitVariant's fields; read when the call
    is planned, and the plan keeps them).  Sinks merge in JAX, so their unfused variant
    keeps "fa4"; the in-kernel merge ("fused") serves FA4's kernel design only -- the
    head-dim-512 split-K epilogue places O over two warpgroups its own way, and the
    merge failed there on the GPU (H100, 2026-12-07) -- so split-K takes "wide"."""
    combine = PLAN.combine
    if v.has_sinks:
        combine = "fa4"
    elif combine == "fused" and v.tile.design != "fa4":
        combine = "wide"
    # the prefetch rides on the combine kernel's early trigger: not for sinks (merged in
    # JAX) or the in-kernel merge
    prefetch = PLAN.prefetch if PLAN.pdl and not v.has_sinks and combine != "fused" else 0
    return {"combine": combine, "pdl": PLAN.pdl, "prefetch": prefetch}


def split_variant(v: ForwardVariant, combine: str, pdl: bool, prefetch: int = 0) -> SplitVariant:
    """The split-KV kernel serving calls planned as `v` (sinks move to the combine;
    dense k/v get an explicit seqused_k), with split_options' `combine`, `pdl` and
    `prefetch`."""
    return SplitVariant(dataclasses.replace(v, has_sinks=False, has_seqused_k=True),
                        fused_combine=not v.has_sinks, combine=combine, pdl=pdl,
                        prefetch=prefetch)


def pad16(n):
    """`n` float32 (or int32) elements rounded up to 16 bytes; plain arithmetic, so the
    kernels' launchers and epilogues use it on the DSL's integers as well."""
    return (n + 3) // 4 * 4


def lse_region(batch: int, heads: int, seq_q: int, splits: int) -> int:
    """float32 elements before o_partial: the LSE partials, padded to 16 bytes."""
    return pad16(splits * batch * heads * seq_q)


def workspace_size(batch: int, heads: int, seq_q: int, head_dim_v: int, splits: int,
                   fused: bool = False) -> int:
    """float32 elements of the workspace (see the module docstring; `fused`: with the
    final LSE and the arrival counters after it, see fused_regions)."""
    if fused:
        return fused_regions(batch, heads, seq_q, head_dim_v, splits)[1] + batch * heads * seq_q
    return lse_region(batch, heads, seq_q, splits) + splits * batch * heads * seq_q * head_dim_v


def fused_regions(batch: int, heads: int, seq_q: int, head_dim_v: int,
                  splits: int) -> tuple[int, int]:
    """Offsets (float32 elements) of the final LSE (batch, heads, seq_q) and of the int32
    arrival counters (batch * heads * seq_q of them; the kernel uses one per (sequence,
    head, query tile)) in a fused-combine workspace, after o_partial; both padded to
    16 bytes like the LSE partials."""
    lse_at = lse_region(batch, heads, seq_q, splits) + splits * batch * heads * seq_q * head_dim_v
    return lse_at, lse_at + pad16(batch * heads * seq_q)


def choose_num_splits(batch: int, kv_heads: int, m_blocks: int, n_blocks: int,
                      num_sms: int = NUM_SMS, head_dim: int | None = None) -> int:
    """How many key slices per (sequence, KV head, query tile), FA2/FA3-style.

    batch * kv_heads * m_blocks thread blocks run without splitting; when that fills
    most of the GPU, splitting only adds combine work.  Otherwise pick the smallest
    split count whose wave efficiency (blocks / (SMs * waves)) is within 10% of the
    best, keeping >= MIN_BLOCKS_PER_SPLIT key blocks per split; small grids stop at
    SMALL_GRID_WAVE of a wave (SMALL_GRID_WAVE_HDIM128 for head_dim <= 128).

    n_blocks is the key blocks of the *longest possible* sequence (cache capacity):
    lengths are traced, so a skewed batch (one long sequence among short ones) is sized
    for its long sequence, whose S slices then spread over the SMs; the short sequences'
    surplus slices get no keys and finish after one masked block.
    """
    tiles = batch * kv_heads * m_blocks
    if tiles >= 0.8 * num_sms or n_blocks < 2 * MIN_BLOCKS_PER_SPLIT:
        return 1
    limit = min(MAX_SPLITS, n_blocks // MIN_BLOCKS_PER_SPLIT, max(1, MAX_GRID_Z // batch))
    effs = {}
    for s in range(1, limit + 1):
        waves = tiles * s / num_sms
        effs[s] = waves / math.ceil(waves)
    best = max(effs.values())
    s = next(s for s in sorted(effs) if effs[s] >= 0.9 * best)
    if tiles <= SMALL_GRID_TILES:
        wave = (SMALL_GRID_WAVE_HDIM128 if head_dim is not None and head_dim <= 128
                else SMALL_GRID_WAVE)
        s = min(s, math.ceil(wave * num_sms / tiles))
    return s
