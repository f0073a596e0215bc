"""Attention backward throughput on one GPU: jax_fa4 (FA4's SM90 backward) vs cuDNN.

  python benchmarks/bench_backward.py --out results.json [--quick]
  python benchmarks/bench_backward.py --set issue20 --out r.json --png r.png  # issue 20's rows

Each backend runs under jax.jit: the forward alone (`attn(q, k, v)`), and forward plus
backward (`jax.vjp(attn, q, k, v)[1](do)`, dq/dk/dv for a given dO).  Backward time =
(forward + backward) - forward, both timed with block_until_ready over `--reps`
back-to-back calls after warm-up, in the same run.  "jax_fa4" is jax_fa4.attention
(implementation='fa4'); "jax_fa4_det" the same with deterministic=True (FA4's
deterministic backward); "cudnn" and "xla" are jax.nn.dot_product_attention with that
implementation (XLA only where its score matrices fit, --xla-cap-gb).
Backward TFLOP/s = 2.5 * 4*b*h*s^2*d / time (halved for causal); forward 4*b*h*s^2*d.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from unittest import mock

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_forward

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jax_fa4  # noqa: E402
from jax_fa4.kernels import backward_config  # noqa: E402
from bench_forward import bar_chart, flops, time_jax, write_results  # noqa: E402  (same timing as the forward)

CONFIGS = [dict(b=4, s=8192, h=16, hk=16, d=128), dict(b=4, s=8192, h=32, hk=32, d=64),
           dict(b=4, s=8192, h=8, hk=8, d=256), dict(b=16, s=2048, h=16, hk=16, d=128),
           dict(b=4, s=8192, h=32, hk=8, d=128)]
# Issue 20's backward rows (its fwd+bwd table) and the shapes of the published SM90
# backward figures (d128 non-causal at ~7.8k, d256 at 16k); each with its mask.
ISSUE20 = [dict(b=4, s=8192, h=16, hk=16, d=128, causal=True),
           dict(b=2, s=8192, h=16, hk=16, d=64, causal=True),
           dict(b=4, s=4096, h=8, hk=8, d=256, causal=True),
           dict(b=2, s=7808, h=16, hk=16, d=128, causal=False, label="published: d128 s7.8k"),
           dict(b=1, s=16384, h=16, hk=16, d=256, causal=False, label="published: d256 s16k"),
           dict(b=1, s=16384, h=16, hk=16, d=256, causal=True, label="published: d256 causal s16k"),
           # Gemma-4 global: the kernel forward, then the pure-JAX chunked backward (no
           # SM90 kernel backward at head dim 512: docs/DESIGN.md says why)
           dict(b=1, s=8192, h=32, hk=4, d=512, causal=True, label="d512 causal b1 s8192 32/4")]


def rows(which: str) -> list[dict]:
    if which == "issue20":
        return ISSUE20
    cfgs = CONFIGS[:1] if which == "quick" else CONFIGS
    return [dict(c, causal=causal) for c in cfgs for causal in (False, True)]


# What `python -m jax_fa4.precompile --calls benchmarks/bench_backward.py --backward` builds.
CALLS = [dict(query=((c["b"], c["s"], c["h"], c["d"]), "bfloat16"),
              key=((c["b"], c["s"], c["hk"], c["d"]), "bfloat16"),
              value=((c["b"], c["s"], c["hk"], c["d"]), "bfloat16"), is_causal=c["causal"])
         for c in rows("default") + ISSUE20]
CALLS += [dict(c, deterministic=True) for c in CALLS]


# Backward tiles tried by --tile-sweep at head dim 256, where FA4's 64 x 48 tile (its
# 64 KiB float32 dQ staging buffer leaves no room for more; docs/PERF.md) trails
# cuDNN: 64 keys with one Q stage, 32 keys with two, and 64 keys with dQ = dS K
# computed transposed.  Each fits 227 KiB of shared memory and compiles without
# spills (ptxas -v); None: FA4's own tile.  Fields as BackwardTile's.
SWEEP_TILES = {
    "64x48 (FA4)": None,
    "64x64 Q1": (64, 64, 1, 1, 1, False, True, False, 1, 1, 1),
    "64x32 Q2": (64, 32, 2, 1, 1, False, True, False, 1, 1, 1),
    "64x64 Q1 dQ swapAB": (64, 64, 1, 1, 1, False, True, True, 1, 1, 1),
}


@contextlib.contextmanager
def backward_tile(fields):
    """Within: new backward variants take BackwardTile(*fields) (None: FA4's tile)."""
    if fields is None:
        yield
        return
    tile = backward_config.BackwardTile(*fields)
    with mock.patch.object(backward_config, "sm90_backward_tile", lambda *a, **k: tile):
        yield


def sweep_rows():
    return [c for c in ISSUE20 if c["d"] == 256]


def sweep_variants():
    """The backward variants --tile-sweep times (for precompiling: --sweep-specs)."""
    from jax_fa4.dispatch import DenseCall, plan_dense

    out = []
    for c in sweep_rows():
        fv = plan_dense(DenseCall(dtype="bfloat16", batch=c["b"], seq_q=c["s"], seq_k=c["s"],
                                  heads_q=c["h"], heads_k=c["hk"], head_dim=c["d"],
                                  head_dim_v=c["d"], window=(None, 0) if c["causal"]
                                  else (None, None))).variant
        for fields in SWEEP_TILES.values():
            with backward_tile(fields):
                out.append(backward_config.BackwardVariant.for_forward(fv))
    return out


def _grads(cfg):
    """dq, dk, dv of jax_fa4 on bench_one's inputs (float32), planned now."""
    q, k, v, do = _inputs(cfg)
    attn = _attn("jax_fa4", cfg["causal"])
    g = jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))(q, k, v, do)
    return [x.astype(jnp.float32) for x in g]


