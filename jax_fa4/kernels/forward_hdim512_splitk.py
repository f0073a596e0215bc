"""SM90 forward for head dim 512 (Gemma-4 global attention), split-K QK^T with an S
exchange: two MMA warpgroups share one 64-row query tile and split BOTH GEMMs evenly.

Why: WGMMA's N is at most 256, so one warpgroup cannot hold a 64 x 512 O tile, and
hdim 512 leaves room in shared memory only for 64 x 64 tiles with one K/V stage
(Q, K and V tiles are 64 KiB each).  The split-PV design (forward_hdim512.py) gives
each warpgroup 256 of the 512 O columns but has both compute the whole S = QK^T:
per KV block and warpgroup 2M MACs of QK^T (64x64x512) + 1M of PV (64x256x64), i.e.
1.5x the useful tensor work, and P goes through shared memory.  Here the QK^T
reduction dim is split instead:

  per KV block, warpgroup w (w = 0, 1), threads t = 0..127 of each:
  1. S_w = Q[:, 256w:256w+256] . K[:, 256w:256w+256]^T   one-warpgroup 64 x 64 SS WGMMA
     over half the head dim (per-warpgroup views of sQ / sK);
  2. exchange: thread t stores its 32 fp32 partial values to its warpgroup's buffer,
     reads thread t's values of the other warpgroup and adds.  Both warpgroups run the
     SAME one-warpgroup tiled MMA, so thread t of each holds the same S coordinates, and
     fp32 addition is commutative, so both now hold bit-identical full S;
  3. score_mod (softcap), mask and online softmax on the full S (redundant in both
     warpgroups, cheap; they must follow the exchange: tanh does not commute with the
     sum), P stays in registers;
  4. O[:, 256w:256w+256] += P . V[:, 256w:256w+256]   one-warpgroup 64 x 256 RS WGMMA.

Tensor work per warpgroup and block: 1M (QK half) + 1M (PV half) MACs, no duplication.
Measured on H100 (docs/PERF.md): 511 vs 374 TFLOP/s for split-PV at b2 s8192 32/4 heads
causal, 467-536 over the benchmarked shapes.
The loop is FA4's intra-warpgroup-overlap main loop unchanged (QK^T of block j+1 is
issued, then PV of block j, then QK is waited for); the exchange is hooked in as the
first step of the score modification that FA4 runs right after that wait
(`_with_exchange`).  Everything else - TMA loads, pipelines, masks, windows, packed
GQA, varlen, paged KV, softcap, sinks, LSE - is FA4's code path.

Exchange buffer: per warpgroup 128 threads x 32 fp32 = 16 KiB, laid out as 16-byte
vectors with the thread index fastest (a warp's 16 B stores and loads hit consecutive
addresses: no bank conflicts, no swizzle needed).  One buffer per warpgroup, guarded by
two named-barrier pairs (writer arrives "full" after storing, reader syncs on it;
reader arrives "empty" after loading, writer syncs on it before the next store; one
initial "empty" arrival per reader).  Double buffering by block parity would avoid the
empty barrier but needs 64 KiB, which does not fit (the empty wait almost never blocks:
the reader loaded long before the writer's next QK^T finishes).

Shared memory (bf16, hdim 512, tile 64 x 64, one K/V stage), each 1024 B aligned:
  mbarriers 48 B -> 1 KiB, V 64 KiB, Q 64 KiB (O staging reuses it), K 64 KiB,
  S exchange 2 x 16 KiB (in FA4's sP slot: P itself stays in registers)
  = 225 KiB of the 227 KiB an SM90 block may use.

Registers (240 per MMA thread): O 128 fp32, S 32, P 16 (bf16 pairs), the other
warpgroup's partial S 32 while adding, softmax row stats: no spills (ptxas -v on the
PTX, CUTE_DSL_KEEP=ptx).  Keeping the Q half in registers for an RS QK^T (64 more
registers per thread, half the QK^T shared-memory reads) was tried: it spills, so
QK^T stays SS.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils_basic
from cutlass import Float32
from cutlass.cute.nvgpu import warpgroup
from cutlass.utils import LayoutEnum
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
from flash_attn.cute.named_barrier import NamedBarrierFwd
from quack import sm90_utils

_WG = 128  # threads per warpgroup
_NUM_WG = 2
# Named barriers after FA4's forward ones (hardware has 16): "partial S of warpgroup w
# stored" and "partial S of warpgroup w consumed".
_BAR_FULL = max(int(b) for b in NamedBarrierFwd) + 1  # + w
_BAR_EMPTY = _BAR_FULL + _NUM_WG  # + w


class FlashAttentionForwardSm90SplitK(FlashAttentionForwardSm90):
    """FA4's SM90 forward with QK^T split along the head dim and PV along the value head
    dim over two warpgroups (see module doc).  Construct like FA4's class with
    tile_m=64, tile_n=64, num_stages=1, mma_pv_is_rs=True, intra_wg_overlap=True."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        assert self.tile_m == 64, "both warpgroups share one 64-row query tile"
        assert self.mma_pv_is_rs, "P stays in registers (its smem slot holds the S exchange)"
        assert self.intra_wg_overlap, "the exchange is hooked into the overlapped main loop"
        assert not self.Q_in_regs
        self.qk_half = self.tile_hdim // _NUM_WG  # reduction dim of each warpgroup's QK^T
        self.pv_half = self.tile_hdimv // _NUM_WG  # O columns of each warpgroup
        assert self.qk_half % 16 == 0 and self.pv_half % 16 == 0 and self.pv_half <= 256

    # ---- tiled MMAs --------------------------------------------------------------
    def _tiled_mma(self, atoms_n, tiler_n, b_major, a_source):
        return sm90_utils_basic.make_trivial_tiled_mma(
            self.dtype, self.dtype, warpgroup.OperandMajorMode.K, b_major, Float32,
            atom_layout_mnk=(1, atoms_n, 1), tiler_mn=(64, tiler_n), a_source=a_source,
        )

    def _get_tiled_mma(self):
        # What FA4's __call__ and epilogue see: two warpgroups (-> 2 MMA warpgroups, 240
        # registers each, 256 epilogue threads); the PV one places warpgroup w on O
        # columns [w*pv_half, (w+1)*pv_half), which is what the epilogue must store.
        # The main loop uses the one-warpgroup MMAs of `_wg_tiled_mmas` instead.
        return (
            self._tiled_mma(_NUM_WG, self.tile_n, warpgroup.OperandMajorMode.K,
                            warpgroup.OperandSource.SMEM),
            self._tiled_mma(_NUM_WG, self.pv_half, warpgroup.OperandMajorMode.MN,
                            warpgroup.OperandSource.RMEM),
        )

    def _wg_tiled_mmas(self):
        return (
            self._tiled_mma(1, self.tile_n, warpgroup.OperandMajorMode.K,
                            warpgroup.OperandSource.SMEM),
            self._tiled_mma(1, self.pv_half, warpgroup.OperandMajorMode.MN,
                            warpgroup.OperandSource.RMEM),
        )

    def _get_shared_storage_cls(self):
        # FA4's __call__ sets sP_layout (None: P in registers) right before this and
        # passes it to the kernel, which allocates sP from it: claim that slot for the
        # S exchange, 2 warpgroups x tile_m*tile_n fp32 = 4 bf16 tiles of tile_m x tile_n.
        self.sP_layout = sm90_utils.make_smem_layout(
            self.dtype, LayoutEnum.ROW_MAJOR, (self.tile_m, self.tile_n), 2 * _NUM_WG
        )
        return super()._get_shared_storage_cls()

    # ---- main loop ---------------------------------------------------------------
    def mma(self, tiled_mma_qk, tiled_mma_pv, mO, mLSE, sQ, sK, sVt, sP, sO, learnable_sink,
            pipeline_k, pipeline_v, pipeline_q, gmem_tiled_copy_O, tma_atom_O, tidx, *args):
        """Runs FA4's consumer main loop per warpgroup on its halves of Q/K and V^T with
        one-warpgroup MMAs (thread index local to the warpgroup); the epilogue gets the
        two-warpgroup PV MMA and the block's thread index back (see `epilogue`)."""
        wg = cute.arch.make_warp_uniform(tidx // _WG)
        wg_tidx = tidx % _WG
        # Per-warpgroup operand views: columns [w*half, (w+1)*half) of Q and K (rows of
        # V^T).  The SW128 K-major layouts tile rows first, so each half is a whole
        # number of 1 KiB swizzle atoms: a canonical GMMA operand of its own.
        sQ_w = cute.flat_divide(sQ, (self.tile_m, self.qk_half))[None, None, 0, wg]
        sK_w = cute.flat_divide(sK, (self.tile_n, self.qk_half))[None, None, 0, wg, None]
        sVt_w = cute.flat_divide(sVt, (self.pv_half, self.tile_n))[None, None, wg, 0, None]

        # S exchange buffer (fp32 view of the sP slot): (thread, (4-vector, vector), wg).
        n_s = self.tile_m * self.tile_n // _WG
        sX = cute.make_tensor(
            cute.recast_ptr(sP.iterator, dtype=Float32),
            cute.make_layout((_WG, (4, n_s // 4), _NUM_WG), stride=(4, (1, 4 * _WG), n_s * _WG)),
        )
        self._xchg = (sX[wg_tidx, None, wg], sX[wg_tidx, None, 1 - wg], wg, n_s)
        # The other warpgroup's buffer starts out free: this warpgroup has read nothing.
        cute.arch.barrier_arrive(barrier_id=_BAR_EMPTY + (1 - wg),
                                 number_of_threads=_NUM_WG * _WG)

        self._epilogue_args = (tiled_mma_pv, tidx)
        tiled_mma_qk_wg, tiled_mma_pv_wg = self._wg_tiled_mmas()
        hdimv = self.tile_hdimv
        self.tile_hdimv = self.pv_half  # FA4's mma sizes acc_O by it
        FlashAttentionForwardSm90.mma(
            self, tiled_mma_qk_wg, tiled_mma_pv_wg, mO, mLSE, sQ_w, sK_w, sVt_w, None, sO,
            learnable_sink, pipeline_k, pipeline_v, pipeline_q, gmem_tiled_copy_O,
            tma_atom_O, wg_tidx, *args,
        )
        self.tile_hdimv = hdimv

    def _exchange_S(self, acc_S):
        """acc_S (this thread's partial S fragment) += the other warpgroup's."""
        mine, other, wg, n_s = self._xchg
        nthr = _NUM_WG * _WG
        acc = cute.make_tensor(acc_S.iterator, cute.make_layout((4, n_s // 4), stride=(1, 4)))
        cute.arch.barrier(barrier_id=_BAR_EMPTY + wg, number_of_threads=nthr)
        cute.autovec_copy(acc, mine)
        cute.arch.barrier_arrive(barrier_id=_BAR_FULL + wg, number_of_threads=nthr)
        theirs = cute.make_rmem_tensor(cute.make_layout((4, n_s // 4), stride=(1, 4)), Float32)
        cute.arch.barrier(barrier_id=_BAR_FULL + (1 - wg), number_of_threads=nthr)
        cute.autovec_copy(other, theirs)
        cute.arch.barrier_arrive(barrier_id=_BAR_EMPTY + (1 - wg), number_of_threads=nthr)
        acc.store(acc.load() + theirs.load())

    def _with_exchange(self, score_mod_fn):
        """FA4's loop calls score_mod_fn first thing after the QK^T wait (when given):
        complete S there, then apply the real score_mod (if any) to the full S."""

        def exchange_then_score_mod(acc_S, n_block, seqlen):
            self._exchange_S(acc_S)
            if cutlass.const_expr(score_mod_fn is not None):
                score_mod_fn(acc_S, n_block=n_block, seqlen=seqlen)

        return exchange_then_score_mod

    def first_half_block_overlap(self, *args, score_mod_fn=None, **kwargs):
        return FlashAttentionForwardSm90.first_half_block_overlap(
            self, *args, score_mod_fn=self._with_exchange(score_mod_fn), **kwargs)

    def mma_one_n_block_intrawg_overlap(self, *args, score_mod_fn=None, **kwargs):
        return FlashAttentionForwardSm90.mma_one_n_block_intrawg_overlap(
            self, *args, score_mod_fn=self._with_exchange(score_mod_fn), **kwargs)

    def mma_one_n_block(self, *args, **kwargs):
        raise AssertionError("split-K needs intra_wg_overlap (the exchange hook)")

    # ---- epilogue ----------------------------------------------------------------
    def whole_o_epilogue_mma(self):
        """(tiled MMA, thread index, O columns) that place both warpgroups' acc_O in the
        whole O tile: for epilogues that replace FA4's (the split-KV one)."""
        tiled_mma_pv, block_tidx = self._epilogue_args
        return tiled_mma_pv, block_tidx, _NUM_WG * self.tile_hdimv

    def epilogue(self, acc_O, lse, mO, mLSE, sO, seqlen, gmem_tiled_copy_O, tma_atom_O,
                 tiled_mma, tidx, m_block, head_idx, batch_idx):
        """FA4's epilogue over the whole 64 x hdim_v O tile: with the two-warpgroup PV
        MMA and block thread index, warpgroup w's registers land in its O columns, and
        only column-0 threads (warpgroup 0) write the LSE."""
        tiled_mma_pv, block_tidx = self._epilogue_args
        pv_half = self.tile_hdimv
        self.tile_hdimv = _NUM_WG * pv_half
        FlashAttentionForwardSm90.epilogue(
            self, acc_O, lse, mO, mLSE, sO, seqlen, gmem_tiled_copy_O, tma_atom_O,
            tiled_mma_pv, block_tidx, m_block, head_idx, batch_idx)
        self.tile_hdimv = pv_half
