"""SM90 forward for head dims above 256 (Gemma-4 global attention: 512), on FA4's
`FlashAttentionForwardSm90`: two designs, split-PV and single-QK.

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

The single-QK design (FlashAttentionForwardSm90SingleQK) removes the duplicated QK^T:
warpgroup 0 alone computes S, the mask and the online softmax, and hands P and the row
rescale factors to warpgroup 1 through shared memory (two buffers, alternating per KV
block, behind full/empty named barriers); each warpgroup runs the PV GEMM on its half of
O.  Per KV block the tensor cores do QK^T once + 2 PV halves = the counted work.
Warpgroup 0 overlaps its softmax of block j with its PV of block j-1 (FA4's intra-
warpgroup overlap); warpgroup 1 only waits for P, rescales and multiplies.
"""
from __future__ import annotations

from functools import partial

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils_basic
from cutlass import Float32, Int32, const_expr
from cutlass.cute.nvgpu import warpgroup
from cutlass.utils import LayoutEnum
from flash_attn.cute import utils
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
from flash_attn.cute.named_barrier import NamedBarrierFwd
from flash_attn.cute.softmax import Softmax
from flash_attn.cute.utils import AuxData
from quack import layout_utils, sm90_utils

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



# Named barriers of the single-QK handoff, after FA4's own (NamedBarrierFwd); buffer b
# uses _P_FULL + b and _P_EMPTY + b.  16 exist per CTA.
_P_FULL = int(max(NamedBarrierFwd)) + 1
_P_EMPTY = _P_FULL + 2
_P_BUFFERS = 2


def _advanced(state, count=1):
    """A pipeline state `count` stages on.  Loops rebind their state to this rather than
    calling advance() in place, so that the DSL carries it as a loop variable."""
    state = state.clone()
    state.advance(count)
    return state


