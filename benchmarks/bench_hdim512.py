"""Head dim 512 forward throughput (Gemma-4 global attention shapes): jax_fa4's
split-PV kernel vs XLA (cuDNN has no head dim 512), plus a direct launch.

  python benchmarks/bench_hdim512.py --out hdim512.json

TFLOP/s = 4*b*h*sq*sk*d / time, halved for causal (bench_forward.py's timing).  XLA's
S x S scores for b2 s8192 h32 take ~26 GB in float32, so its memory cap is raised to
70 GB here (the H100 has 80 GB).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_forward import DirectLauncher, bench_one, jax  # noqa: E402

SHAPES = [dict(b=2, s=8192, h=32, hk=4), dict(b=4, s=4096, h=8, hk=8),
          dict(b=1, s=32768, h=16, hk=2)]


def configs():
    return [dict(shape, d=512, causal=causal, dtype="bfloat16")
            for shape in SHAPES for causal in (True, False)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/hdim512.json")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--backends", default="jax_fa4,direct,xla")
    args = p.parse_args()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}", flush=True)
    direct, results = DirectLauncher(), []
    for cfg in configs():
        backends = args.backends.split(",")
        if cfg["s"] > 8192:  # XLA's scores would not fit
            backends = [b for b in backends if b != "xla"]
        r = bench_one(cfg, direct, args.reps, backends, xla_cap_bytes=70e9)
        results.append(r)
        t = r["tflops"]
        ratio = f"  fa4/xla={t['jax_fa4'] / t['xla']:.2f}x" if t.get("xla") and t.get(
            "jax_fa4") else ""
        cells = "  ".join(f"{n}={v:6.1f}" if v else f"{n}=   n/a" for n, v in t.items())
        print(f"b{r['b']} s{r['s']} h{r['h']}/{r['hk']} d512 "
              f"{'causal' if r['causal'] else 'full  '} {cells}{ratio}"
              + (f"  errors={r['errors']}" if r.get("errors") else ""), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=dev.device_kind, jax=jax.__version__,
                       date=time.strftime("%Y-%m-%d"), results=results), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
