"""FA4's SM90 forward as a persistent kernel (TileConfig.persistent): one CTA per SM
walks the (m_block, head, batch) tiles instead of one CTA per tile.  In its own module,
so every other forward object keeps its key.

Why: with short sequences a tile is a few K/V blocks (b64 s512 causal: 1-4 of 128
keys), so what a CTA pays once -- launch, barrier init, the Q load, the first K/V
round trip, the epilogue's O store -- is a large share of its time.  A persistent CTA
loads the next tile's Q and first K/V blocks while it runs this tile's last PV and
epilogue (the producer warp runs ahead through the Q and K/V pipelines, which span
tiles).

FA4's SM90 loops are already written per tile (`while work_tile.is_valid_tile`, the
pipeline states carry over), but FA4 launches them only with single-tile schedulers.
This mixin changes:

1. The scheduler, patched into FA4's module while its `__call__` traces: a grid of
   min(132, tiles) CTAs striding over FA4's own tile order.  Causal and windowed masks
   keep FA4's LPT order (`_PersistentLPTScheduler`, a subclass of FA4's scheduler: its
   L2 sections of heads whose K/V fit in L2, longest rows first); without a mask
   m_block is fastest, as FA4's grid (`_PersistentScheduler`).
2. O's staging buffer.  FA4 stages O in Q's shared memory, which is safe only with one
   tile per CTA (the producer would load the next Q over O).  Here O gets its own
   buffer after Q (`_get_shared_storage_cls`), so Q is released where FA4 releases it
   and the next tile's Q load overlaps this tile's PV and epilogue.  The epilogue's
   opening barrier (all MMA threads, FA4's) follows the previous TMA store's
   shared-memory reads (the storing warp waits for them before it leaves the
   epilogue), so the next tile's O cannot overwrite a buffer still being stored.

Only tiles whose shared memory holds the extra O buffer take it
(config.persistent_tile: head dims up to 128 with FA4's tiles).

The first version (commit 2272fd2) kept O in Q's buffer and released Q after the
epilogue, so each tile's Q load waited for the previous epilogue, and it walked the
causal tiles m_block-major over every head (no L2 sections): measured 15-36 % slower
with a causal mask, -3 to +4 % without (H100, docs/PERF.md).
"""
# (no `from __future__ import annotations`: cute.struct reads its field annotations
# as objects)
import contextlib
from dataclasses import dataclass
from unittest import mock

import cutlass
import cutlass.cute as cute
from cutlass import Int32, const_expr
from cutlass.cute import FastDivmodDivisorV2
from flash_attn.cute import flash_fwd_sm90
from flash_attn.cute.tile_scheduler import (SchedulingMode, SingleTileLPTScheduler,
                                            WorkTileInfo)
from quack.cute_dsl_utils import ParamsBase

from . import forward
from .config import ForwardVariant

# SMs of the H100 SXM and the H200 (the grid is fixed when the kernel is traced, on a
# host that may have no GPU; a part with fewer SMs queues the extra CTAs, which
# stays correct).
NUM_SMS = 132


class _PersistentScheduler:
    """FA4's single-tile grid order (m_block fastest, then head, then batch: neighbouring
    CTAs share K/V in L2) over a grid of min(NUM_SMS, tiles) CTAs that stride through
    it (module doc, 1).  FA4 schedules windowed masks this way too."""

    @dataclass
    class Params(ParamsBase):
        num_block: Int32
        total: Int32
        block_divmod: FastDivmodDivisorV2
        head_divmod: FastDivmodDivisorV2

        @staticmethod
        def create(args, *, loc=None, ip=None):
            head_batch = args.num_head * args.num_batch
            return _PersistentScheduler.Params(
                args.num_block, args.num_block * head_batch,
                FastDivmodDivisorV2(args.num_block), FastDivmodDivisorV2(args.num_head))

    def __init__(self, params: Params, tile_idx: Int32, *, loc=None, ip=None):
        self.params = params
        self._tile_idx = tile_idx
        self._loc = loc

    @staticmethod
    def to_underlying_arguments(args, *, scheduling_mode=SchedulingMode.STATIC, loc=None,
                                ip=None):
        assert scheduling_mode == SchedulingMode.STATIC
        assert args.cluster_shape_mn == (1, 1) and not args.is_split_kv
        return _PersistentScheduler.Params.create(args, loc=loc, ip=ip)

    @staticmethod
    def create(params: Params, ctx=None, *, loc=None, ip=None):
        return _PersistentScheduler(params, cute.arch.block_idx()[0], loc=loc, ip=ip)

    @staticmethod
    def get_grid_shape(params: Params, *, loc=None, ip=None):
        return (cutlass.min(NUM_SMS, params.total), Int32(1), Int32(1))

    def get_current_work(self, *, loc=None, ip=None) -> WorkTileInfo:
        head_batch, block_idx = divmod(self._tile_idx, self.params.block_divmod)
        batch_idx, head_idx = divmod(head_batch, self.params.head_divmod)
        return WorkTileInfo((Int32(block_idx), Int32(head_idx), Int32(batch_idx), Int32(0)),
                            self._tile_idx < self.params.total)

    def initial_work_tile_info(self, *, loc=None, ip=None):
        return self.get_current_work(loc=loc, ip=ip)

    def prefetch_next_work(self, *, loc=None, ip=None):
        pass

    def advance_to_next_work(self, *, loc=None, ip=None):
        self._tile_idx += cute.arch.grid_dim()[0]
        return self.get_current_work()

    def producer_tail(self, *, loc=None, ip=None):
        pass

    def __extract_mlir_values__(self):
        values, self._values_pos = [], []
        for obj in (self.params, self._tile_idx):
            obj_values = cutlass.extract_mlir_values(obj)
            values += obj_values
            self._values_pos.append(len(obj_values))
        return values

    def __new_from_mlir_values__(self, values):
        objs = []
        for obj, n in zip((self.params, self._tile_idx), self._values_pos):
            objs.append(cutlass.new_from_mlir_values(obj, values[:n]))
            values = values[n:]
        return _PersistentScheduler(*objs, loc=self._loc)


