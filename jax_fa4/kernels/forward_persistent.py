"""FA4's SM90 forward as a persistent kernel (TileConfig.persistent): one CTA per SM
walks the (m_block, head, batch) tiles instead of one CTA per tile.  In its own module,
so every other forward object keeps its key.

Why: with short sequences a tile is a few K/V blocks (b64 s512 causal: 1-4 of 128
keys), so what a CTA pays once -- launch, barrier init, the Q load, the first K/V
round trip, the epilogue's O store -- is a large share of its time.  A persistent CTA
loads the next tile's first K/V blocks while it runs this tile's last PV and epilogue
(the producer warp runs ahead through the K/V pipeline, which spans tiles).

FA4's SM90 loops are already written per tile (`while work_tile.is_valid_tile`, the
pipeline states carry over), but FA4 launches them only with single-tile schedulers
(`is_persistent=False`), and one thing is not safe with more than one tile per CTA:
the epilogue stages O in Q's shared memory (sO = sQ) after the consumers have released
Q, so the producer could load the next Q over O that is still being stored.  This
mixin changes exactly two things:

1. The scheduler (`_PersistentScheduler`, patched into FA4's module while its
   `__call__` traces): a grid of min(132, tiles) CTAs striding over the tile index.
   Causal and windowed masks (FA4's LPT case) walk m_blocks slowest and last first,
   so the longest rows start first and every CTA gets a mix of row lengths; without
   a mask the m_block is fastest (neighbouring CTAs share K/V in L2).
2. Q's release: the consumers' `consumer_release` of the Q pipeline is deferred from
   the main loop to after the epilogue (`_QReleaseAfterEpilogue`), whose TMA store
   waits for its shared-memory reads (`cp.async.bulk.wait_group.read 0`) before the
   issuing warp arrives; the producer's next Q load then cannot overwrite O.

Measured (H100, 2026-12-07, docs/PERF.md): causal 15-36 % slower than FA4's own
launch (this static order loses the L2 locality of FA4's LPT scheduler), no mask -3 to
+4 %.  So it stays off (JAX_FA4_FORWARD_PERSISTENT=on turns it on); not run through
the GPU suite.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from unittest import mock

import cutlass
import cutlass.cute as cute
from cutlass import Int32, const_expr
from cutlass.cute import FastDivmodDivisorV2
from flash_attn.cute import flash_fwd_sm90
from flash_attn.cute.tile_scheduler import SchedulingMode, WorkTileInfo
from quack.cute_dsl_utils import ParamsBase

from . import forward
from .config import ForwardVariant

# SMs of the H100 SXM and the H200 (the grid is fixed when the kernel is traced, on a
# host that may have no GPU; a part with fewer SMs queues the extra CTAs, which
# stays correct).
NUM_SMS = 132


class _PersistentScheduler:
    """Static persistent tile order (see module doc, 1)."""

    @dataclass
    class Params(ParamsBase):
        num_block: Int32
        total: Int32
        block_divmod: FastDivmodDivisorV2
        head_divmod: FastDivmodDivisorV2
        head_batch_divmod: FastDivmodDivisorV2
        lpt: cutlass.Constexpr[bool] = False

        @staticmethod
        def create(args, *, loc=None, ip=None):
            head_batch = args.num_head * args.num_batch
            return _PersistentScheduler.Params(
                args.num_block, args.num_block * head_batch,
                FastDivmodDivisorV2(args.num_block), FastDivmodDivisorV2(args.num_head),
                FastDivmodDivisorV2(head_batch), args.lpt)

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
        if const_expr(self.params.lpt):
            m_from_last, head_batch = divmod(self._tile_idx, self.params.head_batch_divmod)
            block_idx = self.params.num_block - 1 - m_from_last
        else:
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


class _QReleaseAfterEpilogue:
    """The Q pipeline as FA4's main loop sees it: its consumer release is a no-op
    (PersistentForwardMixin.epilogue releases after O has left shared memory)."""

    def __init__(self, pipeline_q):
        self._pipeline_q = pipeline_q

    def __getattr__(self, name):
        return getattr(self._pipeline_q, name)

    def consumer_release_w_index(self, *args, **kwargs):
        pass

    # FA4's tile loop carries the pipeline through the DSL's `while`
    def __extract_mlir_values__(self):
        return cutlass.extract_mlir_values(self._pipeline_q)

    def __new_from_mlir_values__(self, values):
        return _QReleaseAfterEpilogue(cutlass.new_from_mlir_values(self._pipeline_q, values))


class PersistentForwardMixin:
    """FA4's SM90 forward with the persistent scheduler and Q released after the
    epilogue (module doc).  Mixed in by persistent_kernel."""

    def __call__(self, *args, **kwargs):
        # FA4's __call__ picks its scheduler by these module names (the varlen one,
        # for cu_seqlens_q / seqused_q, is left alone: such variants are never
        # persistent, ForwardVariant checks)
        with mock.patch.object(flash_fwd_sm90, "SingleTileScheduler", _PersistentScheduler), \
                mock.patch.object(flash_fwd_sm90, "SingleTileLPTScheduler", _PersistentScheduler):
            return super().__call__(*args, **kwargs)

    def mma(self, tiled_mma_qk, tiled_mma_pv, mO, mLSE, sQ, sK, sVt, sP, sO, learnable_sink,
            pipeline_k, pipeline_v, pipeline_q, *args, **kwargs):
        assert not self.Q_in_regs, "V would share Q's shared memory"
        self._pipeline_q = pipeline_q
        return super().mma(tiled_mma_qk, tiled_mma_pv, mO, mLSE, sQ, sK, sVt, sP, sO,
                           learnable_sink, pipeline_k, pipeline_v,
                           _QReleaseAfterEpilogue(pipeline_q), *args, **kwargs)

    def epilogue(self, *args, **kwargs):
        # FA4's epilogue returns once this thread is done with sO: the TMA-store warp
        # after `cp_async_bulk_wait_group(0, read=True)`, the others after their own
        # shared-memory reads (non-TMA store) or writes (TMA store: the issuing warp's
        # arrival comes last).  Q's empty barrier completes when every consumer warp
        # has arrived, so the producer's next Q load follows all of them.
        super().epilogue(*args, **kwargs)
        self._pipeline_q.consumer_release_w_index(0)


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
