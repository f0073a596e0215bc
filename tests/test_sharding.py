"""Sharding: jit with batch- or head-sharded q/k/v runs one attention call per shard
(jax_fa4/sharding.py: a custom_partitioning rule emitted by the primitive's lowering).

The rule itself is checked in process (an AbstractMesh needs no devices).  Everything
that partitions runs in a subprocess with 8 fake CPU devices
(`--xla_force_host_platform_device_count=8` must be set before JAX creates its
backends), under Shardy (JAX's default) and under GSPMD:

* CPU: XLA partitions the module (the rule's callbacks run), the per-shard fallback
  runs, results equal the unsharded call's, and the compiled module has no
  collectives for batch/head shardings;
* CUDA (needs the compiler; marked `compile`): the module lowered for CUDA is
  partitioned by XLA's SPMD partitioner on the CPU host; the HLO dumped right after
  partitioning holds one `jax_fa4_cute_call` with per-shard shapes and no collective.
  (Compilation then stops, as it must on a CPU host: the FFI handler is CUDA-only.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from conftest import has_compiler

import jax_fa4
from jax_fa4 import sharding
from jax_fa4.dispatch import DenseCall, plan_dense
from jax_fa4.forward_primitive import FwdParams

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PARTITIONERS = ["shardy", "gspmd"]
COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce",
               "reduce-scatter")


def run_devices(code: str, *, partitioner: str = "shardy", env_extra: dict | None = None,
                timeout: int = 600) -> dict:
    """Runs PRELUDE + code in a fresh Python with 8 CPU devices; returns the JSON
    object the code prints last."""
    env = dict(os.environ)
    env.update(env_extra or {})
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_FA4_TEST_PARTITIONER"] = partitioner
    r = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-6000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


PRELUDE = textwrap.dedent("""
    import json, os, re, warnings
    warnings.simplefilter("ignore", DeprecationWarning)
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_use_shardy_partitioner",
                      os.environ["JAX_FA4_TEST_PARTITIONER"] == "shardy")
    from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
    import jax_fa4
    from jax_fa4 import sharding as S
    assert jax.device_count() == 8, jax.devices()
    COLLECTIVES = %r

    # Record what the partition callback is asked and answers.
    PARTITIONS = []
    _partition = S._partitioned.partition
    def _recording(params, mesh, arg_shapes, result_shape):
        r = _partition(params, mesh, arg_shapes, result_shape)
        PARTITIONS.append(dict(arg=[str(a.sharding.spec) for a in arg_shapes],
                               ops=[str(s.spec) for s in r[3]],
                               outs=[str(s.spec) for s in r[2]]))
        return r
    S._partitioned.partition = _recording

    def mesh(shape, names=("data", "model"), explicit=False):
        kind = AxisType.Explicit if explicit else AxisType.Auto
        return jax.make_mesh(shape, names, axis_types=(kind,) * len(names))

    def inputs(b, t, n, kh, h=64, seed=0):
        rng = np.random.default_rng(seed)
        q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((b, t, kh, h)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((b, t, kh, h)), jnp.bfloat16)
        sinks = jnp.asarray(rng.standard_normal((n,)), jnp.float32)
        return q, k, v, sinks

    def put(x, m, spec):
        return jax.device_put(x, NamedSharding(m, spec))

    def max_err(a, b):
        return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    def collectives(text):
        return [c for c in COLLECTIVES if c in text]

    def entry_shapes(text):
        \"\"\"Shapes on the compiled module's ENTRY line (parameters, then result).\"\"\"
        return re.findall(r"[a-z0-9]+\\[[0-9,]*\\]", text[text.index("ENTRY"):].splitlines()[0])

    def check(f, args, sharded_args):
        \"\"\"Lowers, compiles and runs f on sharded args; compares with the unsharded
        run.\"\"\"
        del PARTITIONS[:]
        ref = jax.jit(f)(*args)
        lowered = jax.jit(f).lower(*sharded_args)
        text = lowered.as_text()
        compiled = lowered.compile()
        ctext = compiled.as_text()
        out = jax.jit(f)(*sharded_args)
        return dict(
            custom_partitioning=text.count("@CustomSPMDPartitioning"),
            sdy_rule="sdy.sharding_rule" in text,
            collectives=collectives(ctext),
            entry_shapes=entry_shapes(ctext),
            err=max_err(out, ref),
            out_specs=[str(x.sharding.spec) for x in jax.tree.leaves(out)],
            partitions=list(PARTITIONS),
        )
