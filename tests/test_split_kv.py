"""Split-KV decode on the CPU: the split-count heuristic, num_splits validation, the
pure-JAX combine's numerics, and cross-lowering (the split call's operands, its one
float32 workspace result and its scalars)."""
from __future__ import annotations

import dataclasses
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import has_compiler

import jax_fa4
import jax_fa4.api
from jax_fa4 import split_primitive as split_kv
from jax_fa4 import varlen
from jax_fa4.validate import num_splits as check_num_splits
from jax_fa4.kernels import split
from jax_fa4.kernels.config import TileConfig
from jax_fa4.kernels.split import (MAX_SPLITS, decode_tile,
                                   choose_num_splits, lse_region, split_variant,
                                   workspace_size)

SDS = jax.ShapeDtypeStruct


# --- heuristic ---------------------------------------------------------------

@pytest.mark.parametrize("batch,kv_heads,n_blocks,want", [
    (64, 4, 2048, 1),     # 256 thread blocks already fill 132 SMs
    (32, 4, 2048, 1),     # 128 >= 0.8 * 132
    (8, 4, 512, 4),       # 32 blocks -> 4 splits: 128 of 132 SMs
    (1, 4, 2048, 20),     # one sequence: 0.6 of a wave (80 of 132 SMs)
    (2, 4, 2048, 10),     # two sequences: the same
    (4, 4, 2048, 8),      # 16 tiles: a full wave (128 thread blocks)
    (1, 4, 3, 1),         # too few key blocks to split
])
def test_heuristic(batch, kv_heads, n_blocks, want):
    s = choose_num_splits(batch, kv_heads, 1, n_blocks)
    assert s == want
    assert choose_num_splits(batch, kv_heads, 1, n_blocks, head_dim=256) == want


@pytest.mark.parametrize("batch,want", [(1, 16), (2, 8), (4, 8), (8, 4)])
def test_heuristic_small_grids_at_head_dim_128(batch, want):
    """Head dims up to 128 split a small grid into ~64 blocks, not ~80 (the batch-1
    sweep peaks at 16 splits with 4 KV heads; docs/PERF.md)."""
    assert choose_num_splits(batch, 4, 1, 2048, head_dim=128) == want
    assert choose_num_splits(batch, 4, 1, 2048, head_dim=64) == want


def test_heuristic_keeps_blocks_per_split():
    for n_blocks in range(1, 40):
        s = choose_num_splits(1, 1, 1, n_blocks)
        assert s == 1 or n_blocks // s >= 2
        assert 1 <= s <= MAX_SPLITS


def test_heuristic_skewed_batch_sized_by_capacity():
    """Lengths are traced: the plan sizes splits by the page table's capacity, so one
    long sequence among short ones still spreads over the GPU."""
    def plan(max_pages):
        return varlen.kernel_plan(
            "paged_attention", q=SDS((4, 1, 32, 128), jnp.bfloat16),
            k_cache=SDS((4 * max_pages, 64, 4, 128), jnp.bfloat16),
            v_cache=SDS((4 * max_pages, 64, 4, 128), jnp.bfloat16),
            page_table=SDS((4, max_pages), jnp.int32), seqused_k=SDS((4,), jnp.int32),
            is_causal=True)
    assert plan(2048).num_splits >= 6  # 16 tiles -> >= 96 thread blocks
    assert plan(1).num_splits == 1


def test_prefill_is_not_split_automatically():
    plan = varlen.kernel_plan(
        "paged_attention", q=SDS((1, 512, 32, 128), jnp.bfloat16),
        k_cache=SDS((512, 64, 4, 128), jnp.bfloat16), v_cache=SDS((512, 64, 4, 128), jnp.bfloat16),
        page_table=SDS((1, 512), jnp.int32), seqused_k=SDS((1,), jnp.int32), is_causal=True)
    assert plan.num_splits == 1


def test_attention_short_q_long_k_plans_a_split():
    q, k = SDS((1, 1, 32, 128), jnp.bfloat16), SDS((1, 32768, 4, 128), jnp.bfloat16)
    assert jax_fa4.api.kernel_plan(q, k, k).num_splits > 1
    q = SDS((1, 2048, 32, 128), jnp.bfloat16)
    assert jax_fa4.api.kernel_plan(q, k, k).num_splits == 1


