"""Head dim 512 (Gemma-4 global attention) on CPU: dispatch picks the split-K-exchange
kernel (kernels/forward_hdim512_splitk.py) with its tile, rejects the head-dim pairs it cannot take,
cross-lowers dense and paged calls to the custom call (compiling the variant), and the
CPU fallback matches the reference on a sample of the GPU matrix."""
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import pytest

import jax_fa4
from jax_fa4.dispatch import DenseCall, Unsupported, VarlenCall, plan_dense, plan_varlen
from jax_fa4.kernels import ForwardVariant, get_object
from jax_fa4.kernels.config import HDIM512_DESIGNS, hdim512_tile

sys.path.insert(0, os.path.dirname(__file__))
from gpu_cases_hdim512 import CALLS  # noqa: E402
from test_lowering import _own_kernel_cache, compiles, lower, one_call  # noqa: E402,F401
from test_paged_fallback import _lower_cuda, _one_call_signature  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SDS = jax.ShapeDtypeStruct
SPLIT_K = hdim512_tile("split_k")


def dense(d=512, dv=512, heads=(32, 4), **kw):
    return DenseCall(dtype="bfloat16", batch=2, seq_q=333, seq_k=333, heads_q=heads[0],
                     heads_k=heads[1], head_dim=d, head_dim_v=dv,
                     window=kw.pop("window", (None, None)), **kw)


def test_plan_takes_split_k():
    p = plan_dense(dense(window=(None, 0)))
    assert p.variant.tile == SPLIT_K
    assert (SPLIT_K.tile_m, SPLIT_K.tile_n, SPLIT_K.num_stages, SPLIT_K.mma_pv_is_rs) == (
        64, 64, 1, True)
    assert p.variant.mask == "causal" and p.variant.qhead_per_kvhead == 8
    assert "split_k" in p.variant.describe()
    assert not hdim512_tile("split_pv").mma_pv_is_rs  # P through shared memory


def test_design_switch_plans_that_design_and_restores():
    from jax_fa4.kernels import config

    with config.use_hdim512_design("single_qk"):
        assert plan_dense(dense(window=(None, 0))).variant.tile == hdim512_tile("single_qk")
        # only head dim 512 is switched
        assert plan_dense(dense(128, 128)).variant.tile.design == "fa4"
    assert plan_dense(dense(window=(None, 0))).variant.tile == SPLIT_K
    with pytest.raises(ValueError, match="design"):
        with config.use_hdim512_design("fa4"):
            pass


def test_smem_model_ranks_the_designs():
    """benchmarks/smem_model.py (docs/PERF.md's ceiling table): split-K moves 6 bytes
    per 64 MACs, FA4's hdim-128/256 tiles stay under the SM's 128 B/clock."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import smem_model as m

    b = {(x.name, x.d): m.bound(x) for x in m.DESIGNS}
    assert b["split_k", 512]["bytes_per_mac"] == pytest.approx(6 / 64, abs=1e-5)
    assert b["split_k", 512]["share"] == pytest.approx(2 / 3, abs=1e-3)
    assert b["fa4", 128]["share"] == b["fa4", 256]["share"] == 1.0
    assert (b["split_pv", 512]["share"] < b["split_k", 512]["share"]
            < b["single_qk", 512]["share"] < 1.0)


@pytest.mark.parametrize("d,dv", [(512, 256), (256, 512), (64, 512), (384, 384), (520, 520)])
def test_plan_rejects_other_wide_head_dims(d, dv):
    with pytest.raises(Unsupported, match="head_dim"):
        plan_dense(dense(d, dv))


def test_older_variant_keys_are_unchanged():
    # `design` is left out of FA4-design keys: earlier caches stay valid.
    v = ForwardVariant("bfloat16", 128, 128, 1)
    assert "design" not in v.key()
    assert ForwardVariant.from_dict(v.as_dict()) == v
    w = ForwardVariant("bfloat16", 512, 512, 8, mask="causal")
    assert '"design": "split_k"' in w.key()
    assert ForwardVariant.from_dict(w.as_dict()) == w
    with pytest.raises(ValueError, match="design"):
        dataclasses.replace(SPLIT_K, design="nope")
    with pytest.raises(ValueError, match="design"):
        hdim512_tile("fa4")


@pytest.mark.parametrize("page_size,tma", [(64, True), (16, False), (128, False)])
def test_paged_takes_tma_for_64_token_pages(page_size, tma):
    c = VarlenCall(dtype="bfloat16", q_layout="dense", kv_layout="paged", batch=2,
                   total_q=2, heads_q=16, heads_k=2, head_dim=512, head_dim_v=512,
                   kv_rows=64 * page_size, window=(None, 0), has_seqused_k=True,
                   page_size=page_size, max_pages=32)
    v = plan_varlen(c).variant
    assert v.paged_tma is tma and v.tile.tile_n == 64 and v.tile.design == "split_k"


def test_explain_names_unsupported_pair():
    q = jnp.zeros((1, 4, 2, 512), jnp.bfloat16)
    v = jnp.zeros((1, 4, 2, 256), jnp.bfloat16)
    assert "head_dim 512 with value head_dim 256" in jax_fa4.explain(q, q, v, platform="cuda")


@compiles
def test_dense_call_lowers_to_custom_call():
    q = SDS((2, 333, 32, 512), jnp.bfloat16)
    kv = SDS((2, 333, 4, 512), jnp.bfloat16)
    c = one_call(lower(lambda q, k, v: jax_fa4.attention(q, k, v, is_causal=True), q, kv, kv))
    assert c.operand_types == ["tensor<2x333x32x512xbf16>", "tensor<2x333x4x512xbf16>",
                               "tensor<2x333x4x512xbf16>"]
    assert c.result_types == ["tensor<2x333x32x512xbf16>", "tensor<2x32x333xf32>"]
    assert c.f32 == [pytest.approx(512 ** -0.5)]
    v = ForwardVariant("bfloat16", 512, 512, 8, mask="causal")
    assert v.tile == SPLIT_K and c.symbol == v.symbol
    assert c.object[:4] == b"\x7fELF" and c.object == get_object(v)


@compiles
@pytest.mark.parametrize("design", HDIM512_DESIGNS)
def test_every_design_compiles(design):
    """Every head-dim-512 kernel builds for a varlen variant with every optional feature
    (window bounds, softcap, sinks, packed GQA)."""
    v = ForwardVariant("bfloat16", 512, 512, 4, mask="local", window_left=True,
                       window_right=True, softcap=30.0, has_sinks=True, q_layout="packed",
                       kv_layout="packed", tile=hdim512_tile(design))
    assert get_object(v)[:4] == b"\x7fELF"


@compiles
def test_paged_call_lowers_to_custom_call():
    case = [c for c in CALLS if c.get("fn") == "paged_attention"][0]
    operands, results = _one_call_signature(_lower_cuda(jax_fa4.paged_attention, case))
    assert operands[1] == "tensor<61x64x1x512xbf16>"
    assert results[0] == "tensor<3x1x8x512xbf16>"


SAMPLE = [c for c in CALLS if "fn" in c][::3]


@pytest.mark.parametrize("case", SAMPLE, ids=lambda c: f"{c['fn']}-{sorted(c)[-1]}")
def test_fallback_matches_reference(case):
    from test_gpu_paged import run_case

    run_case(case, None)
