"""Split-KV decode with the launch latency hidden behind the kernel before it
(SplitVariant.prefetch > 0, which implies pdl): two changes around forward_split.py's
kernels, in their own module so the other split objects keep their keys.

* The combine kernel lets its programmatic dependents launch as soon as it starts
  waiting for the split kernel (FA4's combine never triggers, so a PDL-launched kernel
  after it could only launch once its blocks exit).  The next decode call's split
  kernel -- launched as a programmatic dependent -- then runs its prologue while this
  combine runs.
* Before its `griddepcontrol.wait`, the split kernel's producer warp asks L2 for the
  first `prefetch` K and V tiles of its slice (TMA prefetch, no shared memory, no
  barrier), so the first loads after the wait hit L2 instead of starting the DRAM
  round trip then.  The lengths and page-table entries it reads for that come from L2
  (ld.global.cg): the kernel before may still be writing them, so they are a hint
  only.  The block count is clamped to the page table's width, so a stale length never
  reads past it; a stale or out-of-range page prefetches a useless (TMA-clipped) tile;
  every load the kernel computes with happens after the wait, as in forward_split.py.
  The slice is the split's share of ceil(seqused_k / tile_n) key blocks (exact for
  decode; a hint for windows and longer query tiles).

Measured (H100, 2026-12-07, docs/PERF.md): its output is bit-identical to issue18's
(tests/gpu_compare_plans.py, 42 cases), but each call is 0.3-1.6 µs slower: the reads
and prefetches before the wait sit on the critical path.  Not the default.
"""
from __future__ import annotations

import contextlib

from .forward import _DTYPES, _fa4_kernel, cuda, cute, cutlass
from .forward_abi import operands
from .forward_split import (_LOAD_SIG, SplitKVMixin, _combine, _combine_kernel,
                            _CombineAfterSplit, compile_split_launcher, run_split,
                            split_kernel)
from .split import SplitVariant

from cutlass import Float32, Int32
from cutlass.cute.nvgpu import cpasync
from cutlass.cute.runtime import make_ptr
from flash_attn.cute import utils


