"""Head dim 512 forward throughput (Gemma-4 global attention shapes): jax_fa4 vs XLA
(cuDNN has no head dim 512), plus direct launches of the head-dim-512 designs
(split-K exchange, split-PV; single-QK with BENCH_HDIM512_DESIGNS) whatever the default is.

  python benchmarks/bench_hdim512.py --out hdim512.json

TFLOP/s = 4*b*h*sq*sk*d / time, halved for causal (bench_forward.py's timing).  XLA's
S x S scores for b2 s8192 h32 take ~26 GB in float32, so its memory cap is raised to
70 GB here (the H100 has 80 GB).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_forward import DirectLauncher, bench_one, flops, jax  # noqa: E402

import jax.numpy as jnp  # noqa: E402

from jax_fa4.dispatch import DenseCall, KernelPlan, plan_dense  # noqa: E402
from jax_fa4.kernels.config import hdim512_tile  # noqa: E402

# Designs launched directly besides jax_fa4's default (split_k); BENCH_HDIM512_DESIGNS
# overrides (comma list).
DESIGNS = tuple(os.environ.get("BENCH_HDIM512_DESIGNS", "split_k,split_pv").split(","))

SHAPES = [dict(b=2, s=8192, h=32, hk=4), dict(b=4, s=4096, h=8, hk=8),
          dict(b=1, s=32768, h=16, hk=2)]


def configs():
    return [dict(shape, d=512, causal=causal, dtype="bfloat16")
            for shape in SHAPES for causal in (True, False)]


def design_plans(cfg):
    """{design: KernelPlan} for cfg, one per head-dim-512 design."""
    c = DenseCall(dtype="bfloat16", batch=cfg["b"], seq_q=cfg["s"], seq_k=cfg["s"],
                  heads_q=cfg["h"], heads_k=cfg["hk"], head_dim=512, head_dim_v=512,
                  window=(None, 0) if cfg["causal"] else (None, None))
    p = plan_dense(c)
    return {d: KernelPlan(dataclasses.replace(p.variant, tile=hdim512_tile(d)),
                          p.window_left, p.window_right) for d in DESIGNS}


def time_designs(cfg, direct, reps):
    """{design: TFLOP/s} of direct launches, and {design: rel. error of its output vs the
    first design's} (each design writes its own NaN-filled output buffer), so a design's
    timing never stands without a check of what it computed."""
    b, s, h, hk = (cfg[k] for k in ("b", "s", "h", "hk"))
    key = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(key[0], (b, s, h, 512), jnp.bfloat16)
    k = jax.random.normal(key[1], (b, s, hk, 512), jnp.bfloat16)
    v = jax.random.normal(key[2], (b, s, hk, 512), jnp.bfloat16)
    jax.block_until_ready((q, k, v))
    out, err, first = {}, {}, None
    for d, plan in design_plans(cfg).items():
        try:
            t, o = direct.time_attention(plan, 1 / math.sqrt(512), q, k, v, reps)
            out[d] = flops(b, h, s, s, 512, cfg["causal"]) / t / 1e12
        except Exception as e:  # noqa: BLE001 (a missing kernel object)
            print(f"  {d}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            out[d] = None
            continue
        o32 = o.astype(jnp.float32)
        if first is None:
            first = o32
        err[d] = float(jnp.linalg.norm(o32 - first) / jnp.linalg.norm(first))
        if not err[d] <= 1e-2:
            print(f"  {d}: output differs from {next(iter(out))}'s: rel. error {err[d]}",
                  flush=True)
    return out, err


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/hdim512.json")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--backends", default="jax_fa4,direct,xla")
    p.add_argument("--precompile", action="store_true",
                   help="only build the kernel objects the direct launches need (no GPU)")
    args = p.parse_args()
    if args.precompile:
        from jax_fa4.kernels import get_object

        for cfg in configs():
            for plan in design_plans(cfg).values():
                get_object(plan.variant)
        return
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}", flush=True)
    direct, results = DirectLauncher(), []
    for cfg in configs():
        backends = args.backends.split(",")
        if cfg["s"] > 8192:  # XLA's scores would not fit
            backends = [b for b in backends if b != "xla"]
        r = bench_one(cfg, direct, args.reps, backends, xla_cap_bytes=70e9)
        r["designs"], r["design_rel_err"] = time_designs(cfg, direct, args.reps)
        results.append(r)
        # Written after every row: a run cut short keeps what it measured.
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(device=dev.device_kind, jax=jax.__version__,
                           date=time.strftime("%Y-%m-%d"), results=results), f, indent=1)
        t = dict(r["tflops"], **{f"direct_{d}": x for d, x in r["designs"].items()})
        ratio = f"  fa4/xla={t['jax_fa4'] / t['xla']:.2f}x" if t.get("xla") and t.get(
            "jax_fa4") else ""
        cells = "  ".join(f"{n}={v:6.1f}" if v else f"{n}=   n/a" for n, v in t.items())
        print(f"b{r['b']} s{r['s']} h{r['h']}/{r['hk']} d512 "
              f"{'causal' if r['causal'] else 'full  '} {cells}{ratio}"
              + (f"  errors={r['errors']}" if r.get("errors") else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