class _PersistentLPTScheduler(SingleTileLPTScheduler):
    """FA4's LPT tile order (L2 sections of heads, longest rows first) over a grid of
    min(NUM_SMS, tiles) CTAs that stride through it (module doc, 1)."""

    @staticmethod
    def create(params, ctx=None, *, loc=None, ip=None):
        return _PersistentLPTScheduler(params, cute.arch.block_idx()[0], Int32(0),
                                       loc=loc, ip=ip)

    @staticmethod
    def get_grid_shape(params, *, loc=None, ip=None):
        return (cutlass.min(NUM_SMS, params.total_blocks), Int32(1), Int32(1))

    def advance_to_next_work(self, *, loc=None, ip=None):
        self._tile_idx += cute.arch.grid_dim()[0]
        return self.get_current_work()


class PersistentForwardMixin:
    """FA4's SM90 forward with the persistent schedulers and O staged in its own
    shared memory (module doc).  Mixed in by persistent_kernel."""

    def __call__(self, *args, **kwargs):
        # FA4's __call__ picks its scheduler by these module names (the varlen one,
        # for cu_seqlens_q / seqused_q, is left alone: such variants are never
        # persistent, config.persistent_tile)
        with mock.patch.object(flash_fwd_sm90, "SingleTileScheduler", _PersistentScheduler), \
                mock.patch.object(flash_fwd_sm90, "SingleTileLPTScheduler",
                                  _PersistentLPTScheduler):
            return super().__call__(*args, **kwargs)

    def _o_offset(self) -> int:
        """Elements from Q's buffer to O's: Q's (tile_m x padded head dim, one stage)
        rounded up to the buffer alignment (O follows Q in SharedStorageOwnO).  Plain
        Python arithmetic: it is used inside the kernel, where the host-side layout
        objects may not be referenced."""
        elems_per_align = self.buffer_align_bytes * 8 // self.dtype.width
        return -(-self.tile_m * self.tile_hdim // elems_per_align) * elems_per_align

    def _get_shared_storage_cls(self):
        """FA4's buffers (Q, K/V stages, P, the pipeline barriers) and one more for O,
        right after Q (module doc, 2)."""
        assert not self.Q_in_regs, "V would share Q's shared memory"

        def buf(n):
            return cute.struct.Align[cute.struct.MemRange[self.dtype, n],
                                     self.buffer_align_bytes]

        n_q = cute.cosize(self.sQ_layout)
        assert n_q == self.tile_m * self.tile_hdim, "Q is one tile_m x head dim stage"
        n_p = cute.cosize(self.sP_layout) if const_expr(self.sP_layout is not None) else 0

        @cute.struct
        class SharedStorageOwnO:
            mbar_ptr_Q: cute.struct.MemRange[cutlass.Int64, 2]
            mbar_ptr_K: cute.struct.MemRange[cutlass.Int64, self.num_stages * 2]
            mbar_ptr_V: cute.struct.MemRange[cutlass.Int64, self.num_stages * 2]
            sV: buf(cute.cosize(self.sV_layout))
            sQ: buf(n_q)
            sO: buf(cute.cosize(self.sO_layout))
            sK: buf(cute.cosize(self.sK_layout))
            sP: buf(n_p)

        return SharedStorageOwnO

    def mma(self, tiled_mma_qk, tiled_mma_pv, mO, mLSE, sQ, sK, sVt, sP, sO, *args, **kwargs):
        # FA4 builds sO on Q's buffer; the same layout on the buffer that follows Q (an
        # offset of whole 1024-byte swizzle periods keeps the swizzle)
        sO = cute.make_tensor(sO.iterator + self._o_offset(), sO.layout)
        return super().mma(tiled_mma_qk, tiled_mma_pv, mO, mLSE, sQ, sK, sVt, sP, sO,
                           *args, **kwargs)


def persistent_kernel(fa):
    """`fa` (an FA4 SM90 forward kernel object) as a persistent kernel: its class
    becomes a subclass of PersistentForwardMixin and the original class."""
    cls = type(fa)
    fa.__class__ = type(cls.__name__ + "Persistent", (PersistentForwardMixin, cls), {})
    return fa


@contextlib.contextmanager
def _persistent_objects():
    """forward.py's launcher, building persistent kernel objects."""
    make = forward._fa4_kernel
    with mock.patch.object(forward, "_fa4_kernel", lambda v: persistent_kernel(make(v))):
        yield


def compile_forward_persistent(v: ForwardVariant) -> bytes:
    """forward.compile_forward for a persistent variant (the launcher and its argument
    convention are forward.py's)."""
    assert v.tile.persistent and v.tile.design == "fa4"
    with _persistent_objects():
        launch = forward._make_launcher(v)
    return forward.compile_launcher(launch, v, v.symbol)