class PrefetchSplitMixin(SplitKVMixin):
    """SplitKVMixin whose producer warp prefetches its first K/V tiles to L2 before it
    waits for the preceding grid.  `_prefetch_tiles`: set by prefetch_split_kernel."""

    _prefetch_tiles = 0

    def load(self, *args, **kwargs):
        a = _LOAD_SIG.bind(self, *args, **kwargs).arguments
        if cutlass.const_expr(self.use_tma_KV and self._prefetch_tiles > 0):
            used = a["SeqlenInfoCls"].keywords["mSeqUsedK"]
            self._prefetch_kv(a["mK"], a["mV"], a["sK"], a["sV"], a["tma_atom_K"],
                              a["tma_atom_V"], a["mPageTable"], used, a["TileSchedulerCls"])
        return SplitKVMixin.load(self, *args, **kwargs)

    @cute.jit
    def _prefetch_kv(self, mK, mV, sK, sV, tma_atom_K, tma_atom_V, mPageTable, mSeqUsedK,
                     TileSchedulerCls):
        warp_idx_in_wg = cute.arch.make_warp_uniform(cute.arch.warp_idx()) % 4
        lane = cute.arch.lane_idx()
        if warp_idx_in_wg == 0:
            work_tile = TileSchedulerCls().initial_work_tile_info()
            m_block, head_idx, vb, _ = work_tile.tile_idx
            batch, splits = mSeqUsedK.shape[0]
            b = vb % batch
            s = vb // batch
            head_kv = head_idx
            if cutlass.const_expr(not self.pack_gqa):
                head_kv = head_idx // self.qhead_per_kvhead
            seqlen_k = cute.arch.load(utils.elem_pointer(mSeqUsedK, ((b, 0),)), Int32, cop="cg")
            n = cutlass.max((seqlen_k + self.tile_n - 1) // self.tile_n, 0)
            if cutlass.const_expr(mPageTable is not None):
                # seqused_k may not be written yet (XLA reuses memory): never read past
                # the page table (a dense K/V tile past the end is TMA-clipped)
                n = cutlass.min(n, mPageTable.shape[1])
            lo = n * s // splits
            n_block = n * (s + 1) // splits - 1 - lane  # FA4 walks its blocks downward
            if lane < self._prefetch_tiles and n_block >= lo:
                if cutlass.const_expr(mPageTable is not None):
                    page = cute.arch.load(utils.elem_pointer(mPageTable, (vb, n_block)), Int32,
                                          cop="cg")
                    gK = cute.local_tile(mK[None, None, head_kv, None],
                                         (self.tile_n, self.tile_hdim), (0, 0, None))
                    gV = cute.local_tile(mV[None, None, head_kv, None],
                                         (self.tile_n, self.tile_hdimv), (0, 0, None))
                    self._prefetch_tile(tma_atom_K, sK, gK, page)
                    self._prefetch_tile(tma_atom_V, sV, gV, page)
                else:
                    gK = cute.local_tile(mK[None, None, head_kv, b],
                                         (self.tile_n, self.tile_hdim), (None, 0))
                    gV = cute.local_tile(mV[None, None, head_kv, b],
                                         (self.tile_n, self.tile_hdimv), (None, 0))
                    self._prefetch_tile(tma_atom_K, sK, gK, n_block)
                    self._prefetch_tile(tma_atom_V, sV, gV, n_block)

    @cute.jit
    def _prefetch_tile(self, atom, s_tile, g_tiles, index):
        _, tg = cpasync.tma_partition(atom, 0, cute.make_layout(1),
                                      cute.group_modes(s_tile, 0, 2),
                                      cute.group_modes(g_tiles, 0, 2))
        cute.prefetch(atom, tg[None, index])


def prefetch_split_kernel(fa, tiles: int):
    """forward_split.split_kernel(fa, pdl=True), prefetching `tiles` K/V tiles before
    its wait."""
    fa = split_kernel(fa, pdl=True)
    fa.__class__ = type(type(fa).__name__ + "Prefetch", (PrefetchSplitMixin, type(fa)), {})
    fa._prefetch_tiles = tiles
    return fa


class _CombineTriggersEarly(_CombineAfterSplit):
    """FA4's combine (PDL dependent of the split kernel) that also lets its own
    dependents launch when it starts waiting: FA4's kernel body calls
    cute.arch.griddepcontrol_wait once before it reads anything, and while it is traced
    that call emits griddepcontrol.launch_dependents first."""

    def kernel(self, *args, **kwargs):
        launcher = _CombineAfterSplit.kernel(self, *args, **kwargs)
        launch = launcher.launch

        def launch_traced(*a, **kw):  # the body is traced when it is launched
            with _trigger_before_wait():
                return launch(*a, **kw)
        launcher.launch = launch_traced
        return launcher


@contextlib.contextmanager
def _trigger_before_wait():
    wait = cute.arch.griddepcontrol_wait

    def trigger_then_wait(*a, **kw):
        cute.arch.griddepcontrol_launch_dependents()
        return wait(*a, **kw)

    cute.arch.griddepcontrol_wait = trigger_then_wait
    try:
        yield
    finally:
        cute.arch.griddepcontrol_wait = wait


def _make_launcher(sv: SplitVariant):
    v = sv.base
    fa = prefetch_split_kernel(_fa4_kernel(v), sv.prefetch)
    fa.out_head_dim_v = v.head_dim_v
    n_ops = len(operands(v))
    combine = _combine_kernel(sv)  # forward_split's, with its early trigger
    combine.__class__ = _CombineTriggersEarly

    @cute.jit
    def launch(stream: cuda.CUstream, *args):
        # forward_split._make_launcher's convention with results (out, lse, workspace)
        wl, wr, splits, scale = args[-4], args[-3], args[-2], args[-1]
        res = args[n_ops: n_ops + 3]
        b, tq, n = run_split(fa, v, args[:n_ops], args[n_ops + 3: -4], splits, res[2],
                             wl, wr, scale, stream)
        _combine(combine, res[2], res[0], res[1], b, tq, n, v.head_dim_v, splits, stream)

    return launch


def compile_split_prefetch(sv: SplitVariant) -> bytes:
    """Compiles `sv` (prefetch > 0, a combine kernel) for sm_90a."""
    gmem = cute.AddressSpace.gmem
    return compile_split_launcher(_make_launcher(sv), sv, [
        make_ptr(_DTYPES[sv.base.dtype], 16, gmem, assumed_align=16),  # out
        make_ptr(Float32, 4, gmem, assumed_align=4),  # lse
        make_ptr(Float32, 16, gmem, assumed_align=16)])  # workspace
