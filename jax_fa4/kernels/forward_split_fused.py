"""Split-KV forward with the combine inside the split kernel (SplitPlan combine "fused",
kernels/split.py): one kernel where forward_split.py runs two.

At batch 1 the combine kernel after the splits costs ~3 us of a 20-30 us decode call
(docs/PERF.md, issue 18's timeline): a second grid that waits for the first to drain
and flush, then walks every split.  Here the S split blocks of one (sequence, head,
query tile) share an int32 arrival counter in the workspace.  Each block writes its
partial O and LSE (SplitKVMixin.epilogue), fences, and bumps the counter; the block
that arrives last merges the S partials of its rows -- just written, so read from L2 --
into the output and the LSE.  No block waits for another.

The counters are zeroed per call by a one-block kernel launched just before the split
kernel.  It triggers the split kernel's launch at once (programmatic dependent launch),
and the split kernel waits for it (griddepcontrol.wait, one thread) only before its
first counter bump, so the zeroing costs no serial step.  The zeroing kernel is an
ordinary launch: it starts after everything before it in the stream, and so does
everything the split kernel reads.

Workspace (float32 elements, kernels/split.fused_regions):
    lse_partial (padded) | o_partial | lse (B, N, Tq) (padded) | counters (B*N*Tq int32)
The final LSE lives in the workspace (the custom call's results are the output and
the workspace): jax_fa4/split_primitive.py slices it out, and XLA drops the slice
when nothing reads the LSE.
"""
from __future__ import annotations

# forward first: it sets CUTE_DSL_ARCH before cutlass is imported.
from .forward import _DTYPES, _fa4_kernel, cuda, cute, cutlass
from .forward_abi import operands
from .forward_split import (SMEM_CARVEOUT, SplitKVMixin, compile_split_launcher, partial_o,
                            run_split)
from .split import SplitVariant, fused_regions

from cutlass import Float32, Int32
from cutlass._mlir.dialects import llvm
from cutlass.cute.runtime import make_ptr
from cutlass.cutlass_dsl import T, dsl_user_op
from flash_attn.cute.named_barrier import NamedBarrierFwd
from flash_attn.cute.pack_gqa import pack_gqa_layout
from quack import layout_utils

ZERO_THREADS = 256
# Splits merged per L2 round trip (the loads of a chunk are all in flight at once):
# the batch-1 plans use 16 splits (kernels/split.py), 20 beyond 64k keys.
MERGE_CHUNK = 16
# Output columns per merging thread: 8 makes one item per thread at batch 1, head dim
# 128 (8 rows x 16 column groups = the MMA warpgroup's 128 threads), so the whole merge
# is one round trip (the SASS issues all 144 loads before the first exp; no spills).
MERGE_COLS = 8


@dsl_user_op
def _barrier_or(pred: Int32, barrier_id: int, num_threads: int, *, loc=None, ip=None) -> Int32:
    """CUDA's __syncthreads_or over a named barrier: 1 in every participating thread if
    `pred` was nonzero in any of them.  (The DSL's `barrier` has no reduction form.)"""
    return Int32(llvm.inline_asm(
        T.i32(), [Int32(pred).ir_value(loc=loc, ip=ip)],
        "{ .reg .pred p, q; setp.ne.u32 q, $1, 0; "
        f"bar.red.or.pred p, {barrier_id}, {num_threads}, q; selp.u32 $0, 1, 0, p; }}",
        "=r,r", has_side_effects=True, is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT))


