"""Split-KV SM90 forward: FA4's `FlashAttentionForwardSm90` with each thread block
restricted to one slice of the key blocks, writing float32 partial O and LSE.

FA4 4.0.0b36's SM90 kernel has no split-KV (BlockInfo gets is_split_kv=False and the
scheduler num_splits=1).  Rather than copy its kernel, SplitKVMixin, mixed into the
class of the kernel object forward.py builds for the variant, changes three things
around it:

* Virtual sequences.  The launcher presents S*B sequences (index vb = s*B + b): q's
  batch extent is S*B (only ever indexed with the real b, see _SplitSeqlenInfo), and
  seqused_k / page_table get stride-0 split modes, so FA4's own `seqused_k[vb]` and
  `page_table[vb, n]` read sequence b.  FA4's scheduler then launches one block per
  (query tile, KV head, split, sequence).
* Block ranges.  `load` and `mma` receive a BlockInfo and SeqlenInfo factory whose
  key-block range is split s's share of sequence b's range (balanced: shares differ by
  at most one block).  Masks use absolute key positions, so causal masks, windows and
  the seqlen mask stay right in every split.  A split with no blocks gets one block
  (so loads and MMAs stay paired) whose result the epilogue discards.
* Epilogue.  Writes float32 O (normalized over the split's own keys) and LSE per split
  into the workspace (kernels/split.py), LSE -inf and O 0 for an empty split.

The launcher passes the LSE region as FA4's `mLSE` (float32, (S*B, N, Tq)); O's region
follows it, so the epilogue finds it from mLSE's pointer and size.  Then (fused_combine)
the same launcher runs FA4's own `FlashAttentionForwardCombine` over strided views of
the workspace, writing the output and LSE: one custom call, two kernels, no XLA work.
"""
from __future__ import annotations

import dataclasses
import inspect

# forward first: it sets CUTE_DSL_ARCH before cutlass is imported.
from .forward import _DTYPES, _PTR_ALIGN, _fa4_kernel, _row_major, cuda, cute, cutlass
from .forward_abi import operands, size_dims
from .split import COMBINE_LOG_MAX_SPLITS, SplitVariant, combine_config, pad16

from cutlass import Float32, Int32, Int64
from cutlass.cute.runtime import make_ptr
from flash_attn.cute.block_info import BlockInfo
from flash_attn.cute.flash_fwd_combine import FlashAttentionForwardCombine
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
from flash_attn.cute.seqlen_info import SeqlenInfoQK
from quack import layout_utils


@dataclasses.dataclass(frozen=True)
class _SplitSeqlenInfo(SeqlenInfoQK):
    """FA4's per-sequence info for virtual sequence vb, plus the real sequence and the
    split.  Dense q/k/v are indexed with the real sequence."""

    batch: Int32 = None
    split: Int32 = None
    num_splits: Int32 = None

    def offset_batch_Q(self, mQ, batch_idx, dim, padded=False, ragged=False):
        return SeqlenInfoQK.offset_batch_Q(self, mQ, self.batch, dim, padded, ragged)

    def offset_batch_K(self, mK, batch_idx, dim, padded=False, ragged=False, multiple=1):
        return SeqlenInfoQK.offset_batch_K(self, mK, self.batch, dim, padded, ragged, multiple)