# --- validation --------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", MAX_SPLITS + 1])
def test_bad_num_splits(bad):
    with pytest.raises(ValueError, match="num_splits"):
        check_num_splits(bad, 4)


def test_num_splits_times_batch_bounded():
    with pytest.raises(ValueError, match="num_splits"):
        check_num_splits(128, 1000)


def _paged(b=2, tq=1):
    q = jnp.ones((b, tq, 8, 64), jnp.bfloat16)
    kc = jnp.ones((10, 16, 2, 64), jnp.bfloat16)
    return q, kc, kc, jnp.zeros((b, 4), jnp.int32), jnp.array([5, 9][:b], jnp.int32)


def test_paged_bad_num_splits_raises_at_trace():
    with pytest.raises(ValueError, match="num_splits"):
        jax.jit(functools.partial(jax_fa4.paged_attention, num_splits=0)).trace(*_paged())


def test_num_splits_needs_dense_q():
    q, kc, vc, pt, used = _paged()
    with pytest.raises(ValueError, match="num_splits"):
        jax_fa4.paged_attention(q[:, 0], kc, vc, pt, used, cu_seqlens_q=jnp.array([0, 1, 2]),
                                max_seqlen_q=1, num_splits=2)
    with pytest.raises(ValueError, match="num_splits"):
        jax_fa4.varlen_attention(q[:, 0], kc[0], vc[0], jnp.array([0, 1, 2]),
                                 jnp.array([0, 8, 16]), max_seqlen_q=1, max_seqlen_k=8,
                                 num_splits=3)


def test_cpu_runs_the_fallback_for_any_split_count():
    q, kc, vc, pt, used = _paged()
    pt = jnp.arange(8, dtype=jnp.int32).reshape(2, 4)
    q = jax.random.normal(jax.random.PRNGKey(0), q.shape, jnp.bfloat16)
    kc = jax.random.normal(jax.random.PRNGKey(1), kc.shape, jnp.bfloat16)
    a = jax_fa4.paged_attention(q, kc, kc, pt, used, num_splits=1)
    b = jax_fa4.paged_attention(q, kc, kc, pt, used, num_splits=7)
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


# --- combine -----------------------------------------------------------------

def _partials(scores, v, bounds, sinks=None):
    """Per-split normalized (o, lse) of softmax(scores) @ v over key ranges."""
    os_, ls = [], []
    for lo, hi in bounds:
        s = scores[..., lo:hi]
        if hi <= lo:
            os_.append(np.zeros(scores.shape[:-1] + v.shape[-1:]))
            ls.append(np.full(scores.shape[:-1], -np.inf))
            continue
        m = s.max(-1, keepdims=True)
        p = np.exp(s - m)
        os_.append((p / p.sum(-1, keepdims=True)) @ v[lo:hi])
        ls.append(np.log(p.sum(-1)) + m[..., 0])
    return np.stack(os_), np.stack(ls)


@pytest.mark.parametrize("with_sinks", [False, True])
def test_combine_matches_full_softmax(with_sinks):
    rng = np.random.default_rng(0)
    b, n, t, sk, hv = 2, 3, 2, 50, 8
    scores = rng.standard_normal((b, n, t, sk)) * 3
    v = rng.standard_normal((sk, hv))
    sinks = rng.standard_normal(n) if with_sinks else None
    bounds = [(0, 20), (20, 20), (20, 49), (49, 50), (50, 50)]  # empty splits too
    o_p, l_p = _partials(scores, v, bounds)
    o, lse = split_kv.combine(jnp.asarray(o_p, jnp.float32), jnp.asarray(l_p, jnp.float32),
                              None if sinks is None else jnp.asarray(sinks, jnp.float32),
                              jnp.float32)
    full = scores if sinks is None else np.concatenate(
        [scores, np.broadcast_to(sinks[None, :, None, None], (b, n, t, 1))], -1)
    ref_lse = np.log(np.exp(full).sum(-1))
    ref_o = np.exp(scores - ref_lse[..., None]) @ v
    np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(o), np.swapaxes(ref_o, 1, 2), rtol=1e-4, atol=1e-5)