class FlashAttentionForwardSm90SingleQK(FlashAttentionForwardSm90SplitPV):
    """Warpgroup 0 computes S and the softmax once; both warpgroups multiply P by their
    half of V (see module doc).  Reuses the split-PV tiled MMAs: the QK^T one maps both
    warpgroups onto the same S tile, and only warpgroup 0 issues it.  sP holds
    _P_BUFFERS buffers (split-PV's per-warpgroup stages; here: per block parity)."""

    @cute.jit
    def mma(self, tiled_mma_qk, tiled_mma_pv, mO, mLSE, sQ, sK, sVt, sP, sO, learnable_sink,
            pipeline_k, pipeline_v, pipeline_q, gmem_tiled_copy_O, tma_atom_O, tidx,
            softmax_scale_log2, softmax_scale, block_info, SeqlenInfoCls, AttentionMaskCls,
            TileSchedulerCls, blocksparse_tensors, aux_data=AuxData(), fastdiv_mods=None):
        assert blocksparse_tensors is None and self.mask_mod is None
        wg = cute.arch.make_warp_uniform(tidx // self.num_threads_per_warp_group)
        wg_layout = cute.make_layout(self.num_wg_mma, stride=self.num_threads_per_warp_group)
        thr_mma_qk = tiled_mma_qk.get_slice(tidx)
        wg_mma_qk = tiled_mma_qk.get_slice(wg_layout(wg))
        wg_mma_pv = tiled_mma_pv.get_slice(wg_layout(wg))
        _, tSrQ, tSrK = sm90_utils.partition_fragment_ABC(
            wg_mma_qk, (self.tile_m, self.tile_n, self.tile_hdim), sQ, sK)
        acc_O, tOrP, tOrVt = sm90_utils.partition_fragment_ABC(
            wg_mma_pv, (self.tile_m, self.tile_hdimv, self.tile_n), sP, sVt)
        smem_thr_copy_P = cute.make_tiled_copy_C(
            utils.get_smem_store_atom(90, self.dtype), tiled_mma_qk).get_slice(tidx)
        tPsP = smem_thr_copy_P.partition_D(sP)
        # Row rescale factors, one column per P buffer.
        sScale = cute.make_tensor(cute.arch.alloc_smem(Float32, self.tile_m * _P_BUFFERS, 16),
                                  cute.make_layout((self.tile_m, _P_BUFFERS)))
        # This thread's rows of S (and of O: same M layout in both accumulators).
        tScS_mn = layout_utils.reshape_acc_to_mn(
            thr_mma_qk.partition_C(cute.make_identity_tensor((self.tile_m, self.tile_n))))
        softmax = Softmax.create(softmax_scale_log2, num_rows=acc_O.shape[0][0] * acc_O.shape[1],
                                 softmax_scale=softmax_scale)
        ctx = dict(tSrQ=tSrQ, tSrK=tSrK, acc_O=acc_O, tOrP=tOrP, tOrVt=tOrVt,
                   smem_thr_copy_P=smem_thr_copy_P, tPsP=tPsP, sScale=sScale,
                   tScS_mn=tScS_mn, tiled_mma_qk=tiled_mma_qk, tiled_mma_pv=tiled_mma_pv,
                   pipeline_k=pipeline_k, pipeline_v=pipeline_v)

        q_phase = Int32(0)
        p_count = Int32(0)  # P buffers handed over so far (both warpgroups count alike)
        kv_state = cutlass.pipeline.make_pipeline_state(
            cutlass.pipeline.PipelineUserType.Consumer, self.num_stages)
        if wg == 1:  # both P buffers start empty
            for b in cutlass.range_constexpr(_P_BUFFERS):
                cute.arch.barrier_arrive(barrier_id=_P_EMPTY + b,
                                         number_of_threads=2 * self.num_threads_per_warp_group)
        tile_scheduler = TileSchedulerCls()
        work_tile = tile_scheduler.initial_work_tile_info()
        while work_tile.is_valid_tile:
            m_block, head_idx, batch_idx, _ = work_tile.tile_idx
            seqlen = SeqlenInfoCls(batch_idx)
            n_block_min, n_block_max = block_info.get_n_block_min_max(seqlen, m_block)
            pipeline_q.consumer_wait_w_index_phase(0, q_phase)
            acc_O.fill(0.0)
            # FA4's producer always loads the last block, even if the range is empty.
            n_iter = cutlass.max(n_block_max - n_block_min, 1)
            if wg == 0:
                self._qk_softmax_pv(
                    ctx, softmax, kv_state.clone(), p_count, seqlen, AttentionMaskCls(seqlen),
                    block_info, m_block, head_idx, batch_idx, n_block_min, n_block_max,
                    learnable_sink, thr_mma_qk, softmax_scale, aux_data, fastdiv_mods)
            else:
                self._pv(ctx, softmax, kv_state.clone(), p_count, n_iter)
            # Both warpgroups consumed n_iter K/V blocks and n_iter + 1 P buffers.
            kv_state = _advanced(kv_state, n_iter)
            p_count += n_iter + 1
            pipeline_q.consumer_release_w_index(0)
            q_phase ^= 1
            self.epilogue(acc_O, softmax.row_sum, mO, mLSE, sO, seqlen, gmem_tiled_copy_O,
                          tma_atom_O, tiled_mma_pv, tidx, m_block, head_idx, batch_idx)
            tile_scheduler.advance_to_next_work()
            work_tile = tile_scheduler.get_current_work()

    @cute.jit
    def _publish(self, ctx, acc_S, row_scale, p_count):
        """Warpgroup 0: P (unless acc_S is None) and the row factors into buffer
        p_count % 2, once warpgroup 1 has released it."""
        buf = p_count % _P_BUFFERS
        n = 2 * self.num_threads_per_warp_group
        cute.arch.barrier(barrier_id=_P_EMPTY + buf, number_of_threads=n)
        if const_expr(acc_S is not None):
            tOrP_acc = layout_utils.reshape_acc_to_frgA(acc_S)
            tOrP_cur = cute.make_rmem_tensor_like(tOrP_acc, self.dtype)
            utils.cvt_f16(tOrP_acc, tOrP_cur)
            copy_P = ctx["smem_thr_copy_P"]
            cute.copy(copy_P, copy_P.retile(tOrP_cur), ctx["tPsP"][None, None, None, buf])
        tScS_mn = ctx["tScS_mn"]
        # The 4 threads of a quad share rows and write the same factor.
        for r in cutlass.range_constexpr(cute.size(row_scale)):
            ctx["sScale"][tScS_mn[r, 0][0], buf] = row_scale[r]
        cute.arch.fence_view_async_shared()  # P visible to both warpgroups' WGMMA
        cute.arch.sync_warp()
        cute.arch.barrier_arrive(barrier_id=_P_FULL + buf, number_of_threads=n)
        return p_count + 1

    @cute.jit
    def _receive(self, ctx, softmax, p_count):
        """Warpgroup 1: waits for buffer p_count % 2 and rescales O by its row factors."""
        buf = p_count % _P_BUFFERS
        cute.arch.barrier(barrier_id=_P_FULL + buf,
                          number_of_threads=2 * self.num_threads_per_warp_group)
        row_scale = cute.make_rmem_tensor_like(softmax.row_max, Float32)
        tScS_mn = ctx["tScS_mn"]
        for r in cutlass.range_constexpr(cute.size(row_scale)):
            row_scale[r] = ctx["sScale"][tScS_mn[r, 0][0], buf]
        softmax.rescale_O(ctx["acc_O"], row_scale)
        return buf

    def _release(self, p_count):
        cute.arch.barrier_arrive(barrier_id=_P_EMPTY + p_count % _P_BUFFERS,
                                 number_of_threads=2 * self.num_threads_per_warp_group)

    @cute.jit
    def _pv(self, ctx, softmax, kv_state, p_count, n_iter):
        """Warpgroup 1's main loop: per KV block, O_half = O_half * scale + P V_half."""
        pipeline_k, pipeline_v = ctx["pipeline_k"], ctx["pipeline_v"]
        for _ in cutlass.range(n_iter, unroll=1):
            # K is warpgroup 0's, but its pipeline counts every MMA warp's release.
            pipeline_k.consumer_wait(kv_state, pipeline_k.consumer_try_wait(kv_state))
            pipeline_k.consumer_release(kv_state)
            buf = self._receive(ctx, softmax, p_count)
            pipeline_v.consumer_wait(kv_state, pipeline_v.consumer_try_wait(kv_state))
            sm90_utils.gemm_w_idx(ctx["tiled_mma_pv"], ctx["acc_O"], ctx["tOrP"], ctx["tOrVt"],
                                  zero_init=False, A_idx=buf, B_idx=kv_state.index, wg_wait=0)
            pipeline_v.consumer_release(kv_state)
            self._release(p_count)
            p_count += 1
            kv_state = _advanced(kv_state)
        # Final 1 / row_sum.
        self._receive(ctx, softmax, p_count)
        self._release(p_count)

    @cute.jit
    def _qk_softmax_pv(self, ctx, softmax, kv_state, p_count, seqlen, mask, block_info,
                       m_block, head_idx, batch_idx, n_block_min, n_block_max, learnable_sink,
                       thr_mma_qk, softmax_scale, aux_data, fastdiv_mods):
        """Warpgroup 0's main loop: S = Q K^T, mask, online softmax, hand over P, and its
        own PV of the previous block (issued together with the next QK^T)."""
        pipeline_k, pipeline_v = ctx["pipeline_k"], ctx["pipeline_v"]
        acc_O = ctx["acc_O"]
        qk = partial(sm90_utils.gemm_zero_init, ctx["tiled_mma_qk"], (self.tile_m, self.tile_n),
                     ctx["tSrQ"], ctx["tSrK"])
        pv = partial(sm90_utils.gemm_w_idx, ctx["tiled_mma_pv"], acc_O, ctx["tOrP"],
                     ctx["tOrVt"], zero_init=False)

        # Blocks right of n_causal (causal/local diagonal) or left of n_local (the left
        # window edge) need masking; the first one (the sequence end) always does.
        n_causal = n_block_max
        n_local = n_block_min
        if const_expr(self.is_causal or self.is_local):
            n_causal = block_info.get_n_block_min_causal_local_mask(seqlen, m_block, n_block_min)
        if const_expr(self.is_local):
            n_local = block_info.get_n_block_min_before_local_mask(seqlen, m_block, n_block_min)

        score_mod_fn = None
        if const_expr(self.score_mod is not None):
            score_mod_fn = partial(self.apply_score_mod, thr_mma_qk, batch_idx, head_idx,
                                   m_block, softmax_scale=softmax_scale, seqlen=seqlen,
                                   aux_data=aux_data, fastdiv_mods=fastdiv_mods)
        mask_fn = partial(mask.apply_mask, batch_idx=batch_idx, head_idx=head_idx,
                          m_block=m_block, thr_mma=thr_mma_qk, mask_seqlen=True,
                          mask_causal=self.is_causal, mask_local=self.is_local,
                          aux_data=aux_data, fastdiv_mods=fastdiv_mods)

        n_block = n_block_max - 1
        pipeline_k.consumer_wait(kv_state, pipeline_k.consumer_try_wait(kv_state))
        acc_S = qk(B_idx=kv_state.index, wg_wait=0)
        pipeline_k.consumer_release(kv_state)
        if const_expr(score_mod_fn is not None):
            score_mod_fn(acc_S, n_block)
        mask_fn(acc_S, n_block=n_block)
        row_scale = softmax.online_softmax(acc_S, is_first=True, check_inf=True)
        p_count = self._publish(ctx, acc_S, row_scale, p_count)
        for i in cutlass.range(n_block_max - 1 - n_block_min, unroll=1):
            # Names first bound here stay inside the loop body: the DSL carries the
            # plain locals bound before the loop and rebound in it (kv_state, p_count).
            n_cur = n_block_max - 2 - i
            kv_prev = kv_state
            kv_state = _advanced(kv_state)
            pipeline_k.consumer_wait(kv_state, pipeline_k.consumer_try_wait(kv_state))
            acc_S_cur = qk(B_idx=kv_state.index, wg_wait=-1)
            pipeline_v.consumer_wait(kv_prev, pipeline_v.consumer_try_wait(kv_prev))
            pv(A_idx=(p_count - 1) % _P_BUFFERS, B_idx=kv_prev.index, wg_wait=-1)
            warpgroup.wait_group(1)
            pipeline_k.consumer_release(kv_state)
            if const_expr(score_mod_fn is not None):
                score_mod_fn(acc_S_cur, n_cur)
            if n_cur >= n_causal or n_cur < n_local:
                mask_fn(acc_S_cur, n_block=n_cur)
            scale_cur = softmax.online_softmax(acc_S_cur, check_inf=True)
            warpgroup.wait_group(0)
            pipeline_v.consumer_release(kv_prev)
            softmax.rescale_O(acc_O, scale_cur)
            p_count = self._publish(ctx, acc_S_cur, scale_cur, p_count)
        pipeline_v.consumer_wait(kv_state, pipeline_v.consumer_try_wait(kv_state))
        pv(A_idx=(p_count - 1) % _P_BUFFERS, B_idx=kv_state.index, wg_wait=0)
        pipeline_v.consumer_release(kv_state)

        final_scale = softmax.finalize(sink_val=self._sink(learnable_sink, softmax, thr_mma_qk,
                                                           m_block, head_idx))
        self._publish(ctx, None, final_scale, p_count)
        softmax.rescale_O(acc_O, final_scale)

    @cute.jit
    def _sink(self, learnable_sink, softmax, thr_mma_qk, m_block, head_idx):
        """The sink logit of each of this thread's rows (as FA4's mma computes it)."""
        sink_val = None
        if const_expr(learnable_sink is not None):
            if const_expr(not self.pack_gqa):
                sink_val = Float32(learnable_sink[head_idx])
            else:  # packed GQA: rows of one tile belong to different query heads
                sink_val = cute.make_rmem_tensor_like(softmax.row_max, Float32)
                tScS_mn = layout_utils.reshape_acc_to_mn(thr_mma_qk.partition_C(
                    cute.make_identity_tensor((self.tile_m, self.tile_n))))
                for r in cutlass.range(cute.size(sink_val), unroll_full=True):
                    row = m_block * self.tile_m + tScS_mn[r][0]
                    q_head = row % self.qhead_per_kvhead + head_idx * self.qhead_per_kvhead
                    sink_val[r] = Float32(learnable_sink[q_head])
        return sink_val
