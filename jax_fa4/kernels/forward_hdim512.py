"""SM90 forward for head dims above 256 (Gemma-4 global attention: 512), on FA4's
`FlashAttentionForwardSm90`.

FA4 builds its PV GEMM as one 64 x hdim_v warpgroup MMA per warpgroup; WGMMA's N is
at most 256, so hdim_v 512 does not compile ("8 <= N <= 256").  The split-PV design
here gives both GEMMs two warpgroups along N:

- PV: a (tile_m/64, 2, 1) atom layout of 64 x 256 atoms: warpgroup w owns O columns
  [256w, 256w+256) (each thread holds 128 accumulators instead of 256).
- QK^T: the same (.., 2, 1) atom layout over a 64 x tile_n atom.  The tile has a single
  atom along N, so CuTe maps both warpgroups onto the same S columns: each warpgroup
  computes the full S tile and its softmax (rows, max, sum, rescale all stay local to
  the warpgroup, FA4's Softmax needs no change).  This duplicates the QK^T work: per
  KV block 2 x (QK^T 64x64x512) + 2 x (PV 64x256x64), i.e. 1.5x the useful tensor-core
  work.
- P goes through shared memory (the PV A operand must be the whole 64 x tile_n P, and
  a register-sourced A would need its own layout); each warpgroup writes its own copy of
  P.  FA4 lets each warp write its P and read it back after a `syncwarp`, which assumes
  one writer per row; with two warpgroups writing the same rows, one running a block
  ahead would overwrite the P the other's PV GEMM is still reading.
- Tile 64 x 64 and one K/V stage: Q, K and V tiles are 64 KiB each at hdim 512, so
  Q + K + V + 2 P copies (8 KiB each) = 208 KiB of the 227 KiB of shared memory.

Masks, windows, softcap, sinks, packed GQA, varlen and paged KV are FA4's code paths
unchanged: they index S through the QK tiled MMA's partition, which is per warpgroup.
"""
from __future__ import annotations

import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils_basic
from cutlass import Float32
from cutlass.cute.nvgpu import warpgroup
from cutlass.utils import LayoutEnum
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
from quack import sm90_utils

# The widest WGMMA: N <= 256.
_MAX_MMA_N = 256


class FlashAttentionForwardSm90SplitPV(FlashAttentionForwardSm90):
    """FA4's SM90 forward with O split across two MMA warpgroups (see module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        assert not self.mma_pv_is_rs, "split PV reads P from shared memory"
        assert self.tile_m == 64, "one 64-row warpgroup tile, duplicated along N"
        assert self.tile_hdimv == 2 * _MAX_MMA_N, "each warpgroup owns 256 columns of O"
        # FA4's epilogue stages O (tile_m x hdim_v) in Q's shared memory.
        assert self.tile_hdim >= self.tile_hdimv, "O must fit in Q's shared memory"

    def _get_tiled_mma(self):
        def tiled_mma(tiler_n, b_major, a_source):
            return sm90_utils_basic.make_trivial_tiled_mma(
                self.dtype, self.dtype, warpgroup.OperandMajorMode.K, b_major, Float32,
                atom_layout_mnk=(self.tile_m // 64, 2, 1), tiler_mn=(64, tiler_n),
                a_source=a_source,
            )

        smem = warpgroup.OperandSource.SMEM
        return (tiled_mma(self.tile_n, warpgroup.OperandMajorMode.K, smem),
                tiled_mma(_MAX_MMA_N, warpgroup.OperandMajorMode.MN, smem))

    def _get_shared_storage_cls(self):
        # Called by __call__ right after it sets sP_layout (one tile_m x tile_n P) and
        # before it passes sP_layout to the kernel: give P one stage per warpgroup.
        self.sP_layout = sm90_utils.make_smem_layout(
            self.dtype, LayoutEnum.ROW_MAJOR, (self.tile_m, self.tile_n), self.num_wg_mma
        )
        return super()._get_shared_storage_cls()

    @cute.jit
    def mma(self, tiled_mma_qk, tiled_mma_pv, mO, mLSE, sQ, sK, sVt, sP, sO, *args, **kwargs):
        # Each warpgroup reads and writes its own stage of sP (see _get_shared_storage_cls).
        tidx = cute.arch.thread_idx()[0] - 128
        warp_group_idx = cute.arch.make_warp_uniform(tidx // self.num_threads_per_warp_group)
        sP_wg = sP[None, None, warp_group_idx]
        FlashAttentionForwardSm90.mma(self, tiled_mma_qk, tiled_mma_pv, mO, mLSE, sQ, sK, sVt,
                                      sP_wg, sO, *args, **kwargs)