def test_combine_rows_without_keys():
    o_p = jnp.zeros((3, 1, 2, 1, 4))
    l_p = jnp.full((3, 1, 2, 1), -jnp.inf)
    o, lse = split_kv.combine(o_p, l_p, None, jnp.bfloat16)
    assert not np.isnan(np.asarray(o, np.float32)).any()
    np.testing.assert_array_equal(np.asarray(lse), -np.inf)
    o, lse = split_kv.combine(o_p, l_p, jnp.array([0.5, -1.0]), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(o, np.float32), 0.0)
    np.testing.assert_allclose(np.asarray(lse)[0, :, 0], [0.5, -1.0])


# --- cross-lowering (compiles the split kernel) ---------------------------------

requires_compiler = pytest.mark.skipif(not has_compiler(), reason="needs jax_fa4[compile]")


@pytest.fixture(scope="module")
def _own_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_FA4_CACHE_DIR", str(tmp_path_factory.mktemp("split_kernels")))
        mp.delenv("JAX_FA4_COMPILE", raising=False)
        yield


def _lower(num_splits, sinks=False):
    b, pages, ps, kh, hd, mp = 3, 64, 64, 2, 128, 20
    args = [SDS((b, 1, 16, hd), jnp.bfloat16), SDS((pages, ps, kh, hd), jnp.bfloat16),
            SDS((pages, ps, kh, hd), jnp.bfloat16), SDS((b, mp), jnp.int32),
            SDS((b,), jnp.int32)]
    kw = dict(sinks=SDS((16,), jnp.float32)) if sinks else {}
    f = functools.partial(jax_fa4.paged_attention, is_causal=True, implementation="fa4",
                          num_splits=num_splits, local_window_size=(100, 0))
    return jax.jit(f).trace(*args, **kw).lower(lowering_platforms=("cuda",)).as_text()


def _call_line(text):
    lines = [x for x in text.splitlines() if "@jax_fa4_cute_call" in x]
    assert len(lines) == 1, len(lines)
    return lines[0]


@requires_compiler
@pytest.mark.compile
@pytest.mark.usefixtures("_own_cache")
def test_split_call_operands_and_workspace():
    line = _call_line(_lower(7, sinks=True))
    ops = re.search(r":\s*\(([^()]*)\)\s*->\s*(\S+)\s*$", line)
    # q, k_cache, v_cache, seqused_k, page_table: no sinks (the combine adds them)
    assert ops.group(1).split(", ") == [
        "tensor<3x1x16x128xbf16>", "tensor<64x64x2x128xbf16>", "tensor<64x64x2x128xbf16>",
        "tensor<3xi32>", "tensor<3x20xi32>"]
    assert ops.group(2) == f"tensor<{workspace_size(3, 16, 1, 128, 7)}xf32>"
    assert re.search(r'symbol = "jax_fa4_fwds_', line)
    # window bounds, then the split count
    assert re.search(r"i32_scalars = dense<\[100, 0, 7\]>", line)


@requires_compiler
@pytest.mark.compile
@pytest.mark.usefixtures("_own_cache")
def test_split_call_fuses_the_combine_without_sinks():
    line = _call_line(_lower(7))
    # one custom call: out, lse, then the workspace (FA4's combine runs in the launcher)
    assert re.search(r"->\s*\(tensor<3x1x16x128xbf16>, tensor<3x16x1xf32>, "
                     rf"tensor<{workspace_size(3, 16, 1, 128, 7)}xf32>\)", line)
    assert re.search(r'symbol = "jax_fa4_fwds_', line)


def test_workspace_o_region_is_16_byte_aligned():
    for b, n, t, s in [(1, 1, 1, 7), (3, 2, 1, 5), (2, 16, 3, 1)]:
        start = lse_region(b, n, t, s)
        assert start % 4 == 0 and s * b * n * t <= start < s * b * n * t + 4
        assert workspace_size(b, n, t, 64, s) == start + s * b * n * t * 64