def tile_sweep(reps):
    """Backward TFLOP/s of each SWEEP_TILES tile on the head-dim-256 rows (jax_fa4's
    own path, the tile patched where the backward variant is planned), and each
    tile's gradients against FA4's tile's (worst relative error of dq, dk, dv): a
    timing never stands without a check of what it computed."""
    out = []
    for cfg in sweep_rows():
        first = None
        for label, fields in SWEEP_TILES.items():
            with backward_tile(fields):
                r = bench_one(cfg, reps, ("jax_fa4",))
                try:
                    g = _grads(cfg)
                    first = first or g
                    r["rel_err_vs_fa4_tile"] = max(
                        float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in zip(g, first))
                except Exception as e:  # noqa: BLE001 (a tile that fails to launch)
                    r.setdefault("errors", {})["grads"] = f"{type(e).__name__}: {str(e)[:200]}"
            r["tile"] = label
            out.append(r)
            bw = r["bwd_tflops"].get("jax_fa4")
            print(f"sweep {_label(cfg)} {label}: "
                  + (f"{bw:6.1f} TF/s bwd, rel. error vs FA4's tile "
                     f"{r.get('rel_err_vs_fa4_tile')}" if bw else f"fail {r.get('errors')}"),
                  flush=True)
    return out


def _attn(name, causal):
    if name in ("jax_fa4", "jax_fa4_det"):
        det = name == "jax_fa4_det"
        return lambda q, k, v: jax_fa4.attention(q, k, v, is_causal=causal, implementation="fa4",
                                                 deterministic=det)
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                        implementation=name)


def _inputs(cfg):
    """q, k, v and dO of a row (bf16, fixed seed)."""
    b, s, h, hk, d = (cfg[k] for k in ("b", "s", "h", "hk", "d"))
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, do = (jax.random.normal(ks[i], (b, s, h, d), jnp.bfloat16) for i in (0, 3))
    k, v = (jax.random.normal(ks[i], (b, s, hk, d), jnp.bfloat16) for i in (1, 2))
    return q, k, v, do