""" % (COLLECTIVES,))


def _params(b=8, t=128, n=8, kh=4, h=64, sinks=False):
    plan = plan_dense(DenseCall("bfloat16", b, t, t, n, kh, h, h, (None, 0), has_sinks=sinks))
    return FwdParams("dense", plan, 0.125, (None, 0), None, forced=False)


def _sds(shape, mesh, spec):
    return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, spec))


# ----------------------------------------------------------------------------
# The rule (in process)
# ----------------------------------------------------------------------------

MESH = AbstractMesh((2, 4), ("data", "model"))


def specs(q_spec, kv_spec=None, *, b=8, t=128, n=8, kh=4, sinks=False, mesh=MESH):
    kv_spec = q_spec if kv_spec is None else kv_spec
    args = [_sds((b, t, n, 64), mesh, q_spec), _sds((b, t, kh, 64), mesh, kv_spec),
            _sds((b, t, kh, 64), mesh, kv_spec)]
    if sinks:
        args.append(jax.ShapeDtypeStruct((n,), jnp.float32, sharding=NamedSharding(mesh, P())))
    ops, (out, lse) = sharding.call_specs(mesh, args)
    return [tuple(s) for s in ops], tuple(out), tuple(lse)


def test_rule_keeps_batch_and_head_sharding():
    ops, out, lse = specs(P("data", None, "model", None), sinks=True)
    assert ops == [("data", None, "model", None)] * 3 + [("model",)]
    assert out == ("data", None, "model", None) and lse == ("data", "model", None)
    ops, out, lse = specs(P(("data", "model")))
    assert ops[0] == (("data", "model"), None, None, None)
    assert lse == (("data", "model"), None, None)


def test_backward_rule_splits_like_the_forward():
    """Backward call: q k v o do lse dlse sinks -> dq dk dv dsinks, by the same batch
    and KV-head blocks; Shardy's rule leaves d_sinks without a batch factor."""
    f32 = lambda shape, spec: jax.ShapeDtypeStruct(  # noqa: E731
        shape, jnp.float32, sharding=NamedSharding(MESH, spec))
    qs, ss = P("data", None, "model", None), P("data", "model", None)
    args = [_sds((8, 128, 8, 64), MESH, qs), _sds((8, 128, 4, 64), MESH, qs),
            _sds((8, 128, 4, 64), MESH, qs), _sds((8, 128, 8, 64), MESH, qs),
            _sds((8, 128, 8, 64), MESH, qs), f32((8, 8, 128), ss), f32((8, 8, 128), ss),
            f32((8,), P())]
    ops, outs = sharding.backward_call_specs(MESH, args)
    assert [tuple(s) for s in ops] == [tuple(qs)] * 5 + [tuple(ss)] * 2 + [("model",)]
    assert [tuple(s) for s in outs] == [tuple(qs)] * 3 + [("model",)]
    from jax_fa4.backward_primitive import BwdParams
    from jax_fa4.dispatch import plan_backward
    fwd = _params(sinks=True)
    rule, opts = sharding.backward_shardy_rule(BwdParams(fwd, plan_backward(fwd.plan)), 8)
    assert rule == ("b t (k g) h, b s k h, b s k d, b t (k g) d, b t (k g) d, b (k g) t, "
                    "b (k g) t, (k g) -> b t (k g) h, b s k h, b s k d, (k g)")
    assert opts == dict(need_replication_factors=("t", "h", "s", "d"), g=2)


def test_rule_replicates_sequence_and_head_dim():
    ops, out, lse = specs(P("data", "model", None, None))  # q/k/v sequence-sharded
    assert ops == [("data", None, None, None)] * 3 and lse == ("data", None, None)
    ops, _, _ = specs(P(None, None, None, "model"))  # head_dim-sharded
    assert ops == [(None, None, None, None)] * 3


def test_rule_keeps_gqa_groups_within_a_shard():
    # 8 query heads, 4 KV heads: 'model' (4) splits KV heads; ('data','model') (8) does
    # not, so only its leading part 'data' is kept.
    assert specs(P(None, None, "model"))[0][1] == (None, None, "model", None)
    ops, _, lse = specs(P(None, None, ("data", "model")), P())
    assert ops[0] == ops[1] == (None, None, "data", None) and lse == (None, "data", None)
    # 2 KV heads over 'model' (4): heads replicated; MQA likewise.
    assert specs(P(None, None, "model"), P(), kh=2)[0][0] == (None, None, None, None)
    assert specs(P(None, None, "model"), P(), kh=1)[0][0] == (None, None, None, None)


def test_rule_follows_k_when_q_is_replicated():
    ops, out, _ = specs(P(), P("data", None, "model", None))
    assert ops[0] == ("data", None, "model", None) and out == ("data", None, "model", None)