def _paged_plan(hd, page, num_splits=None, **kw):
    pages = 64
    return varlen.kernel_plan("paged_attention", q=SDS((2, 1, 32, hd), jnp.bfloat16),
                              k_cache=SDS((pages, page, 4, hd), jnp.bfloat16),
                              v_cache=SDS((pages, page, 4, hd), jnp.bfloat16),
                              page_table=SDS((2, pages // 2), jnp.int32),
                              seqused_k=SDS((2,), jnp.int32), is_causal=True,
                              num_splits=num_splits, **kw)


def test_split_plans_the_decode_tile_for_64_token_pages():
    sv = _paged_plan(128, 64, num_splits=8).kernel_variant
    assert sv.base.tile == TileConfig(64, 64, True, True, num_stages=4)
    assert sv.base.paged_tma and sv.fused_combine
    unsplit = _paged_plan(128, 64, num_splits=1).variant
    assert unsplit.tile.tile_m == 128 and not unsplit.paged_tma  # prefill tile, cp.async
    # other page sizes keep FA4's tile
    assert _paged_plan(128, 16, num_splits=8).kernel_variant.base.tile.tile_m == 128


def test_split_plans_decode_tiles_for_other_head_dims_and_128_token_pages(monkeypatch):
    monkeypatch.setattr(split, "PLAN", split.SPLIT_PLANS["issue18"])
    for hd, page, stages in [(96, 64, 4), (192, 64, 4), (256, 64, 2), (128, 128, 3),
                             (96, 128, 4)]:
        sv = _paged_plan(hd, page, num_splits=8).kernel_variant
        t = sv.base.tile
        assert (t.tile_m, t.tile_n, t.num_stages) == (64, page, stages), (hd, page)
        assert sv.base.paged_tma
    # hdim 256 with 128-token pages: one stage would fit; FA4's tile stays
    assert _paged_plan(256, 128, num_splits=8).kernel_variant.base.tile.tile_m == 128
    assert decode_tile(256, 128) is None
    assert _paged_plan(128, 64, num_splits=8).kernel_variant.combine == "wide"
    # with sinks JAX merges: no combine kernel, so no second object for the same code
    unfused = _paged_plan(128, 64, num_splits=8, sinks=SDS((32,), jnp.float32)).kernel_variant
    assert not unfused.fused_combine and unfused.combine == "fa4"


def test_default_split_plan_is_the_gpu_validated_one():
    """Calls get issue 18's plan (its GPU cases passed on 2026-12-07); the fused
    combine (issue18f) waits for its own."""
    assert split.DEFAULT_PLAN == "issue18"
    assert split.PLAN == split.SPLIT_PLANS[os.environ.get("JAX_FA4_SPLIT_PLAN", "issue18")]
    if "JAX_FA4_SPLIT_PLAN" not in os.environ:
        sv = _paged_plan(96, 64, num_splits=8).kernel_variant
        assert sv.combine == "wide" and sv.base.tile.tile_m == 64


def test_head_dim_512_splits():
    plan = _paged_plan(512, 64)
    assert plan.num_splits > 1 and plan.kernel_variant.base.tile.design == "split_k"


def test_unsplit_call_has_out_and_lse():
    line = _call_line(_lower(1))
    assert re.search(r'symbol = "jax_fa4_fwd_[0-9a-f]', line)
    assert re.search(r"->\s*\(tensor<3x1x16x128xbf16>, tensor<3x16x1xf32>\)", line)


def _paged_shapes(b, kh, hd=128):
    return (SDS((b, 1, 4 * kh, hd), jnp.bfloat16), SDS((4096, 64, kh, hd), jnp.bfloat16),
            SDS((4096, 64, kh, hd), jnp.bfloat16), SDS((b, 512), jnp.int32),
            SDS((b,), jnp.int32))


def _fwd_params(f, *args):
    """The jax_fa4_fwd primitive's params in f's jaxpr, wherever jit/custom_vjp nest it."""
    from jax_fa4.forward_primitive import fa4_fwd_p

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive is fa4_fwd_p:
                yield e.params["params"]
            for v in e.params.values():
                inner = getattr(v, "jaxpr", v)
                if hasattr(inner, "eqns"):
                    yield from walk(inner)
    return next(walk(jax.make_jaxpr(f)(*args).jaxpr))


def _lowered_splits(f, *args):
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return int(re.search(r"i32_scalars = dense<\[-?\d+, -?\d+, (\d+)\]>",
                         _call_line(text)).group(1))


@requires_compiler
@pytest.mark.compile
@pytest.mark.usefixtures("_own_cache")
def test_lowering_replans_a_heuristic_split_count_for_its_shapes():
    """The split count is taken when the call is lowered, from the shapes lowered: a
    shard's (jit's per-shard call, shard_map) or a batch folded by vmap, which fill a
    GPU differently from the shapes the plan saw.  A forced count is kept."""
    from jax_fa4.forward_primitive import fa4_fwd_p

    kw = dict(is_causal=True, implementation="fa4", local_window_size=(100, 0))
    paged = lambda n: functools.partial(jax_fa4.paged_attention, num_splits=n, **kw)  # noqa: E731
    auto = _fwd_params(paged(None), *_paged_shapes(8, 8))
    bind = lambda params: lambda *a: fa4_fwd_p.bind(*a, params=params)  # noqa: E731
    blocks = 32768 // 128
    full = choose_num_splits(8, 8, 1, blocks)
    assert auto.plan.num_splits == full > 1
    assert _lowered_splits(bind(auto), *_paged_shapes(8, 8)) == full
    # heads over 2 devices: 4 KV heads per shard -> more splits per GPU
    heads = choose_num_splits(8, 4, 1, blocks)
    assert heads > full and _lowered_splits(bind(auto), *_paged_shapes(8, 4)) == heads
    # batch over 4 devices
    assert _lowered_splits(bind(auto), *_paged_shapes(2, 8)) == choose_num_splits(
        2, 8, 1, blocks)
    forced = _fwd_params(paged(3), *_paged_shapes(8, 8))
    assert _lowered_splits(bind(forced), *_paged_shapes(2, 8)) == 3
    # vmap: 4 mapped batches of 2 sequences over one shared pool fold into batch 8
    q, kc, vc, table, used = _paged_shapes(2, 8)
    mapped = [SDS((4,) + x.shape, x.dtype) for x in (q, table, used)]
    vf = jax.vmap(paged(None), in_axes=(0, None, None, 0, 0))
    assert choose_num_splits(2, 8, 1, blocks) != full
    assert _lowered_splits(vf, mapped[0], kc, vc, mapped[1], mapped[2]) == full


def test_split_variant_key_differs_from_base():
    plan = varlen.kernel_plan("paged_attention", q=SDS((1, 1, 8, 64), jnp.bfloat16),
                              k_cache=SDS((9, 16, 2, 64), jnp.bfloat16),
                              v_cache=SDS((9, 16, 2, 64), jnp.bfloat16),
                              page_table=SDS((1, 9), jnp.int32), seqused_k=SDS((1,), jnp.int32),
                              sinks=SDS((8,), jnp.float32), num_splits=3)
    sv = plan.kernel_variant
    assert sv == split_variant(plan.variant, plan.combine, plan.split_pdl)
    assert not sv.base.has_sinks
    assert sv.symbol != plan.variant.symbol and "split-KV" in sv.describe()
    assert type(sv).from_dict(sv.as_dict()) == sv


@requires_compiler
@pytest.mark.compile
@pytest.mark.usefixtures("_own_cache")
@pytest.mark.parametrize("hd,page", [(256, 64), (128, 128)])
def test_issue18_plan_compiles_and_lowers(hd, page, monkeypatch):
    """Issue 18's split plan: the wide combine and the decode tiles for head dim 256 (2
    K/V stages) and 128-token pages (64 x 128, 3 stages) compile for sm_90a and lower to
    one custom call with out, lse and the workspace."""
    monkeypatch.setattr(split, "PLAN", split.SPLIT_PLANS["issue18"])
    b, pages, kh, mp = 2, 64, 2, 32
    args = [SDS((b, 1, 16, hd), jnp.bfloat16), SDS((pages, page, kh, hd), jnp.bfloat16),
            SDS((pages, page, kh, hd), jnp.bfloat16), SDS((b, mp), jnp.int32),
            SDS((b,), jnp.int32)]
    sv = varlen.kernel_plan("paged_attention", q=args[0], k_cache=args[1], v_cache=args[2],
                            page_table=args[3], seqused_k=args[4], is_causal=True,
                            num_splits=5).kernel_variant
    assert sv.combine == "wide" and sv.base.tile.tile_m == 64 and sv.base.paged_tma
    f = functools.partial(jax_fa4.paged_attention, is_causal=True, implementation="fa4",
                          num_splits=5)
    line = _call_line(jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text())
    assert f'symbol = "{sv.symbol}"' in line
    assert re.search(rf"->\s*\(tensor<{b}x1x16x{hd}xbf16>, tensor<{b}x16x1xf32>, "
                     rf"tensor<{workspace_size(b, 16, 1, hd, 5)}xf32>\)", line)


@requires_compiler
@pytest.mark.compile
@pytest.mark.usefixtures("_own_cache")
@pytest.mark.parametrize("q_heads", [16, 2])  # GQA 8 (packed) and group 1
def test_fused_combine_plan_compiles_and_lowers(q_heads, monkeypatch):
    """Plan issue18f: the split kernel merges in its last-arriving block
    (kernels/forward_split_fused.py).  It compiles for sm_90a and lowers to one custom
    call with results (out, workspace); the LSE is a slice of the workspace."""
    monkeypatch.setattr(split, "PLAN", split.SPLIT_PLANS["issue18f"])
    b, pages, kh, mp, hd, s = 2, 64, 2, 32, 128, 5
    args = [SDS((b, 1, q_heads, hd), jnp.bfloat16), SDS((pages, 64, kh, hd), jnp.bfloat16),
            SDS((pages, 64, kh, hd), jnp.bfloat16), SDS((b, mp), jnp.int32),
            SDS((b,), jnp.int32)]
    sv = varlen.kernel_plan("paged_attention", q=args[0], k_cache=args[1], v_cache=args[2],
                            page_table=args[3], seqused_k=args[4], is_causal=True,
                            num_splits=s).kernel_variant
    assert sv.combine == "fused" and "fused_source" in sv.key()
    from jax_fa4.kernels import compile as kernel_compile
    with kernel_compile.target_sm90():
        from jax_fa4.kernels.forward_split_fused import compile_split_fused
        assert len(compile_split_fused(sv)) > 10_000
    ws = workspace_size(b, q_heads, 1, hd, s, fused=True)
    assert ws == split.fused_regions(b, q_heads, 1, hd, s)[1] + b * q_heads
    for return_lse in (False, True):
        f = functools.partial(jax_fa4.paged_attention, is_causal=True, implementation="fa4",
                              num_splits=s, return_lse=return_lse)
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        line = _call_line(text)
        assert f'symbol = "{sv.symbol}"' in line
        assert re.search(rf"->\s*\(tensor<{b}x1x{q_heads}x{hd}xbf16>, tensor<{ws}xf32>\)", line)
        if return_lse:  # (unread, the slice is dead code XLA's DCE removes)
            assert re.search(rf"stablehlo.slice .*tensor<{ws}xf32>", text)


@requires_compiler
@pytest.mark.compile
@pytest.mark.usefixtures("_own_cache")
def test_prefetch_plan_compiles_and_lowers(monkeypatch):
    """Plan issue18q (kernels/forward_split_prefetch.py): the split kernel prefetches
    its first K/V tiles to L2 before its PDL wait and the combine triggers its own
    dependents before it waits; it compiles for sm_90a, and its call lowers like the
    combine's (out, lse, workspace), naming its own object."""
    monkeypatch.setattr(split, "PLAN", split.SPLIT_PLANS["issue18q"])
    b, pages, kh, mp, hd, s = 2, 64, 2, 32, 128, 5
    args = [SDS((b, 1, 16, hd), jnp.bfloat16), SDS((pages, 64, kh, hd), jnp.bfloat16),
            SDS((pages, 64, kh, hd), jnp.bfloat16), SDS((b, mp), jnp.int32),
            SDS((b,), jnp.int32)]
    sv = varlen.kernel_plan("paged_attention", q=args[0], k_cache=args[1], v_cache=args[2],
                            page_table=args[3], seqused_k=args[4], is_causal=True,
                            num_splits=s).kernel_variant
    assert sv.pdl and sv.prefetch == 4 and "prefetch_source" in sv.key()
    assert sv.symbol != dataclasses.replace(sv, prefetch=0).symbol
    from jax_fa4.kernels import compile as kernel_compile
    with kernel_compile.target_sm90():
        from jax_fa4.kernels.forward_split_prefetch import compile_split_prefetch
        assert len(compile_split_prefetch(sv)) > 10_000
    f = functools.partial(jax_fa4.paged_attention, is_causal=True, implementation="fa4",
                          num_splits=s)
    line = _call_line(jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text())
    assert f'symbol = "{sv.symbol}"' in line
    assert re.search(rf"->\s*\(tensor<{b}x1x16x{hd}xbf16>, tensor<{b}x16x1xf32>, "
                     rf"tensor<{workspace_size(b, 16, 1, hd, s)}xf32>\)", line)
    # sinks merge in JAX (no combine kernel to trigger early): no prefetch
    sinks = _paged_plan(128, 64, num_splits=8, sinks=SDS((32,), jnp.float32)).kernel_variant
    assert sinks.prefetch == 0 and not sinks.fused_combine


def test_the_plan_owns_the_split_kernel(monkeypatch):
    """The split plan is read when a call is planned: a call planned under issue18f
    keeps its in-kernel merge (and one planned under issue18p its PDL launch) even when
    the process's plan differs by the time the call is lowered (bench_decode switches
    plans per call)."""
    for name, field, value in [("issue18f", "combine", "fused"), ("issue18p", "pdl", True),
                               ("issue18q", "prefetch", 4)]:
        monkeypatch.setattr(split, "PLAN", split.SPLIT_PLANS[name])
        plan = _paged_plan(128, 64, num_splits=8)
        monkeypatch.setattr(split, "PLAN", split.SPLIT_PLANS["issue17"])
        assert getattr(plan.kernel_variant, field) == value
        assert getattr(_paged_plan(128, 64, num_splits=8).kernel_variant, field) != value


@pytest.mark.compile
@pytest.mark.skipif(not has_compiler(), reason="needs jax_fa4[compile]")
def test_fused_merge_issues_a_chunk_of_loads_before_any_exp(tmp_path):
    """The in-kernel merge (kernels/forward_split_fused.py) is latency-bound: in the PTX,
    after the arrival counter's atomic, every load of a chunk of MERGE_CHUNK splits
    (each split's LSE and MERGE_COLS partial-O values) comes before the first exp, so
    the chunk is one L2 round trip (Nsight Compute: the two-pass merge it replaced spent
    ~9,000 cycles in ~8 dependent round trips)."""
    from jax_fa4.kernels.forward_split_fused import MERGE_CHUNK, MERGE_COLS
    from kernel_dump import kernel_dumps

    with split.use_plan("issue18f"):
        sv = _paged_plan(128, 64, num_splits=16).kernel_variant
    assert sv.combine == "fused"
    ptx = "\n".join(kernel_dumps(tmp_path, sv))
    merge = ptx[ptx.index("atom.global.acq_rel"):]
    first_exp = merge.index("ex2.approx")
    loads = len(re.findall(r"\bld\.global", merge[:first_exp]))
    assert loads >= MERGE_CHUNK * (1 + MERGE_COLS), loads


def test_candidate_plans_are_plans_other_than_the_default():
    """tests/precompile_device.sh builds DEFAULT_PLAN and CANDIDATE_PLANS by default."""
    assert set(split.CANDIDATE_PLANS) <= set(split.SPLIT_PLANS)
    assert split.DEFAULT_PLAN not in split.CANDIDATE_PLANS
