"""Paged KV cache on one GPU: prefill throughput vs dense FA4 on the same tokens, and
decode K/V read bandwidth vs jax_fa4's pure-JAX (XLA) fallback.

  python benchmarks/bench_paged.py --out results.json

Prefill: q (b, s, 32, 128) against the same keys stored densely or in pages
(page 128 = tile_n: TMA loads; page 64: cp.async loads), causal; TFLOP/s with
4·b·h·s·s·d/2.  Decode: one query token per sequence, 32 query / 4 KV heads, hdim 128,
bandwidth = bytes of K and V read (2·b·seqused·4·128·2) / time, vs H100's 3.35 TB/s.
Timed with block_until_ready over back-to-back calls after warm-up.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_fa4

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_forward import time_jax  # noqa: E402

HEADS, KV_HEADS, HDIM = 32, 4, 128
PREFILL = [(4, 4096), (2, 8192), (1, 16384)]
DECODE = [(b, s) for b in (1, 8, 64) for s in (1024, 8192, 32768)]
PAGE_SIZES = (128, 64)


def _paged_call(b, tq, tokens, ps, causal=True):
    max_pages = -(-tokens // ps)
    kv = ((b * max_pages, ps, KV_HEADS, HDIM), "bfloat16")
    return dict(fn="paged_attention", q=((b, tq, HEADS, HDIM), "bfloat16"), k_cache=kv,
                v_cache=kv, page_table=((b, max_pages), "int32"), seqused_k=((b,), "int32"),
                is_causal=causal)


# For `python -m jax_fa4.precompile --calls benchmarks/bench_paged.py`.
CALLS = [_paged_call(b, s, s, ps) for b, s in PREFILL for ps in PAGE_SIZES] + [
    _paged_call(b, 1, s, ps) for b, s in DECODE for ps in PAGE_SIZES] + [
    dict(query=((b, s, HEADS, HDIM), "bfloat16"), key=((b, s, KV_HEADS, HDIM), "bfloat16"),
         value=((b, s, KV_HEADS, HDIM), "bfloat16"), is_causal=True) for b, s in PREFILL]


def paged_inputs(b, tokens, ps, seed=0):
    """Keys/values for b sequences of `tokens` tokens: dense (b, tokens, K, H) and the
    same data scattered over a shuffled page pool."""
    rng = np.random.default_rng(seed)
    k = jax.random.normal(jax.random.PRNGKey(seed), (b, tokens, KV_HEADS, HDIM), jnp.bfloat16)
    v = jax.random.normal(jax.random.PRNGKey(seed + 1), (b, tokens, KV_HEADS, HDIM), jnp.bfloat16)
    max_pages = -(-tokens // ps)
    table = rng.permutation(b * max_pages).reshape(b, max_pages).astype(np.int32)
    pad = max_pages * ps - tokens

    def to_pages(x):
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b * max_pages, ps, KV_HEADS, HDIM)
        return jnp.zeros_like(x).at[table.reshape(-1)].set(x)

    used = jnp.full((b,), tokens, jnp.int32)
    return k, v, to_pages(k), to_pages(v), jnp.asarray(table), used


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/paged.json")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}", flush=True)
    res = dict(device=dev.device_kind, date=time.strftime("%Y-%m-%d"), prefill=[], decode=[])

    for b, s in PREFILL:
        q = jax.random.normal(jax.random.PRNGKey(9), (b, s, HEADS, HDIM), jnp.bfloat16)
        row = dict(b=b, s=s, tflops={})
        fl = 4.0 * b * HEADS * s * s * HDIM / 2
        for ps in PAGE_SIZES:
            k, v, kc, vc, table, used = paged_inputs(b, s, ps)
            if "dense" not in row["tflops"]:
                f = jax.jit(functools.partial(jax_fa4.attention, is_causal=True,
                                              implementation="fa4"))
                row["tflops"]["dense"] = fl / time_jax(f, (q, k, v), args.reps) / 1e12
            f = jax.jit(functools.partial(jax_fa4.paged_attention, is_causal=True,
                                          implementation="fa4"))
            row["tflops"][f"paged{ps}"] = fl / time_jax(f, (q, kc, vc, table, used), args.reps) / 1e12
            del k, v, kc, vc
        res["prefill"].append(row)
        print("prefill", row, flush=True)

    for b, s in DECODE:
        q = jax.random.normal(jax.random.PRNGKey(3), (b, 1, HEADS, HDIM), jnp.bfloat16)
        row = dict(b=b, seqused=s, tb_s={}, us={})
        nbytes = 2 * b * s * KV_HEADS * HDIM * 2
        for ps in PAGE_SIZES:
            _, _, kc, vc, table, used = paged_inputs(b, s, ps)
            for name, impl in (("fa4", "fa4"), ("xla", "xla")):
                if name == "xla" and ps != 64:
                    continue
                f = jax.jit(functools.partial(jax_fa4.paged_attention, is_causal=True,
                                              implementation=impl))
                try:
                    t = time_jax(f, (q, kc, vc, table, used), args.reps)
                    key = f"{name}_page{ps}"
                    row["tb_s"][key] = nbytes / t / 1e12
                    row["us"][key] = t * 1e6
                except Exception as e:  # e.g. out of memory for the XLA gather
                    row.setdefault("errors", {})[f"{name}_page{ps}"] = str(e)[:200]
            del kc, vc
        res["decode"].append(row)
        print("decode", row, flush=True)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    json.dump(res, open(args.out, "w"), indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