def bench_one(cfg, reps, backends, xla_cap_bytes=30e9):
    b, s, h, hk, d, causal = (cfg[k] for k in ("b", "s", "h", "hk", "d", "causal"))
    q, k, v, do = _inputs(cfg)
    fl = flops(b, h, s, s, d, causal)
    res = dict(cfg, dtype="bfloat16", fwd_tflops={}, bwd_tflops={}, bwd_ms={})
    for name in backends:
        try:
            # forward scores, probabilities and their gradient: three (b, h, s, s) float32
            if name == "xla" and 3 * b * h * s * s * 4 > xla_cap_bytes:
                raise MemoryError(f"XLA would materialize > {xla_cap_bytes / 1e9:.0f} GB of "
                                  "score matrices")
            attn = _attn(name, causal)
            fwd = jax.jit(attn)
            both = jax.jit(lambda q, k, v, do, attn=attn: jax.vjp(attn, q, k, v)[1](do))
            t_f = time_jax(fwd, (q, k, v), reps)
            t_fb = time_jax(both, (q, k, v, do), reps)
            t_b = t_fb - t_f
            res["fwd_tflops"][name] = fl / t_f / 1e12
            res["bwd_tflops"][name] = 2.5 * fl / t_b / 1e12
            res["bwd_ms"][name] = t_b * 1e3
            # issue 20's fwd+bwd figure: forward + backward at 3.5x the forward FLOPs
            res.setdefault("fwdbwd_tflops", {})[name] = 3.5 * fl / t_fb / 1e12
        except Exception as e:  # record why a backend could not run this shape
            res["bwd_tflops"][name] = None
            res.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:300]}"
    return res


def plot_rows(results, device, path):
    """Bars of backward TFLOP/s per shape, each backend beside the others."""
    bar_chart(results, ("jax_fa4", "jax_fa4_det", "cudnn", "xla"),
              lambda r, n: r["bwd_tflops"].get(n), _label,
              "backward TFLOP/s (2.5 x forward FLOPs)", f"attention backward, bf16, {device}",
              path)


def _label(r):
    return r.get("label") or (f"d{r['d']}{' causal' if r['causal'] else ''} b{r['b']} "
                              f"s{r['s']} h{r['h']}/{r['hk']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="backward.json")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="only b4 s8192 h16 d128")
    p.add_argument("--set", choices=("default", "issue20"), default="default")
    p.add_argument("--backends", default="jax_fa4,jax_fa4_det,cudnn,xla")
    p.add_argument("--xla-cap-gb", type=float, default=30.0)
    p.add_argument("--png", help="bars of backward TFLOP/s per shape")
    p.add_argument("--tile-sweep", action="store_true",
                   help="only time SWEEP_TILES on the head-dim-256 rows")
    p.add_argument("--sweep-specs", action="store_true",
                   help="print the tile sweep's variant specs (python -m jax_fa4.precompile "
                        "--variant)")
    args = p.parse_args(argv)
    if args.sweep_specs:
        from jax_fa4.kernels.compile import variant_spec
        for spec in dict.fromkeys(variant_spec(v) for v in sweep_variants()):
            print(spec)
        return 0
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}", flush=True)
    if args.tile_sweep:
        write_results(args.out, dev.device_kind, sweep=tile_sweep(args.reps))
        return 0
    backends = args.backends.split(",")
    cfgs = rows("quick" if args.quick else args.set)
    results = []
    for i, cfg in enumerate(cfgs, 1):
        r = bench_one(cfg, args.reps, backends, args.xla_cap_gb * 1e9)
        results.append(r)
        row = "  ".join(f"{n}: " + ("fail" if r["bwd_tflops"].get(n) is None else
                                    f"{r['bwd_tflops'][n]:6.1f} TF/s bwd "
                                    f"({r['bwd_ms'][n]:.2f} ms), "
                                    f"{r['fwd_tflops'][n]:6.1f} fwd, "
                                    f"{r['fwdbwd_tflops'][n]:6.1f} fwd+bwd")
                        for n in backends)
        print(f"[{i}/{len(cfgs)}] {_label(r)}  {row}", flush=True)
        for n, e in r.get("errors", {}).items():
            print(f"    {n}: {e}", flush=True)
    write_results(args.out, dev.device_kind, results=results)
    if args.png:
        plot_rows(results, dev.device_kind, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