def test_rule_drops_uneven_batch_and_axes_used_twice():
    assert specs(P("model"), b=6)[0][0] == (None, None, None, None)  # 6 % 4
    assert specs(P(("data", "model")), b=6)[0][0] == ("data", None, None, None)
    # heads on the batch axis: batch wins
    assert specs(P("data"), P(None, None, "data"))[0][1] == ("data", None, None, None)


def test_shardy_rule_ties_query_heads_to_kv_heads():
    rule, opts = sharding.shardy_rule(_params(n=8, kh=4, sinks=True), 4)
    assert rule == "b t (k g) h, b s k h, b s k d, (k g) -> b t (k g) d, b (k g) t"
    assert opts == {"g": 2, "need_replication_factors": ("t", "h", "s", "d")}
    rule, opts = sharding.shardy_rule(_params(n=4, kh=4), 3)
    assert rule == "b t k h, b s k h, b s k d -> b t k d, b k t" and "g" not in opts


def test_abstract_mesh_lowering_needs_the_rule_off():
    """custom_partitioning needs devices at lowering time, so with the rule on JAX
    refuses AbstractMesh-only lowerings; set_enabled(False) restores them."""
    mesh = AbstractMesh((8,), ("data",))
    args = [_sds(s, mesh, P("data")) for s in [(8, 64, 4, 64), (8, 64, 2, 64), (8, 64, 2, 64)]]

    def lower():
        f = lambda q, k, v: jax_fa4.attention(q, k, v, is_causal=True)  # noqa: E731
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cpu",)).as_text()

    with pytest.raises(ValueError, match="AbstractMesh cannot be used"):
        lower()
    try:
        sharding.set_enabled(False)
        text = lower()
    finally:
        sharding.set_enabled(True)
    assert "CustomSPMDPartitioning" not in text and "stablehlo.dot_general" in text
    with pytest.raises(ValueError, match="AbstractMesh cannot be used"):
        lower()


