"""Attention backward throughput on one GPU: jax_fa4 (FA4's SM90 backward) vs cuDNN.

  python benchmarks/bench_backward.py --out results.json [--quick]

Each backend runs under jax.jit: the forward alone (`attn(q, k, v)`), and forward plus
backward (`jax.vjp(attn, q, k, v)[1](do)`, dq/dk/dv for a given dO).  Backward time =
(forward + backward) - forward, both timed with block_until_ready over `--reps`
back-to-back calls after warm-up, in the same run.  "jax_fa4" is jax_fa4.attention
(implementation='fa4'); "jax_fa4_det" the same with deterministic=True (FA4's
deterministic backward); "cudnn" is jax.nn.dot_product_attention(implementation='cudnn').
Backward TFLOP/s = 2.5 * 4*b*h*s^2*d / time (halved for causal); forward 4*b*h*s^2*d.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_forward

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jax_fa4  # noqa: E402
from bench_forward import flops, time_jax  # noqa: E402  (same timing as the forward)

CONFIGS = [dict(b=4, s=8192, h=16, hk=16, d=128), dict(b=4, s=8192, h=32, hk=32, d=64),
           dict(b=4, s=8192, h=8, hk=8, d=256), dict(b=16, s=2048, h=16, hk=16, d=128),
           dict(b=4, s=8192, h=32, hk=8, d=128)]


# What `python -m jax_fa4.precompile --calls benchmarks/bench_backward.py --backward` builds.
CALLS = [dict(query=((c["b"], c["s"], c["h"], c["d"]), "bfloat16"),
              key=((c["b"], c["s"], c["hk"], c["d"]), "bfloat16"),
              value=((c["b"], c["s"], c["hk"], c["d"]), "bfloat16"), is_causal=causal)
         for c in CONFIGS for causal in (False, True)]
CALLS += [dict(c, deterministic=True) for c in CALLS]


def _attn(name, causal):
    if name in ("jax_fa4", "jax_fa4_det"):
        det = name == "jax_fa4_det"
        return lambda q, k, v: jax_fa4.attention(q, k, v, is_causal=causal, implementation="fa4",
                                                 deterministic=det)
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                        implementation="cudnn")


def bench_one(cfg, reps, backends):
    b, s, h, hk, d, causal = (cfg[k] for k in ("b", "s", "h", "hk", "d", "causal"))
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (b, s, h, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, hk, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, hk, d), jnp.bfloat16)
    do = jax.random.normal(ks[3], (b, s, h, d), jnp.bfloat16)
    fl = flops(b, h, s, s, d, causal)
    res = dict(cfg, dtype="bfloat16", fwd_tflops={}, bwd_tflops={}, bwd_ms={})
    for name in backends:
        try:
            attn = _attn(name, causal)
            fwd = jax.jit(attn)
            both = jax.jit(lambda q, k, v, do, attn=attn: jax.vjp(attn, q, k, v)[1](do))
            t_f = time_jax(fwd, (q, k, v), reps)
            t_fb = time_jax(both, (q, k, v, do), reps)
            t_b = t_fb - t_f
            res["fwd_tflops"][name] = fl / t_f / 1e12
            res["bwd_tflops"][name] = 2.5 * fl / t_b / 1e12
            res["bwd_ms"][name] = t_b * 1e3
        except Exception as e:  # record why a backend could not run this shape
            res["bwd_tflops"][name] = None
            res.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:300]}"
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="backward.json")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="only b4 s8192 h16 d128")
    p.add_argument("--backends", default="jax_fa4,jax_fa4_det,cudnn")
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}", flush=True)
    configs = CONFIGS[:1] if args.quick else CONFIGS
    results = []
    for cfg in configs:
        for causal in (False, True):
            r = bench_one(dict(cfg, causal=causal), args.reps, args.backends.split(","))
            results.append(r)
            row = "  ".join(f"{n}: " + ("fail" if r["bwd_tflops"].get(n) is None else
                                        f"{r['bwd_tflops'][n]:6.1f} TF/s bwd "
                                        f"({r['bwd_ms'][n]:.2f} ms), "
                                        f"{r['fwd_tflops'][n]:6.1f} fwd")
                            for n in args.backends.split(","))
            print(f"b{cfg['b']} s{cfg['s']} h{cfg['h']}/{cfg['hk']} d{cfg['d']} "
                  f"{'causal' if causal else 'full  '}  {row}", flush=True)
            for n, e in r.get("errors", {}).items():
                print(f"    {n}: {e}", flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=dev.device_kind, jax=jax.__version__, results=results), f,
                  indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

