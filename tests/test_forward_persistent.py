"""The persistent dense forward (kernels/forward_persistent.py, TileConfig.persistent)
on CPU: off by default with every earlier key unchanged; when switched on, only dense
queries without seqused_q, FA4's design, unsplit calls and tiles whose shared memory
holds the extra O buffer take it; it compiles for sm_90a, its call lowers
like the plain forward under its own symbol, its tile loop strides by the grid, O is
staged in its own buffer and Q is released where FA4 releases it."""
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from jax_fa4.dispatch import DenseCall, VarlenCall, plan_dense, plan_varlen
from jax_fa4.kernels import ForwardVariant, TileConfig, config

sys.path.insert(0, os.path.dirname(__file__))
from kernel_dump import kernel_dumps  # noqa: E402
from test_lowering import _own_kernel_cache, attn, compiles, lower, one_call  # noqa: E402,F401

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SDS = jax.ShapeDtypeStruct


def dense(d=128, seq_q=512, seq_k=512, window=(None, 0), heads=(16, 16), **kw):
    return DenseCall(dtype="bfloat16", batch=64, seq_q=seq_q, seq_k=seq_k, heads_q=heads[0],
                     heads_k=heads[1], head_dim=d, head_dim_v=d, window=window, **kw)


def test_off_by_default_and_keys_unchanged():
    p = plan_dense(dense())
    assert not p.variant.tile.persistent
    assert "persistent" not in p.variant.key() and "persistent" not in p.variant.describe()
    with config.use_forward_persistent(True):
        q = plan_dense(dense())
    assert q.variant.tile.persistent and "persistent" in q.variant.describe()
    assert '"persistent_source"' in q.variant.key()
    assert q.variant.symbol != p.variant.symbol
    assert dataclasses.replace(q.variant, tile=p.variant.tile).symbol == p.variant.symbol
    assert ForwardVariant.from_dict(q.variant.as_dict()) == q.variant


@pytest.mark.parametrize("window", [(None, 0), (None, None), (100, 0)])
@pytest.mark.parametrize("d", [40, 64, 128])
def test_dense_calls_take_it_when_on(d, window):
    with config.use_forward_persistent(True):
        v = plan_dense(dense(d, window=window)).variant
    assert v.tile.persistent and v.tile.design == "fa4"


@pytest.mark.parametrize("d", [192, 256])
def test_tiles_without_room_for_o_stay_unpersistent(d):
    """FA4's head-dim-192/256 tiles fill shared memory: no room for O's own buffer."""
    with config.use_forward_persistent(True):
        v = plan_dense(dense(d)).variant
    assert not v.tile.persistent
    assert config.fa4_smem_bytes(v.tile, d, d, own_o=True) > config.SM90_SMEM_BYTES


def test_what_stays_unpersistent():
    with config.use_forward_persistent(True):
        # FA4's varlen scheduler: packed queries, and jax.nn's query lengths
        packed = plan_varlen(VarlenCall(
            dtype="bfloat16", q_layout="packed", kv_layout="packed", batch=4, total_q=2048,
            heads_q=16, heads_k=16, head_dim=128, head_dim_v=128, kv_rows=2048,
            window=(None, 0), has_seqused_q=False, has_seqused_k=False))
        lengths = plan_dense(dense(window=(None, None), q_lengths=True, kv_lengths=True))
        # head dim 512's designs, and decode calls (split-KV kernel)
        wide = plan_dense(dense(512, heads=(32, 4)))
        decode = plan_dense(dataclasses.replace(
            dense(seq_q=1, seq_k=16384, window=(None, None), heads=(32, 4)), batch=1))
    assert not packed.variant.tile.persistent
    assert lengths.variant.has_seqused_q and not lengths.variant.tile.persistent
    assert wide.variant.tile.design == "split_k" and not wide.variant.tile.persistent
    assert decode.num_splits > 1 and not decode.kernel_variant.base.tile.persistent


def test_invalid_persistent_variants_are_refused():
    with pytest.raises(ValueError, match="FA4's design"):
        TileConfig(64, 64, True, True, num_stages=1, design="split_k", persistent=True)
    tile = dataclasses.replace(config.sm90_forward_tile(128, 128, True, False), persistent=True)
    with pytest.raises(ValueError, match="dense queries"):
        ForwardVariant("bfloat16", 128, 128, 1, mask="causal", q_layout="packed",
                       kv_layout="packed", tile=tile)


@compiles
def test_compiles_and_lowers_under_its_own_symbol():
    q = SDS((64, 512, 16, 128), jnp.bfloat16)
    # a new function each time: jax.jit caches traces by function
    plain = one_call(lower(attn(is_causal=True, implementation="fa4"), q, q, q))
    with config.use_forward_persistent(True):
        call = one_call(lower(attn(is_causal=True, implementation="fa4"), q, q, q))
        v = plan_dense(dense()).variant
    assert call.symbol == v.symbol != plain.symbol
    # the same launcher: operands, results and scalars as the plain forward's
    assert (call.operand_types, call.result_types, call.size_dims, call.i32) == (
        plain.operand_types, plain.result_types, plain.size_dims, plain.i32)
    assert len(call.object) > 10_000


def _kernel_dump(tmp_path, kind, what="PTX"):
    """CuTe DSL's dump (what: PTX or IR, the MLIR) of the hdim-128 causal forward, plain
    or persistent."""
    v = ForwardVariant("bfloat16", 128, 128, 1, mask="causal")
    if kind == "persistent":
        v = dataclasses.replace(v, tile=dataclasses.replace(v.tile, persistent=True))
    dump = kernel_dumps(tmp_path, v, what)
    assert len(dump) == 1, len(dump)
    return dump[0]


@compiles
def test_tiles_stride_by_the_grid_and_q_is_released_as_fa4_does(tmp_path):
    """In the PTX: the persistent tile loop reads the grid size (FA4's one-tile kernel
    does not), and Q's release (the last mbarrier arrive) comes where FA4's kernel has
    it, before the epilogue's wait for its TMA store: O has its own buffer, so the next
    Q load need not wait for the store (the first version released Q after it)."""
    plain = _kernel_dump(tmp_path, "plain")
    pers = _kernel_dump(tmp_path, "persistent")
    wait, arrive = "cp.async.bulk.wait_group.read", "mbarrier.arrive.shared.b64"
    assert plain.rindex(arrive) < plain.rindex(wait)
    assert pers.rindex(arrive) < pers.rindex(wait)
    assert "%nctaid.x" in pers and "%nctaid.x" not in plain


@compiles
def test_o_is_staged_in_its_own_buffer_after_q(tmp_path):
    """The persistent kernel's correctness change, in its MLIR: the shared-memory struct
    has an sO buffer right after sQ (FA4's own kernel stages O in sQ, which the next
    tile's Q load would overwrite), and the epilogue's O tensor is Q's pointer moved by
    exactly Q's size (128 x 128 bf16 = 16384 elements)."""
    import re

    ir = _kernel_dump(tmp_path, "persistent", "IR")
    fields = dict((name, (int(size), int(at))) for name, size, at in
                  re.findall(r'"(s[A-Z]):(\d+):(\d+)"', ir))
    assert fields["sO"] == (128 * 128 * 2, fields["sQ"][1] + fields["sQ"][0]), fields
    assert re.search(r'add_offset.*ptr<bf16, smem.*int_tuple<"16384">', ir)
