"""FA4's SM90 forward with two CTAs resident per SM (TileConfig.ctas_per_sm = 2): a
64-row tile (one MMA warpgroup and the producer warpgroup, 256 threads) whose registers
and shared memory fit twice on an SM.  In its own module, so every other forward object
keeps its key.

Why: at issue 20's short sequences (b64 s512: 1-4 K/V blocks per tile) FA4's one CTA
per SM pays, per tile and in series, its launch, barrier init, the Q and first K/V
round trips, the unoverlapped first QK and last PV, and the O store -- ~3 us per tile
by the H100 figures in docs/PERF.md (per-tile time 9.1 us at s512 without a mask,
against 4 x 1.5 us of K/V blocks at the long-sequence rate).  With two CTAs per SM,
one CTA's fixed steps run while the other's GEMMs do (the occupancy answer, as FA2's
on Ampere), with no scheduler to write.  FA4's 64-row tile at one CTA per SM lost
20-30 % (the tile sweep, docs/PERF.md): one warpgroup cannot keep the tensor cores
busy through its own softmax; two resident CTAs give the SM two such warpgroups again.

What changes against FA4's kernel (only this):
1. Registers: FA4 gives a one-warpgroup tile 256 (MMA) + 56 (producer) registers a
   thread, 40K of the SM's 64K.  Here 216 + 40: (216 + 40) x 128 = 32K, half the SM,
   so the launch asks for at most 128 a thread (`min_blocks_per_mp=2`, PTX
   `.minnctapersm 2`) and `setmaxnreg` moves 88 a thread from producer to MMA warps.
2. The launch's `min_blocks_per_mp`: 2 instead of 1.
Shared memory is the tile's business (config.occupancy_tile_fits): 64 x 128 with one
K/V stage (80 KiB) or 64 x 64 with two (80 KiB) at head dim 128.
"""
# forward first: it sets CUTE_DSL_ARCH before cutlass is imported.
from . import forward
from .config import ForwardVariant

# (MMA, producer) registers a thread: (216 + 40) x 128 threads = 32768, half an SM's
MMA_REGS, PRODUCER_REGS = 216, 40


class _Launch:
    """The kernel FA4's __call__ builds, launched with min_blocks_per_mp=2 and the
    maximum shared-memory carveout (two CTAs' buffers; given, the DSL also need not ask
    a GPU for the SM's shared memory, which it does for min_blocks_per_mp > 1 without
    one -- this compiles on hosts without a GPU)."""

    def __init__(self, kernel):
        self._kernel = kernel

    def launch(self, *args, **kwargs):
        kwargs.update(min_blocks_per_mp=2, preferred_smem_carveout=100)
        return self._kernel.launch(*args, **kwargs)


class TwoCTAsPerSMMixin:
    """FA4's SM90 forward at two resident CTAs per SM (module doc).  Mixed in by
    occupancy_kernel."""

    def _setup_attributes(self):
        super()._setup_attributes()
        assert self.num_wg_mma == 1, "two CTAs per SM: a 64-row tile, one MMA warpgroup"
        self.num_mma_regs, self.num_producer_regs = MMA_REGS, PRODUCER_REGS

    def kernel(self, *args, **kwargs):
        # FA4's __call__ calls self.kernel(...).launch(..., min_blocks_per_mp=1)
        return _Launch(super().kernel(*args, **kwargs))


def occupancy_kernel(fa):
    """`fa` (an FA4 SM90 forward kernel object) at two CTAs per SM: its class becomes a
    subclass of TwoCTAsPerSMMixin and the original class."""
    cls = type(fa)
    fa.__class__ = type(cls.__name__ + "TwoPerSM", (TwoCTAsPerSMMixin, cls), {})
    return fa


def compile_forward_occupancy(v: ForwardVariant) -> bytes:
    """forward.compile_forward for a variant with tile.ctas_per_sm == 2 (the launcher and
    its argument convention are forward.py's)."""
    assert v.tile.ctas_per_sm == 2 and v.tile.design == "fa4"
    fa = occupancy_kernel(forward._fa4_kernel(v))
    return forward.compile_launcher(forward._make_launcher(v, fa), v, v.symbol)
