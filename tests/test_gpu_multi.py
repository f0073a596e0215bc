"""Sharded execution on every visible GPU (marker `gpu`): tensor-parallel heads and
data-parallel batch, inside `jit` (the custom_partitioning rule, jax_fa4/sharding.py)
and inside `shard_map`, for `attention` and `paged_attention`.

Each sharded result must equal the one-device result exactly (each shard computes the
same rows with the same kernel), and the compiled module must hold no collective
around the call.  With one GPU the mesh has one device: the same code path runs
(jit with NamedSharding, shard_map), but XLA does not partition; with 2+ GPUs it is
the multi-GPU run.  Variants: tests/gpu_cases_multi.py (for precompile).
"""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_fa4

sys.path.insert(0, os.path.dirname(__file__))
from gpu_cases_multi import DENSE, PAGED  # noqa: E402
from test_gpu_forward import _has_sm90  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _has_sm90(), reason="needs an SM90 (Hopper) GPU"),
              pytest.mark.usefixtures("poisoned_outputs")]

COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce",
               "reduce-scatter")


def _mesh(axis):
    return jax.make_mesh((jax.device_count(),), (axis,))


def _rand(rng, shape, dtype=jnp.bfloat16):
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def _dense_inputs(seed=0):
    rng = np.random.default_rng(seed)
    (qs, _), (ks, _) = DENSE["query"], DENSE["key"]
    return _rand(rng, qs), _rand(rng, ks), _rand(rng, ks)


def _paged_inputs(seed=0):
    rng = np.random.default_rng(seed)
    (qs, _), (ks, _), (ts, _) = PAGED["q"], PAGED["k_cache"], PAGED["page_table"]
    pages, page_size = ks[:2]
    table = jnp.asarray(rng.permutation(pages)[:ts[0] * ts[1]].reshape(ts), jnp.int32)
    used = jnp.asarray(rng.integers(1, ts[1] * page_size, ts[0]), jnp.int32)
    return _rand(rng, qs), _rand(rng, ks), _rand(rng, ks), table, used


def _dense(q, k, v):
    return jax_fa4.attention(q, k, v, is_causal=True, implementation="fa4")


# A fixed split count: the split-KV heuristic sizes S from the shapes it sees, and under
# shard_map those are the shard's (fewer heads or sequences -> more splits per GPU), which
# changes the summation order.  Exact equality needs the same S on both sides;
# test_shard_map_heuristic_splits checks the heuristic's choice within rounding.
PAGED_SPLITS = 4


def _paged(q, kc, vc, table, used, num_splits=PAGED_SPLITS):
    return jax_fa4.paged_attention(q, kc, vc, table, used, is_causal=True,
                                   implementation="fa4", num_splits=num_splits)


def _run_sharded(f, args, specs, mesh):
    placed = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(args, specs)]
    jf = jax.jit(f)
    hlo = jf.lower(*placed).compile().as_text()
    return jf(*placed), hlo


def _same(a, b):
    a, b = np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
    assert not np.isnan(a).any()
    np.testing.assert_array_equal(a, b)


HEADS4 = P(None, None, "model", None)
CASES = {
    "dense_heads": (_dense, _dense_inputs, "model", [HEADS4] * 3),
    "dense_batch": (_dense, _dense_inputs, "data", [P("data")] * 3),
    "paged_heads": (_paged, _paged_inputs, "model", [HEADS4] * 3 + [P(), P()]),
    "paged_batch": (_paged, _paged_inputs, "data",
                    [P("data"), P(), P(), P("data"), P("data")]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_jit_equals_one_device(name):
    f, inputs, axis, specs = CASES[name]
    args = inputs()
    ref = jax.jit(f)(*args)
    out, hlo = _run_sharded(f, args, specs, _mesh(axis))
    _same(out, ref)
    assert "jax_fa4_cute_call" in hlo
    assert [c for c in COLLECTIVES if c in hlo] == []


@pytest.mark.parametrize("name", ["dense_heads", "paged_heads", "paged_batch"])
def test_shard_map_equals_one_device(name):
    f, inputs, axis, specs = CASES[name]
    args = inputs()
    mesh = _mesh(axis)
    out_spec = specs[0] if name != "paged_batch" else P("data")
    sm = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=tuple(specs), out_specs=out_spec))
    placed = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(args, specs)]
    _same(sm(*placed), jax.jit(f)(*args))


def test_shard_map_heuristic_splits():
    """Decode under shard_map with the split heuristic: each shard plans its own split
    count from its shapes, so results match the one-device run within bf16 rounding
    (not bit for bit)."""
    f = functools.partial(_paged, num_splits=None)
    args = _paged_inputs(1)
    mesh = _mesh("model")
    specs = CASES["paged_heads"][3]
    sm = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=tuple(specs), out_specs=specs[0]))
    placed = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(args, specs)]
    a = np.asarray(sm(*placed).astype(jnp.float32))
    b = np.asarray(jax.jit(f)(*args).astype(jnp.float32))
    assert not np.isnan(a).any()
    assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b)