# ----------------------------------------------------------------------------
# Sharded jit on 8 CPU devices: the fallback runs per shard
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_sharded_jit_runs_per_shard_on_cpu(partitioner):
    res = run_devices("""
        res = {}
        # batch 8 over 8 devices
        m = mesh((8,), ("data",))
        q, k, v, _ = inputs(8, 128, 4, 2)
        f = lambda q, k, v: jax_fa4.attention(q, k, v, is_causal=True, return_lse=True)
        res["batch"] = check(f, (q, k, v), [put(x, m, P("data")) for x in (q, k, v)])
        # 16 query / 8 KV heads over 8 devices, sinks sharded with the heads, softcap
        m = mesh((8,), ("model",))
        q, k, v, s = inputs(2, 128, 16, 8)
        g = lambda q, k, v, s: jax_fa4.attention(q, k, v, local_window_size=(32, 0),
                                                 logits_soft_cap=20.0, sinks=s)
        hs = P(None, None, "model")
        res["heads"] = check(g, (q, k, v, s), [put(x, m, hs) for x in (q, k, v)]
                             + [put(s, m, P("model"))])
        # batch x heads on a 2x4 mesh, explicit axes
        m = mesh((2, 4), explicit=True)
        q, k, v, _ = inputs(4, 64, 8, 4)
        res["batch_heads"] = check(f, (q, k, v), [put(x, m, P("data", None, "model"))
                                                  for x in (q, k, v)])
        # jax.nn's sequence lengths (seqused operands) shard with the batch
        m = mesh((8,), ("data",))
        q, k, v, _ = inputs(8, 128, 4, 2)
        lens = jnp.arange(8, dtype=jnp.int32) * 17
        h = lambda q, k, v, l: jax_fa4.attention(q, k, v, query_seq_lengths=l,
                                                 key_value_seq_lengths=l)
        res["lengths"] = check(h, (q, k, v, lens),
                               [put(x, m, P("data")) for x in (q, k, v, lens)])
        print(json.dumps(res))
    """, partitioner=partitioner)

    for name, q_shard in [("batch", "bf16[1,128,4,64]"), ("heads", "bf16[2,128,2,64]"),
                          ("batch_heads", "bf16[2,64,2,64]"), ("lengths", "bf16[1,128,4,64]")]:
        r = res[name]
        assert r["custom_partitioning"] == 1, (name, r)
        assert r["sdy_rule"] == (partitioner == "shardy"), (name, r)
        assert r["partitions"], (name, r)  # XLA asked the rule
        assert r["collectives"] == [], (name, r)
        assert r["entry_shapes"][0] == q_shard, (name, r)  # per-shard parameters
        assert r["err"] == 0.0, (name, r)  # same per-row computation as unsharded
    assert res["batch"]["partitions"][-1]["ops"] == ["P('data', None, None, None)"] * 3
    assert res["lengths"]["partitions"][-1]["ops"] == (
        ["P('data', None, None, None)"] * 3 + ["P('data',)"] * 2)
    assert res["batch"]["out_specs"] == ["P('data',)"] * 2
    assert res["heads"]["partitions"][-1]["ops"] == (
        ["P(None, None, 'model', None)"] * 3 + ["P('model',)"])
    assert res["heads"]["out_specs"][0] == "P(None, None, 'model')"
    assert res["batch_heads"]["partitions"][-1]["outs"] == [
        "P('data', None, 'model', None)", "P('data', 'model', None)"]


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_unsupported_shardings_are_gathered_and_still_correct(partitioner):
    """Sequence sharding and head shardings that would split a GQA group are
    replicated by the rule: XLA all-gathers those operands; the result is unchanged."""
    res = run_devices("""
        res = {}
        m = mesh((2, 4))
        q, k, v, _ = inputs(4, 64, 8, 4)
        f = lambda q, k, v: jax_fa4.attention(q, k, v, is_causal=True)
        res["seq"] = check(f, (q, k, v), [put(x, m, P("data", "model")) for x in (q, k, v)])
        m = mesh((8,), ("model",))
        q, k, v, _ = inputs(2, 64, 16, 2)  # 2 KV heads over 8 devices
        res["gqa"] = check(f, (q, k, v), [put(q, m, P(None, None, "model")),
                                          put(k, m, P()), put(v, m, P())])
        # The documented workaround: repeat the KV heads to the shard count.
        def repeated(q, k, v):
            k, v = (jnp.repeat(x, 4, axis=2) for x in (k, v))
            return jax_fa4.attention(q, k, v, is_causal=True)
        res["repeat"] = check(repeated, (q, k, v), [put(q, m, P(None, None, "model")),
                                                    put(k, m, P()), put(v, m, P())])
        res["repeat"]["vs_gqa"] = max_err(jax.jit(repeated)(q, k, v), jax.jit(f)(q, k, v))
        print(json.dumps(res))
    """, partitioner=partitioner)
    seq, gqa = res["seq"], res["gqa"]
    assert seq["custom_partitioning"] == 1 and seq["err"] == 0.0
    assert seq["partitions"][-1]["ops"] == ["P('data', None, None, None)"] * 3
    assert "all-gather" in seq["collectives"]
    assert gqa["custom_partitioning"] == 1 and gqa["err"] == 0.0
    assert gqa["partitions"][-1]["ops"] == ["P(None, None, None, None)"] * 3
    assert "all-gather" in gqa["collectives"]
    rep = res["repeat"]
    assert rep["custom_partitioning"] == 1 and rep["err"] == 0.0 and rep["collectives"] == []
    assert rep["partitions"][-1]["ops"] == ["P(None, None, 'model', None)"] * 3
    assert rep["vs_gqa"] <= 2.0 ** -7  # same attention, other GQA grouping


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_grad_and_vmap_under_sharding(partitioner):
    res = run_devices("""
        res = {}
        m = mesh((2, 4))
        q, k, v, s = inputs(4, 64, 8, 4)
        sh = [put(x, m, P("data", None, "model")) for x in (q, k, v)] + [put(s, m, P("model"))]
        def loss(q, k, v, s):
            o = jax_fa4.attention(q, k, v, is_causal=True, sinks=s)
            return jnp.sum(o.astype(jnp.float32) * jnp.cos(o.astype(jnp.float32)))
        vg = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
        res["grad"] = check(vg, (q, k, v, s), sh)
        res["grad"]["scale"] = max(float(jnp.max(jnp.abs(g.astype(jnp.float32))))
                                   for g in jax.tree.leaves(jax.jit(vg)(q, k, v, s)))
        # vmap: the mapped axis (folded into the batch by the vmap rule) is sharded
        fv = jax.vmap(lambda q, k, v: jax_fa4.attention(q, k, v, is_causal=True))
        args = [x.reshape((2, 2) + x.shape[1:]) for x in (q, k, v)]
        res["vmap"] = check(fv, args, [put(x, m, P("data", None, None, "model"))
                                       for x in args])
        print(json.dumps(res))
    """, partitioner=partitioner)
    g, vm = res["grad"], res["vmap"]
    assert g["custom_partitioning"] == 2  # the forward and the backward
    # The sharded backward sums d_sinks over batch shards: it may round differently.
    assert g["err"] <= 2 * 2.0 ** -8 * g["scale"], g
    assert "all-gather" not in g["collectives"], g
    assert vm["custom_partitioning"] == 1 and vm["err"] == 0.0, vm
    assert vm["collectives"] == [], vm
    assert vm["partitions"][-1]["ops"][0] == "P('data', None, 'model', None)"


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_one_kv_head_shards_over_the_batch(partitioner):
    """GQA with a single KV head (MQA), batch-sharded, forward and gradients: Shardy
    refused the rule's compound query-head factor (k g) with k of size 1 ("dim mapping
    can't have a factor of size 1 if there are multiple factors") until 2026-12-08; the
    query heads are now a factor of their own (replicated), and the batch still splits."""
    res = run_devices("""
        res = {}
        m = mesh((8,), ("data",))
        q, k, v, s = inputs(8, 33, 6, 1)
        f = lambda q, k, v, s: jax_fa4.attention(q, k, v, is_causal=True, sinks=s,
                                                 return_lse=True)
        res["fwd"] = check(f, (q, k, v, s), [put(x, m, P("data")) for x in (q, k, v)]
                           + [put(s, m, P())])
        def loss(q, k, v):
            return jnp.sum(jax_fa4.attention(q, k, v, is_causal=True).astype(jnp.float32) ** 2)
        vg = jax.value_and_grad(loss, argnums=(0, 1, 2))
        res["grad"] = check(vg, (q, k, v), [put(x, m, P("data")) for x in (q, k, v)])
        res["grad"]["scale"] = max(float(jnp.max(jnp.abs(g.astype(jnp.float32))))
                                   for g in jax.tree.leaves(jax.jit(vg)(q, k, v)))
        print(json.dumps(res))
    """, partitioner=partitioner)
    fwd, grad = res["fwd"], res["grad"]
    assert fwd["custom_partitioning"] == 1 and fwd["err"] == 0.0, fwd
    assert fwd["collectives"] == [] and fwd["entry_shapes"][0] == "bf16[1,33,6,64]", fwd
    # (the loss itself is summed over the batch shards: an all-reduce of one scalar)
    assert grad["custom_partitioning"] == 2 and "all-gather" not in grad["collectives"], grad
    assert grad["err"] <= 2 * 2.0 ** -8 * grad["scale"], grad  # bf16 rounding, summed shards


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_fuzz_calls_shard_like_unsharded(partitioner):
    """The GPU fuzz's smallest calls (tests/gpu_cases_fuzz.py, the run's seed; dense,
    varlen and paged with windows, softcap, sinks, GQA 1-16) on a 2-device mesh, their
    batch and (where the KV heads split) their heads sharded: the same outputs and LSE
    as unsharded.  Such a fuzz found the one-KV-head Shardy failure above."""
    res = run_devices("""
        import functools, sys
        sys.path.insert(0, TESTS_DIR)
        import gpu_cases_fuzz as g, test_gpu_fuzz as fz
        from test_fuzz_fallback import _work
        m = mesh((2,), ("x",))
        runs, bad = 0, []
        for c in [c for c in g.CALLS if _work(c) <= 5e4]:
            a, s, _ = fz._inputs(c)
            fn = c.get("fn", "attention")
            f = jax.jit(functools.partial(fz._api(c), return_lse=True, sinks=s, **fz._kwargs(c)))
            qn, *kn = fz.OPERANDS[fn]
            kn = tuple(kn)
            batch = {"attention": (qn,) + kn + ("query_seq_lengths", "key_value_seq_lengths"),
                     "paged_attention": (qn, "page_table", "seqused_k")}.get(fn, ())
            modes = [mode for mode, ok in (
                ("heads", a[kn[0]].shape[-2] % 2 == 0),
                ("batch", bool(batch) and a[qn].ndim == 4 and a[qn].shape[0] % 2 == 0)) if ok]
            for mode in modes:
                ref = f(**a)
                b = {}
                for name, x in a.items():
                    spec = [None] * np.ndim(x)
                    if mode == "heads" and name in (qn,) + kn:
                        spec[-2] = "x"
                    if mode == "batch" and name in batch:
                        spec[0] = "x"
                    b[name] = put(jnp.asarray(x), m, P(*spec))
                got = f(**b)
                runs += 1
                for r, o in zip(ref, got):
                    r, o = np.asarray(r, np.float32), np.asarray(o, np.float32)
                    fin = np.isfinite(r)
                    if not (np.array_equal(fin, np.isfinite(o))
                            and np.allclose(r[fin], o[fin], rtol=1e-2, atol=1e-2)):
                        bad.append((c["_id"], mode))
        print(json.dumps(dict(runs=runs, bad=bad)))
    """.replace("TESTS_DIR", repr(os.path.dirname(os.path.abspath(__file__)))),
        partitioner=partitioner)
    assert res["runs"] >= 10, res
    assert res["bad"] == [], res