class FusedSplitKVMixin(SplitKVMixin):
    """SplitKVMixin whose epilogue also merges, in the last-arriving split block, and
    whose kernel is launched as a programmatic dependent of the counter-zeroing kernel.
    `_fa4_cls` (set by fused_split_kernel) is the FA4 kernel class underneath."""

    # The zeroing kernel before it is an ordinary launch: everything the split kernel
    # reads is done before it launches, so only the counter bump waits (for the zeroing).
    _wait_for_prior_grid = False

    def kernel(self, *args, **kwargs):
        # FA4 passes O as a TMA coordinate tensor when it stores O by TMA; the merge
        # stores elements, so it gets the output itself, in FA4's kernel layout
        # ((G, Tq) or Tq, hv, heads, S*B), where FA4's own epilogue (replaced) took O.
        mO = layout_utils.select(self._o_raw, [1, 3, 2, 0])
        if cutlass.const_expr(self.pack_gqa):
            mO = pack_gqa_layout(mO, self.qhead_per_kvhead,
                                 self._o_raw.shape[2] // self.qhead_per_kvhead, head_idx=2)
        return SplitKVMixin.kernel(self, *args[:3], mO, *args[4:], **kwargs)

    @cute.jit
    def epilogue(self, acc_O, lse, mO, mLSE, sO, seqlen, gmem_tiled_copy_O, tma_atom_O,
                 tiled_mma, tidx, m_block, head_idx, batch_idx):
        SplitKVMixin.epilogue(self, acc_O, lse, mO, mLSE, sO, seqlen, gmem_tiled_copy_O,
                              tma_atom_O, tiled_mma, tidx, m_block, head_idx, batch_idx)
        nthr = self.num_mma_threads  # the epilogue runs on every MMA warpgroup
        S = seqlen.num_splits
        b = seqlen.batch
        hv = self.out_head_dim_v
        # mLSE: ((G, Tq), KV heads, S*B) with pack_gqa, else (Tq, N, S*B); the regions
        # after it: kernels/split.fused_regions (only N * Tq = rows * heads matters).
        rows = cute.size(mLSE.shape[0])
        heads = cute.size(mLSE.shape[1])
        batches = cute.size(mLSE.shape[2]) // S
        mOp = partial_o(mLSE, hv)
        lse_at, cnt_at = fused_regions(batches, rows * heads, 1, hv, S)
        # the final LSE (B, N, Tq) has the LSE partials' layout for virtual batch < B
        mFL = cute.make_tensor(mLSE.iterator + lse_at, mLSE.layout)
        cnt = cute.make_tensor(cute.recast_ptr(mLSE.iterator + cnt_at, dtype=Int32),
                               cute.make_layout(batches * rows * heads))
        m_blocks = (rows + self.tile_m - 1) // self.tile_m
        slot = (b * heads + head_idx) * m_blocks + m_block

        # The threads' partial writes meet at a barrier; thread 0's gpu-scope acq_rel
        # bump then publishes them all and, in the last block, acquires everyone
        # else's (causality runs through the CTA barriers: CUTLASS's semaphore
        # pattern, no fence per thread).  The arrival that completes S merges.
        cute.arch.barrier(barrier_id=int(NamedBarrierFwd.Epilogue), number_of_threads=nthr)
        last = Int32(0)
        if tidx == 0:
            cute.arch.griddepcontrol_wait()  # the zeroing kernel's writes are visible
            old = cute.arch.atomic_add(cnt.iterator + slot, Int32(1), sem="acq_rel",
                                       scope="gpu")
            if old == S - 1:
                last = Int32(1)
        last = _barrier_or(last, int(NamedBarrierFwd.Epilogue), nthr)
        if last != 0:
            row0 = m_block * self.tile_m
            rows_here = cutlass.min(rows - row0, self.tile_m)
            quads = hv // MERGE_COLS  # head dims are multiples of 8
            for i in cutlass.range(tidx, rows_here * quads, nthr, unroll=1):
                r = i // quads
                row = row0 + r
                c = (i - r * quads) * MERGE_COLS
                # Latency-bound: each chunk of MERGE_CHUNK splits is one L2 round trip
                # -- every LSE and partial-O load of the chunk is issued before any is
                # used (fully unrolled, predicated past S) -- then an online merge
                # across chunks.  The two-pass merge before (LSE maximum, then the
                # weighted sum, 8 splits per step) took ~8 dependent round trips per
                # item: ~9,000 cycles in the last block at b1 x 32k (Nsight Compute,
                # docs/PERF.md), more than the combine kernel it replaced.
                m = -Float32.inf
                l = Float32(0.0)
                acc = cute.make_rmem_tensor((MERGE_COLS,), Float32)
                acc.fill(0.0)
                lse_c = cute.make_rmem_tensor((MERGE_CHUNK,), Float32)
                o_c = cute.make_rmem_tensor((MERGE_CHUNK, MERGE_COLS), Float32)
                for s0 in cutlass.range(0, S, MERGE_CHUNK, unroll=1):
                    for k in cutlass.range_constexpr(MERGE_CHUNK):
                        lse_c[k] = -Float32.inf
                        for j in cutlass.range_constexpr(MERGE_COLS):
                            o_c[k, j] = Float32(0.0)
                        if s0 + k < S:
                            vb = (s0 + k) * batches + b
                            lse_c[k] = mLSE[row, head_idx, vb]
                            for j in cutlass.range_constexpr(MERGE_COLS):
                                o_c[k, j] = mOp[row, c + j, head_idx, vb]
                    m_new = m
                    for k in cutlass.range_constexpr(MERGE_CHUNK):
                        m_new = cutlass.max(m_new, lse_c[k])
                    m_use = m_new
                    if m_new == -Float32.inf:  # no split so far saw a key: weights 0
                        m_use = Float32(0.0)
                    alpha = cute.math.exp(m - m_use, fastmath=True)
                    l = l * alpha
                    for j in cutlass.range_constexpr(MERGE_COLS):
                        acc[j] = acc[j] * alpha
                    for k in cutlass.range_constexpr(MERGE_CHUNK):
                        w = cute.math.exp(lse_c[k] - m_use, fastmath=True)
                        l = l + w
                        for j in cutlass.range_constexpr(MERGE_COLS):
                            acc[j] = acc[j] + w * o_c[k, j]
                    m = m_new
                inv = Float32(0.0)
                if l > Float32(0.0):
                    inv = Float32(1.0) / l
                for j in cutlass.range_constexpr(MERGE_COLS):
                    mO[row, c + j, head_idx, b] = (acc[j] * inv).to(mO.element_type)
                if c == 0:
                    lse_out = -Float32.inf
                    if l > Float32(0.0):
                        lse_out = m + cute.math.log(l, fastmath=True)
                    mFL[row, head_idx, b] = lse_out


def fused_split_kernel(fa):
    """`fa` (an FA4 SM90 forward kernel object) with the fused split-KV overrides."""
    cls = type(fa)
    fa.__class__ = type(cls.__name__ + "FusedSplit", (FusedSplitKVMixin, cls), {})
    fa._fa4_cls, fa._pdl = cls, True  # (a dependent of its zeroing kernel)
    return fa


class _ZeroCounters:
    """Zeroes the workspace's arrival counters, then lets the split kernel launch."""

    @cute.jit
    def __call__(self, cnt: cute.Tensor, stream: cuda.CUstream):
        n = cute.size(cnt.shape)
        self.kernel(cnt).launch(grid=[(n + ZERO_THREADS - 1) // ZERO_THREADS, 1, 1],
                                block=[ZERO_THREADS, 1, 1], stream=stream,
                                preferred_smem_carveout=SMEM_CARVEOUT)

    @cute.kernel
    def kernel(self, cnt: cute.Tensor):
        cute.arch.griddepcontrol_launch_dependents()
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        i = bidx * ZERO_THREADS + tidx
        if i < cute.size(cnt.shape):
            cnt[i] = Int32(0)


def _make_launcher(sv: SplitVariant):
    v = sv.base
    fa = fused_split_kernel(_fa4_kernel(v))
    fa.out_head_dim_v = v.head_dim_v
    n_ops = len(operands(v))
    zero = _ZeroCounters()

    @cute.jit
    def launch(stream: cuda.CUstream, *args):
        # args: operand pointers, out, workspace, every operand dimension, wl, wr,
        # splits, scale (forward_split's convention with results (out, workspace)).
        wl, wr, splits, scale = args[-4], args[-3], args[-2], args[-1]
        out_ptr, w_ptr = args[n_ops], args[n_ops + 1]
        # q's (batch, seq_q, heads): the first sizes (q is the first operand)
        b, tq, n = args[n_ops + 2], args[n_ops + 3], args[n_ops + 4]
        cnt_at = fused_regions(b, n, tq, v.head_dim_v, splits)[1]
        zero(cute.make_tensor(cute.recast_ptr(w_ptr + cnt_at, dtype=Int32),
                              cute.make_layout(b * n * tq)), stream)
        run_split(fa, v, args[:n_ops], args[n_ops + 2: -4], splits, w_ptr, wl, wr, scale,
                  stream, out_ptr=out_ptr)

    return launch


def compile_split_fused(sv: SplitVariant) -> bytes:
    """Compiles `sv` (combine "fused") for sm_90a; the object holds launcher and cubins."""
    gmem = cute.AddressSpace.gmem
    return compile_split_launcher(_make_launcher(sv), sv, [
        make_ptr(_DTYPES[sv.base.dtype], 16, gmem, assumed_align=16),  # out
        make_ptr(Float32, 16, gmem, assumed_align=16)])  # workspace