def _split_seqlen_cls(SeqlenInfoCls):
    """Wraps FA4's SeqlenInfo factory (a functools.partial over SeqlenInfoQK.create);
    (B, S) come from seqused_k's ((B, S),) shape set by the launcher."""
    batch, splits = SeqlenInfoCls.keywords["mSeqUsedK"].shape[0]
    names = [f.name for f in dataclasses.fields(SeqlenInfoQK)]

    def make(vb):
        info = SeqlenInfoCls(vb)
        return _SplitSeqlenInfo(**{n: getattr(info, n) for n in names},
                                batch=vb % batch, split=vb // batch, num_splits=splits)

    return make


@dataclasses.dataclass(frozen=True)
class _SplitBlockInfo(BlockInfo):
    """BlockInfo whose key-block range is the split's share (the seqlen argument is a
    _SplitSeqlenInfo)."""

    @cute.jit
    def split_range(self, seqlen, m_block):
        lo, hi = BlockInfo.get_n_block_min_max(self, seqlen, m_block)
        n = cutlass.max(hi - lo, 0)
        start = lo + n * seqlen.split // seqlen.num_splits
        end = lo + n * (seqlen.split + 1) // seqlen.num_splits
        return start, end, hi

    @cute.jit
    def get_n_block_min_max(self, seqlen, m_block, split_idx=0, num_splits=1):
        start, end, hi = self.split_range(seqlen, m_block)
        n_min, n_max = start, end
        if end <= start:  # no keys: one in-bounds block, discarded by the epilogue
            n_min = cutlass.max(hi - 1, 0)
            n_max = n_min + 1
        return n_min, n_max


def _rebind(signature, args, kwargs, **replace):
    bound = signature.bind(*args, **kwargs)
    bound.arguments.update(replace)
    return bound.args, bound.kwargs


# Arguments are bound against FA4's own `load`/`mma` signatures: a subclass (the
# head-dim-512 split-K kernel) may override them as (..., tidx, *args) and forward the
# rest positionally in FA4's order.
_LOAD_SIG = inspect.signature(FlashAttentionForwardSm90.load)
_MMA_SIG = inspect.signature(FlashAttentionForwardSm90.mma)


def _scale(stride, k):
    return tuple(_scale(s, k) for s in stride) if isinstance(stride, tuple) else stride * k


def partial_o(mLSE, hv):
    """The o_partial region of the workspace as a tensor ((rows), hv, heads, S*B), given
    the LSE partials as the kernel sees them (mLSE: ((G, Tq), KV heads, S*B) with
    pack_gqa, else (Tq, N, S*B)): it follows them padded to 16 bytes (split.pad16),
    with their layout times hv plus a hv mode."""
    return cute.make_tensor(mLSE.iterator + pad16(cute.size(mLSE.shape)), cute.make_layout(
        (mLSE.shape[0], hv, mLSE.shape[1], mLSE.shape[2]),
        stride=(_scale(mLSE.stride[0], hv), 1, mLSE.stride[1] * hv, mLSE.stride[2] * hv)))


# Shared-memory carveout (percent of the unified L1/shared array) for every kernel of
# a split call: an SM switches carveout only when idle, so a combine kernel with the
# driver's default carveout for its 20 KB, between split kernels that need ~150 KB,
# makes SMs reconfigure before the next call's split blocks can start.
SMEM_CARVEOUT = 100


class SplitKVMixin:
    """Turns an FA4 SM90 forward kernel (FlashAttentionForwardSm90 or a subclass, e.g.
    a larger-head-dim one) into its split-KV form; see the module docstring.

    With `_pdl` (SplitVariant.pdl) the kernel is launched as a programmatic dependent
    of whatever precedes it in the stream: its launch and prologue (barrier setup,
    descriptor prefetch) overlap that kernel's tail, and `load` and `mma` wait for that
    grid (griddepcontrol.wait) before their first global access.  `_fa4_cls`: the FA4
    class underneath; both set by split_kernel."""

    # Whether `load`/`mma` wait for the preceding grid: with `_pdl`, except where the
    # launcher guarantees that grid is done before the kernel launches
    # (kernels/forward_split_fused.py: its zeroing kernel is an ordinary launch)
    _wait_for_prior_grid = True

    def kernel(self, *args, **kwargs):
        launcher = self._fa4_cls.kernel(self, *args, **kwargs)
        if self._pdl:
            launch = launcher.launch
            launcher.launch = lambda *a, **kw: launch(
                *a, use_pdl=True, preferred_smem_carveout=SMEM_CARVEOUT, **kw)
        return launcher

    def _split_block_info(self, block_info):
        fields = {f.name: getattr(block_info, f.name) for f in dataclasses.fields(BlockInfo)}
        return _SplitBlockInfo(**fields)

    def load(self, *args, **kwargs):
        a = _LOAD_SIG.bind(self, *args, **kwargs).arguments
        args, kwargs = _rebind(_LOAD_SIG, (self,) + args, kwargs,
                               block_info=self._split_block_info(a["block_info"]),
                               SeqlenInfoCls=_split_seqlen_cls(a["SeqlenInfoCls"]))
        if self._pdl and self._wait_for_prior_grid:  # nothing global is read before this
            cute.arch.griddepcontrol_wait()
        return super().load(*args[1:], **kwargs)

    def mma(self, *args, **kwargs):
        a = _MMA_SIG.bind(self, *args, **kwargs).arguments
        # The epilogue (called from mma) needs the split's block range.
        self._split_bi = self._split_block_info(a["block_info"])
        args, kwargs = _rebind(_MMA_SIG, (self,) + args, kwargs, block_info=self._split_bi,
                               SeqlenInfoCls=_split_seqlen_cls(a["SeqlenInfoCls"]))
        if self._pdl and self._wait_for_prior_grid:  # nor written (the epilogue is in mma)
            cute.arch.griddepcontrol_wait()
        return super().mma(*args[1:], **kwargs)

    @cute.jit
    def epilogue(self, acc_O, lse, mO, mLSE, sO, seqlen, gmem_tiled_copy_O, tma_atom_O,
                 tiled_mma, tidx, m_block, head_idx, batch_idx):
        # Let the combine kernel (a programmatic dependent launch) be scheduled: it waits
        # for this grid's completion before it reads anything.
        cute.arch.griddepcontrol_launch_dependents()
        start, end, _ = self._split_bi.split_range(seqlen, m_block)
        has_work = start < end
        hv = self.out_head_dim_v  # the workspace's (tile_hdimv may be padded)
        tile_hdimv = self.tile_hdimv
        if cutlass.const_expr(hasattr(self, "whole_o_epilogue_mma")):
            # The head-dim-512 split-K kernel: this thread's acc_O holds its warpgroup's
            # half of the O columns; place it with the two-warpgroup PV MMA.
            tiled_mma, tidx, tile_hdimv = self.whole_o_epilogue_mma()
        mO_cur = partial_o(mLSE, hv)[None, None, head_idx, batch_idx]
        mLSE_cur = mLSE[None, head_idx, batch_idx]
        group = self.qhead_per_kvhead if cutlass.const_expr(self.pack_gqa) else 1
        rows_left = seqlen.seqlen_q * group - m_block * self.tile_m
        thr_mma = tiled_mma.get_slice(tidx)
        cO = cute.make_identity_tensor((self.tile_m, tile_hdimv))
        tOcO = thr_mma.partition_C(cO)
        row0 = m_block * self.tile_m
        for i in cutlass.range_constexpr(cute.size(acc_O)):
            r, c = tOcO[i]
            if r < rows_left:
                if cutlass.const_expr(self.check_hdim_v_oob):
                    if c < hv:
                        mO_cur[row0 + r, c] = acc_O[i] if has_work else Float32(0.0)
                else:
                    mO_cur[row0 + r, c] = acc_O[i] if has_work else Float32(0.0)
        tScS = layout_utils.reshape_acc_to_mn(tOcO)
        if tScS[0][1] == 0:
            for m in cutlass.range_constexpr(cute.size(lse)):
                r = tScS[m, 0][0]
                if r < rows_left:
                    mLSE_cur[row0 + r] = lse[m] if has_work else -Float32.inf


def split_kernel(fa, pdl: bool = False):
    """`fa` (an FA4 SM90 forward kernel object) with the split-KV overrides: its class
    becomes a subclass of SplitKVMixin and the original class (pdl: SplitVariant.pdl)."""
    cls = type(fa)
    fa.__class__ = type(cls.__name__ + "Split", (SplitKVMixin, cls), {})
    fa._fa4_cls, fa._pdl = cls, pdl
    return fa


class _CombineAfterSplit(FlashAttentionForwardCombine):
    """FA4's combine, launched as a programmatic dependent of the split kernel (PDL):
    its thread blocks are scheduled once every split block has reached its epilogue
    (SplitKVMixin.epilogue triggers), run their prologue, and wait in FA4's own
    `griddepcontrol_wait` until the split kernel has finished and its writes are
    visible, so the second launch overlaps the split kernel's tail (measured on H100:
    ~0.5 us of a ~30 us decode call at batch 1)."""

    # With SplitVariant.pdl, the split kernel's shared-memory carveout (SMEM_CARVEOUT)
    carveout = None

    def kernel(self, *args, **kwargs):
        launcher = FlashAttentionForwardCombine.kernel(self, *args, **kwargs)
        launch = launcher.launch
        launcher.launch = lambda *a, **kw: launch(
            *a, use_pdl=True, preferred_smem_carveout=self.carveout, **kw)
        return launcher


def _combine_kernel(sv: SplitVariant) -> FlashAttentionForwardCombine:
    """FA4's combine with the variant's block shape (kernels/split.combine_config)."""
    hv = sv.base.head_dim_v
    c = combine_config(sv.combine, hv)
    combine = _CombineAfterSplit(
        _DTYPES[sv.base.dtype], Float32, hv, num_head=1,  # num_head: varlen scheduler only
        tile_m=c.tile_m, k_block_size=c.k_block, num_threads=c.threads,
        log_max_splits=COMBINE_LOG_MAX_SPLITS, stages=c.stages)
    if sv.pdl:
        combine.carveout = SMEM_CARVEOUT
    return combine


def _i64(x):
    return Int64(x) if not isinstance(x, int) else x


def _combine(combine, w_ptr, out_ptr, lse_ptr, b, tq, n, hv, splits, stream):
    """Runs `combine` over the workspace (lse_partial (S, B, N, Tq) padded, then
    o_partial (S, B, N, Tq, Hv)) into out (B, Tq, N, Hv) and lse (B, N, Tq), presenting
    them in FA4's (split, batch, seqlen, head[, dim]) order as strided views."""
    S, B, N, T, H = (_i64(x) for x in (splits, b, n, tq, hv))
    lse_part = cute.make_tensor(w_ptr, cute.make_layout(
        (splits, b, tq, n), stride=(B * N * T, N * T, 1, T)))
    o_part = cute.make_tensor(w_ptr + pad16(S * B * N * T), cute.make_layout(
        (splits, b, tq, n, hv), stride=(B * N * T * H, N * T * H, H, T * H, 1)))
    out = _row_major(out_ptr, [b, tq, n, hv], aligned=True)
    lse = cute.make_tensor(lse_ptr, cute.make_layout((b, tq, n), stride=(N * T, 1, T)))
    combine(o_part, lse_part, out, lse, None, None, None, None, None, stream=stream)


def run_split(fa, v, ptrs, sizes, splits, w_ptr, wl, wr, scale, stream, out_ptr=None):
    """Plain Python inside a launcher (the argument convention of _make_launcher): runs
    `fa`, FA4's kernel with the split overrides, over the S*B virtual sequences (module
    docstring) with the LSE partials at w_ptr.  out_ptr: the O tensor FA4 is given
    (default q's pointer: the split epilogue writes the workspace, never O).  Returns
    q's (batch, seq_q, heads)."""
    t, at = {}, 0
    for i, (name, rank) in enumerate(operands(v)):
        dims = list(sizes[at : at + rank])
        at += rank
        if name in ("q", "k", "v"):
            dims[-1] = v.head_dim_v if name == "v" else v.head_dim
        t[name] = (dims, ptrs[i])
    (b, tq, n, _), q_ptr = t["q"]
    vb = b * splits
    q = _row_major(q_ptr, [vb, tq, n, v.head_dim], aligned=True)
    o = _row_major(q_ptr if out_ptr is None else out_ptr, [vb, tq, n, v.head_dim_v],
                   aligned=True)
    k = _row_major(t["k"][1], t["k"][0], aligned=True)
    vv = _row_major(t["v"][1], t["v"][0], aligned=True)
    used = cute.make_tensor(t["seqused_k"][1], cute.make_layout(((b, splits),),
                                                                stride=((1, 0),)))
    table = None
    if cutlass.const_expr(v.kv_layout == "paged"):
        (tb, pages), pt_ptr = t["page_table"]
        table = cute.make_tensor(pt_ptr, cute.make_layout(((tb, splits), pages),
                                                          stride=((pages, 0), 1)))
    lse = _row_major(w_ptr, [vb, n, tq], aligned=False)
    fa._o_raw = o  # (read by kernels/forward_split_fused.py)
    local = v.mask == "local"
    fa(
        q, k, vv, o, lse, scale,
        None, None, None, used, table,
        wl if cutlass.const_expr(local and v.window_left) else None,
        wr if cutlass.const_expr(local and v.window_right) else None,
        None,
        stream=stream,
    )
    return b, tq, n


def _make_launcher(sv: SplitVariant):
    v = sv.base
    fa = split_kernel(_fa4_kernel(v), sv.pdl)
    fa.out_head_dim_v = v.head_dim_v
    n_ops = len(operands(v))
    combine = _combine_kernel(sv) if sv.fused_combine else None
    n_res = 3 if sv.fused_combine else 1  # (out, lse,) workspace

    @cute.jit
    def launch(stream: cuda.CUstream, *args):
        # args: operand pointers, [out, lse,] workspace, every operand dimension, wl, wr,
        # splits, scale.
        wl, wr, splits, scale = args[-4], args[-3], args[-2], args[-1]
        res = args[n_ops: n_ops + n_res]
        b, tq, n = run_split(fa, v, args[:n_ops], args[n_ops + n_res: -4], splits, res[-1],
                             wl, wr, scale, stream)
        if cutlass.const_expr(combine is not None):
            _combine(combine, res[-1], res[0], res[1], b, tq, n, v.head_dim_v, splits, stream)

    return launch


def compile_split_launcher(launch, sv: SplitVariant, results: list) -> bytes:
    """Compiles a split launcher of `sv` taking _make_launcher's argument convention with
    result pointers `results` (make_ptr values) for sm_90a; the object holds launcher
    and cubins."""
    v = sv.base
    dt = _DTYPES[v.dtype]
    gmem = cute.AddressSpace.gmem
    ptrs = []
    for name, _ in operands(v):
        align = _PTR_ALIGN.get(name, 4)
        ptrs.append(make_ptr(dt if name in ("q", "k", "v") else Int32, align, gmem,
                             assumed_align=align))
    sizes = [Int32(1) for _ in size_dims(v)]
    compiled = cute.compile(launch, cuda.CUstream(0), *ptrs, *results, *sizes, Int32(0),
                            Int32(0), Int32(1), Float32(1.0))
    return compiled.dump_to_object(sv.symbol)


def compile_split(sv: SplitVariant) -> bytes:
    """Compiles `sv` for sm_90a; the object holds launcher and cubins."""
    gmem = cute.AddressSpace.gmem
    results = []
    if sv.fused_combine:  # out, lse
        results += [make_ptr(_DTYPES[sv.base.dtype], 16, gmem, assumed_align=16),
                    make_ptr(Float32, 4, gmem, assumed_align=4)]
    results.append(make_ptr(Float32, 16, gmem, assumed_align=16))  # workspace (XLA aligns)
    return compile_split_launcher(_make_launcher(sv), sv, results)