def test_shard_map_runs_attention_per_shard():
    """Inside shard_map the primitive sees per-shard shapes and needs no rule."""
    res = run_devices("""
        m = mesh((2, 4))
        q, k, v, s = inputs(4, 64, 8, 4)
        spec = P("data", None, "model", None)
        f = lambda q, k, v, s: jax_fa4.attention(q, k, v, is_causal=True, sinks=s)
        sm = jax.jit(jax.shard_map(f, mesh=m, in_specs=(spec,) * 3 + (P("model"),),
                                   out_specs=spec))
        args = [put(x, m, spec) for x in (q, k, v)] + [put(s, m, P("model"))]
        text = sm.lower(*args).as_text()
        out = sm(*args)
        print(json.dumps(dict(custom_partitioning=text.count("@CustomSPMDPartitioning"),
                              err=max_err(out, jax.jit(f)(q, k, v, s)),
                              partitions=len(PARTITIONS))))
    """)
    assert res == dict(custom_partitioning=0, err=0.0, partitions=0)


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_paged_and_varlen_shard_per_shard_on_cpu(partitioner):
    """paged_attention: q, page table and lengths split over batch (the pool is shared),
    q and pool split over heads; varlen (packed rows): heads only.  No collectives."""
    res = run_devices("""
        res = {}
        rng = np.random.default_rng(1)
        B, Tq, N, K, H, pages, ps = 8, 2, 16, 8, 64, 40, 16
        q = jnp.asarray(rng.standard_normal((B, Tq, N, H)), jnp.bfloat16)
        kc = jnp.asarray(rng.standard_normal((pages, ps, K, H)), jnp.bfloat16)
        vc = jnp.asarray(rng.standard_normal((pages, ps, K, H)), jnp.bfloat16)
        table = jnp.asarray(rng.permutation(pages)[:B * 5].reshape(B, 5), jnp.int32)
        used = jnp.asarray(rng.integers(1, 5 * ps, B), jnp.int32)
        f = lambda q, kc, vc, t, u: jax_fa4.paged_attention(q, kc, vc, t, u, is_causal=True)
        args = (q, kc, vc, table, used)
        m = mesh((8,), ("data",))
        res["paged_batch"] = check(f, args, [put(q, m, P("data")), put(kc, m, P()),
                                             put(vc, m, P()), put(table, m, P("data")),
                                             put(used, m, P("data"))])
        m = mesh((8,), ("model",))
        heads = [put(q, m, P(None, None, "model")), put(kc, m, P(None, None, "model")),
                 put(vc, m, P(None, None, "model")), put(table, m, P()), put(used, m, P())]
        res["paged_heads"] = check(f, args, heads)
        sm = jax.shard_map(f, mesh=m, in_specs=(P(None, None, "model"),) * 3 + (P(), P()),
                           out_specs=P(None, None, "model"))
        res["paged_shard_map"] = max_err(jax.jit(sm)(*heads), jax.jit(f)(*args))
        # varlen, packed rows: heads only
        cu = jnp.asarray([0, 5, 40, 64], jnp.int32)
        qp = jnp.asarray(rng.standard_normal((64, N, H)), jnp.bfloat16)
        kp = jnp.asarray(rng.standard_normal((64, K, H)), jnp.bfloat16)
        g = lambda q, k, v, c: jax_fa4.varlen_attention(q, k, v, c, c, max_seqlen_q=35,
                                                        max_seqlen_k=35, is_causal=True)
        res["varlen_heads"] = check(g, (qp, kp, kp, cu), [put(qp, m, P(None, "model")),
                                                          put(kp, m, P(None, "model")),
                                                          put(kp, m, P(None, "model")),
                                                          put(cu, m, P())])
        print(json.dumps(res))
    """, partitioner=partitioner)
    for name, q_shard in [("paged_batch", "bf16[1,2,16,64]"), ("paged_heads", "bf16[8,2,2,64]"),
                          ("varlen_heads", "bf16[64,2,64]")]:
        r = res[name]
        assert r["custom_partitioning"] == 1, (name, r)
        assert r["sdy_rule"] == (partitioner == "shardy"), (name, r)
        assert r["collectives"] == [], (name, r)
        assert r["entry_shapes"][0] == q_shard, (name, r)
        assert r["err"] == 0.0, (name, r)
    assert res["paged_batch"]["partitions"][-1]["ops"] == [
        "P('data', None, None, None)", "P(None, None, None, None)",
        "P(None, None, None, None)", "P('data',)", "P('data', None)"]
    assert res["paged_heads"]["partitions"][-1]["ops"][:3] == [
        "P(None, None, 'model', None)"] * 3
    assert res["paged_shard_map"] == 0.0


