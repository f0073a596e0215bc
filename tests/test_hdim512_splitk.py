"""The hdim-512 split-K-exchange kernel (kernels/forward_hdim512_splitk.py) on CPU: it
refuses configurations its design cannot run, compiles for sm_90a through the design
harness's launcher (benchmarks/bench_hdim512_designs.py, forward.py's argument
convention), and the harness's direct custom call cross-lowers with every operand of a
paged call.  GPU numerics and timings: the harness's --run (docs/PERF.md)."""
import os
import sys

import jax
import pytest

from conftest import has_compiler

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import bench_hdim512_designs as designs  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.compile,
              pytest.mark.skipif(not has_compiler(),
                                 reason="needs jax_fa4[compile] (flash_attn and cutlass)")]


def _entry(name):
    return next(e for e in designs.VARIANTS if e["name"] == name)


@pytest.mark.parametrize("kw", [dict(tile_m=128), dict(mma_pv_is_rs=False),
                                dict(intra_wg_overlap=False)])
def test_rejects_configurations_outside_the_design(kw):
    from jax_fa4.kernels.compile import target_sm90

    args = dict(tile_m=64, tile_n=64, num_stages=1, mma_pv_is_rs=True, intra_wg_overlap=True)
    # sm_90a, so that the assertion is the design's, not FA4's arch check
    with target_sm90():
        import cutlass

        from jax_fa4.kernels.forward_hdim512_splitk import FlashAttentionForwardSm90SplitK

        FlashAttentionForwardSm90SplitK(cutlass.BFloat16, 512, 512, 8, is_causal=True,
                                        pack_gqa=True, **args)  # the design itself builds
        with pytest.raises(AssertionError):
            FlashAttentionForwardSm90SplitK(cutlass.BFloat16, 512, 512, 8, is_causal=True,
                                            pack_gqa=True, **{**args, **kw})


@pytest.fixture(scope="module")
def paged_object():
    e = _entry("split_k_g8_causal_paged_cpasync")
    v = designs.variant(e)
    return e, v, designs.compile_object("split_k", v, "test_hd512_paged", None)


def test_paged_variant_compiles(paged_object):
    _, _, obj = paged_object
    assert obj[:4] == b"\x7fELF" and len(obj) > 10_000


def test_direct_call_lowers_with_every_operand(paged_object):
    e, v, obj = paged_object
    e = dict(e, symbol="test_hd512_paged", variant=v.as_dict(),
             size_dims=designs.size_dims(v))
    ops, _ = designs.check_case(e, 17, jax, jax.numpy)
    text = jax.jit(lambda ops: designs.ffi_attention(e, obj, ops, (0, 0))).trace(ops).lower(
        lowering_platforms=("cuda",)).as_text()
    call = next(line for line in text.splitlines() if "@jax_fa4_cute_call" in line)
    assert call.count("%arg") == 5  # q, k cache, v cache, seqused_k, page table
    assert 'symbol = "test_hd512_paged"' in call
