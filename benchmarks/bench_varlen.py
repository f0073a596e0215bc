"""Forward attention over packed batches of mixed lengths (issue 20's "varlen batches of
mixed lengths"): jax_fa4.varlen_attention against cuDNN and XLA on the same sequences.

  python benchmarks/bench_varlen.py --out varlen.json

jax.nn has no packed layout, so the peers get what a jax.nn user writes: the batch
padded to its longest sequence, with `query_seq_lengths` / `key_value_seq_lengths`
(cuDNN masks the padding; work it does on padded tiles counts against it, as it would
in the user's program).  jax_fa4 gets the packed tokens and cu_seqlens.  Timing as
bench_forward.py: host clock over --reps calls after warm-up ("tflops") and the GPU
trace of 8 chained calls ("device_tflops").  TFLOP/s = sum over sequences of
4*h*s_i^2*d (halved for causal) / time: only the real tokens' work counts.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_fa4  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_forward import time_program, write_results  # noqa: E402

HEADS, HDIM = 16, 128
XLA_CAP_BYTES = 30e9


def _lengths(n, lo, hi, seed):
    """n sequence lengths drawn uniformly in [lo, hi] (seeded: every run, every backend
    and the precompile list see the same batch)."""
    return tuple(int(x) for x in np.random.default_rng(seed).integers(lo, hi + 1, n))


# Mixed batches: many short sequences (a serving prefill batch) and fewer long ones
# (packed training data), each with and without a causal mask.
ROWS = [dict(lens=_lengths(n, lo, hi, seed), causal=causal,
             label=f"{n} seqs {lo}-{hi}{' causal' if causal else ''}")
        for n, lo, hi, seed in ((64, 128, 1024, 0), (16, 512, 4096, 1))
        for causal in (True, False)]


def _flops(lens, causal):
    return sum(4 * HEADS * s * s * HDIM for s in lens) / (2 if causal else 1)


# What `python -m jax_fa4.precompile --calls benchmarks/bench_varlen.py` builds.
CALLS = [dict(fn="varlen_attention", q=((sum(r["lens"]), HEADS, HDIM), "bfloat16"),
              k=((sum(r["lens"]), HEADS, HDIM), "bfloat16"),
              v=((sum(r["lens"]), HEADS, HDIM), "bfloat16"),
              cu_seqlens_q=((len(r["lens"]) + 1,), "int32"),
              cu_seqlens_k=((len(r["lens"]) + 1,), "int32"),
              max_seqlen_q=max(r["lens"]), max_seqlen_k=max(r["lens"]), is_causal=r["causal"])
         for r in ROWS]


def programs(row):
    """{backend: (jitted f(q, k, v) -> output shaped like q, (q, k, v))}."""
    lens, causal = row["lens"], row["causal"]
    total, b, smax = sum(lens), len(lens), max(lens)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    packed = [jax.random.normal(kk, (total, HEADS, HDIM), jnp.bfloat16) for kk in keys]
    # the same tokens, padded per sequence to the longest
    rows = np.concatenate([np.arange(s) + i * smax for i, s in enumerate(lens)])
    padded = [jnp.zeros((b * smax, HEADS, HDIM), jnp.bfloat16).at[rows].set(x)
              .reshape(b, smax, HEADS, HDIM) for x in packed]
    seq = jnp.asarray(lens, jnp.int32)
    out = {"jax_fa4": (jax.jit(lambda q, k, v: jax_fa4.varlen_attention(
        q, k, v, cu, cu, max_seqlen_q=smax, max_seqlen_k=smax, is_causal=causal,
        implementation="fa4")), packed)}
    for impl in ("cudnn", "xla"):
        if impl == "xla" and b * HEADS * smax * smax * 4 * 3 > XLA_CAP_BYTES:
            continue  # XLA materializes the (padded) score matrices
        out[impl] = (jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, query_seq_lengths=seq, key_value_seq_lengths=seq,
            implementation=impl)), padded)
    return out


def bench_row(row, reps, backends):
    fl = _flops(row["lens"], row["causal"])
    res = dict(row, lens=list(row["lens"]), tokens=sum(row["lens"]), tflops={},
               device_tflops={})
    for name, (f, args) in programs(row).items():
        if name not in backends:
            continue
        try:
            time_program(res, name, f, args, fl, reps)
        except Exception as e:  # record why a backend could not run this batch
            res["tflops"][name] = None
            res.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/varlen.json")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--backends", default="jax_fa4,cudnn,xla")
    args = p.parse_args()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}", flush=True)
    results = []
    for i, row in enumerate(ROWS, 1):
        r = bench_row(row, args.reps, args.backends.split(","))
        results.append(r)
        cells = "  ".join(f"{n}={v:6.1f}" if v else f"{n}=  n/a" for n, v in r["tflops"].items())
        dcells = "  ".join(f"{n}={v:6.1f}" for n, v in r["device_tflops"].items())
        print(f"[{i}/{len(ROWS)}] {r['label']} ({r['tokens']} tokens): {cells} | GPU trace: "
              f"{dcells}", flush=True)
    write_results(args.out, dev.device_kind, results=results)


if __name__ == "__main__":
    main()