def test_export_of_a_sharded_call_has_no_partitioning_callback():
    """The rule is a Python callback of the lowering process: exports keep the plain
    call (XLA replicates it where it runs), so the artifact stays self-contained."""
    res = run_devices("""
        m = mesh((8,), ("data",))
        q, k, v, _ = inputs(8, 64, 4, 2)
        f = jax.jit(lambda q, k, v: jax_fa4.attention(q, k, v, is_causal=True))
        args = [put(x, m, P("data")) for x in (q, k, v)]
        exp = jax.export.export(f, platforms=("cpu",))(*args)
        out = exp.call(*args)
        print(json.dumps(dict(cp=exp.mlir_module().count("CustomSPMDPartitioning"),
                              devices=exp.nr_devices, err=max_err(out, f(q, k, v)))))
    """)
    assert res == dict(cp=0, devices=8, err=0.0)


# ----------------------------------------------------------------------------
# Lowered for CUDA: partitioned by XLA on this host, one custom call per shard
# ----------------------------------------------------------------------------

compile_test = [pytest.mark.compile,
                pytest.mark.skipif(not has_compiler(),
                                   reason="needs jax_fa4[compile] (flash_attn and cutlass)")]


@pytest.fixture(scope="module")
def cuda_env(tmp_path_factory):
    """Its own kernel cache, compiled into on first use (like tests/test_lowering.py):
    an externally set JAX_FA4_CACHE_DIR / JAX_FA4_COMPILE=never does not apply."""
    return {"JAX_FA4_CACHE_DIR": str(tmp_path_factory.mktemp("sharding_kernels")),
            "JAX_FA4_COMPILE": "auto"}


CUDA_CODE = """
    dump = os.environ["DUMP_DIR"]
    res = {}
    def attn(q, k, v):
        return jax_fa4.attention(q, k, v, local_window_size=(32, 0))

    def lower_for_cuda(name, shapes, specs, m):
        args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(m, p))
                for s, p in zip(shapes, specs)]
        f = lambda q, k, v: attn(q, k, v)
        f.__name__ = name  # names the dumped module
        lowered = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
        text = lowered.as_text()
        try:
            lowered.compile()  # runs XLA's SPMD partitioner, then fails: no CUDA here
            error = None
        except Exception as e:
            error = str(e)
        after = [p for p in os.listdir(dump)
                 if p.startswith("module_") and f"jit_{name}." in p
                 and "after_spmd-partitioning" in p]
        part = open(os.path.join(dump, after[0])).read() if len(after) == 1 else ""
        calls = [l for l in part.splitlines() if 'custom_call_target="jax_fa4_cute_call"' in l]
        types = lambda s: re.findall(r"[a-z0-9]+\\[[0-9,]*\\]", s)
        res[name] = dict(
            lowered_cp=text.count("@CustomSPMDPartitioning"),
            lowered_fa4=text.count("@jax_fa4_cute_call"),
            sdy_rule="sdy.sharding_rule" in text,
            error=error, dumps=after,
            calls=[dict(results=types(l.split("custom-call(")[0]),
                        operands=types(l.split("operand_layout_constraints=")[1]
                                       .split("api_version")[0])) for l in calls],
            collectives=collectives(part), partitions=list(PARTITIONS))
        del PARTITIONS[:]

    qkv = [(8, 128, 4, 64), (8, 128, 2, 64), (8, 128, 2, 64)]
    lower_for_cuda("batch", qkv, [P("data")] * 3, mesh((8,), ("data",)))
    qkv = [(2, 128, 16, 64), (2, 128, 8, 64), (2, 128, 8, 64)]
    lower_for_cuda("heads", qkv, [P(None, None, "model")] * 3, mesh((8,), ("model",)))

    # shard_map: the body is lowered with per-shard shapes, the call appears directly.
    m = mesh((2, 4))
    spec = P("data", None, "model", None)
    sm = jax.shard_map(attn, mesh=m, in_specs=(spec,) * 3, out_specs=spec)
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(m, spec))
            for s in [(4, 128, 8, 64), (4, 128, 4, 64), (4, 128, 4, 64)]]
    text = jax.jit(sm).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    res["shard_map"] = [l.split("->")[0].split(":")[-1].strip() for l in text.splitlines()
                        if "stablehlo.custom_call @jax_fa4_cute_call" in l]
    print(json.dumps(res))
"""


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_cuda_lowering_partitions_into_per_shard_custom_calls(partitioner, cuda_env, tmp_path):
    dump = tmp_path / "dump"
    env = dict(cuda_env, DUMP_DIR=str(dump))
    env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}"
                        " --xla_dump_hlo_pass_re=spmd-partitioning").strip()
    res = run_devices(CUDA_CODE, partitioner=partitioner, env_extra=env)

    for name, results, operands in [
            ("batch", ["bf16[1,128,4,64]", "f32[1,4,128]"],
             ["bf16[1,128,4,64]", "bf16[1,128,2,64]", "bf16[1,128,2,64]"]),
            ("heads", ["bf16[2,128,2,64]", "f32[2,2,128]"],
             ["bf16[2,128,2,64]", "bf16[2,128,1,64]", "bf16[2,128,1,64]"])]:
        r = res[name]
        # Lowered: the partitioning call (with Shardy's rule), no custom call yet.
        assert r["lowered_cp"] == 1 and r["lowered_fa4"] == 0, (name, r)
        assert r["sdy_rule"] == (partitioner == "shardy"), (name, r)
        # Partitioned by XLA: one FA4 call with per-shard shapes, nothing gathered.
        assert r["partitions"], (name, r)
        assert len(r["dumps"]) == 1, (name, r)
        assert len(r["calls"]) == 1, (name, r)
        assert r["calls"][0] == dict(results=results, operands=operands), (name, r)
        assert r["collectives"] == [], (name, r)
        # ... and then compilation stops where it must on a CPU host.
        assert "No FFI handler registered for jax_fa4_cute_call" in (r["error"] or ""), r
    assert res["shard_map"] == ["(tensor<2x128x2x64xbf16>, tensor<2x128x1x64xbf16>, "
                                "tensor<2x128x1x64xbf16>)"]


for _m in compile_test:
    test_cuda_lowering_partitions_into_per_shard_custom_calls = _m(
        test_cuda_lowering_partitions_into_per_shard_custom_calls)


BWD_CUDA_CODE = """
    dump = os.environ["DUMP_DIR"]
    m = mesh((8,), ("data",))
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(m, P("data")))
            for s in [(8, 128, 4, 64), (8, 128, 2, 64), (8, 128, 2, 64)]]
    def grads(q, k, v):
        loss = lambda q, k, v: jnp.sum(jax_fa4.attention(q, k, v, is_causal=True)
                                       .astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    lowered = jax.jit(grads).trace(*args).lower(lowering_platforms=("cuda",))
    try:
        lowered.compile()  # runs XLA's SPMD partitioner, then fails: no CUDA here
    except Exception:
        pass
    after = [p for p in os.listdir(dump) if p.startswith("module_") and "jit_grads." in p
             and "after_spmd-partitioning" in p]
    part = open(os.path.join(dump, after[0])).read()
    calls = [l for l in part.splitlines() if 'custom_call_target="jax_fa4_cute_call"' in l]
    types = lambda s: re.findall(r"[a-z0-9]+\\[[0-9,]*\\]", s)
    print(json.dumps(dict(results=[types(l.split("custom-call(")[0]) for l in calls],
                          collectives=collectives(part),
                          cp=lowered.as_text().count("@CustomSPMDPartitioning"))))
"""


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_cuda_lowering_partitions_the_backward_call(partitioner, cuda_env, tmp_path):
    """jax.grad under a batch-sharded jit: the forward and FA4's backward custom calls
    both run per shard (per-shard gradients and workspaces), nothing gathered."""
    dump = tmp_path / "dump"
    env = dict(cuda_env, DUMP_DIR=str(dump))
    env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}"
                        " --xla_dump_hlo_pass_re=spmd-partitioning").strip()
    res = run_devices(BWD_CUDA_CODE, partitioner=partitioner, env_extra=env)
    assert res["cp"] == 2, res
    fwd, bwd = sorted(res["results"], key=len)
    assert fwd == ["bf16[1,128,4,64]", "f32[1,4,128]"], res
    # dq dk dv, then dq_accum, dpsum, lse_log2, dk_accum, dv_accum (tile 128x128).
    assert bwd == ["bf16[1,128,4,64]", "bf16[1,128,2,64]", "bf16[1,128,2,64]",
                   "f32[1,4,8192]", "f32[1,4,128]", "f32[1,4,128]", "f32[1,2,8192]",
                   "f32[1,2,8192]"], res
    assert res["collectives"] == [], res


for _m in compile_test:
    test_cuda_lowering_partitions_the_backward_call = _m(
        test_cuda_lowering_partitions_the_backward_call)

