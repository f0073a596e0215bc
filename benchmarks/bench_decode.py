"""Split-KV decode: K/V read bandwidth of paged_attention, split (heuristic) vs unsplit
(num_splits=1) vs jax_fa4's pure-JAX path, in the same run.

  python benchmarks/bench_decode.py --out decode.json

One query token per sequence, 32 query / 4 KV heads (GQA 8), page 64, bf16, causal;
batch {1, 8, 64} x seqused {1k, 8k, 16k, 32k, 128k} x hdim {128, 256, 512}.  Bandwidth
= bytes of K and V read (2 * b * seqused * 4 * hdim * 2) / time per call.

Time per call: R calls chained in one jitted program (each output feeds the next
query, so calls cannot be merged), divided by R.  "device" is the GPU span of the
chain from a profiler trace (benchmarks/device_time.py: first kernel start to last
kernel end, launch gaps between kernels included, host dispatch not); "wall" the host
clock around the whole program (median of --reps), which adds the program's fixed
dispatch and synchronization cost / R.  Consecutive calls read different copies of the
cache (enough for >= 160 MB per round) so that no call finds its K/V in the 50 MB L2.
Pools over 2**31 elements (the kernels' int32 indexing) are skipped.  A sweep of
forced split counts follows the table.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_fa4
from jax_fa4 import varlen

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device_time import device_time  # noqa: E402

HEADS, KV_HEADS, PAGE = 32, 4, 64
BATCHES, LENGTHS, HDIMS = (1, 8, 64), (1024, 8192, 16384, 32768, 131072), (128, 256, 512)
SWEEP = [(1, 32768), (1, 131072), (8, 32768)]  # hdim 128
SWEEP_SPLITS = (4, 8, 16, 32, 64, 128)
XLA_MAX_TOKENS = 8 * 32768  # the pure-JAX path gathers every page: memory and time
L2_FLUSH_BYTES = 160e6  # > the H100's 50 MB L2, with margin


def _call(b, s, hd, num_splits=None):
    max_pages = s // PAGE
    kv = ((b * max_pages, PAGE, KV_HEADS, hd), "bfloat16")
    c = dict(fn="paged_attention", q=((b, 1, HEADS, hd), "bfloat16"), k_cache=kv, v_cache=kv,
             page_table=((b, max_pages), "int32"), seqused_k=((b,), "int32"), is_causal=True)
    return c if num_splits is None else dict(c, num_splits=num_splits)


# For `python -m jax_fa4.precompile --calls benchmarks/bench_decode.py`.
CALLS = [_call(b, s, hd, ns) for b in BATCHES for s in LENGTHS for hd in HDIMS
         for ns in (None, 1)]


def _spec(x):
    return jax.ShapeDtypeStruct(x[0], np.dtype(x[1]))


def time_chain(fn, q, caches, rest, reps, calls):
    """(device s, wall s) per call of fn(q, k, v, *rest), `calls` calls chained in one
    jitted program, call i reading caches[i % len(caches)]."""
    @jax.jit
    def loop(q, caches, *rest):
        for i in range(calls):
            kc, vc = caches[i % len(caches)]
            q = fn(q, kc, vc, *rest).astype(q.dtype)
        return q

    dev = device_time(loop, q, caches, *rest)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(q, caches, *rest))
        times.append(time.perf_counter() - t0)
    return (dev[0] / calls if dev else float("nan")), float(np.median(times)) / calls


def markdown(res: dict) -> str:
    """PERF.md tables (one per head dim) from a results JSON."""
    out = []
    for hd in sorted({r["hdim"] for r in res["rows"]}):
        out += [f"hdim {hd}:", "", "| b | seqused | S | split | unsplit | xla | split / unsplit |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in (r for r in res["rows"] if r["hdim"] == hd):
            tb, us = r["tb_s"], r["us"]
            cell = lambda k: f"{tb[k]:.2f} ({us[k]:.0f} µs)" if k in tb else "—"  # noqa: E731
            ratio = (f"{us['unsplit'] / us['split']:.1f}×" if "unsplit" in us and "split" in us
                     else "same kernel")
            out.append(f"| {r['b']} | {r['seqused'] // 1024}k | {r['splits']} | {cell('split')} "
                       f"| {cell('unsplit')} | {cell('xla')} | {ratio} |")
        out.append("")
    for sw in res.get("sweep", []):
        out.append(f"sweep b{sw['b']} x {sw['seqused'] // 1024}k: " + ", ".join(
            f"S={k}: {v:.2f}" for k, v in sw["tb_s"].items()))
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/decode.json")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--calls", type=int, default=16, help="calls chained per program")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--table", metavar="JSON", help="print PERF.md tables from a results file")
    p.add_argument("--hdims", default=",".join(map(str, HDIMS)))
    args = p.parse_args()
    if args.table:
        print(markdown(json.load(open(args.table))))
        return
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}", flush=True)
    res = dict(device=dev.device_kind, date=time.strftime("%Y-%m-%d"), heads=HEADS,
               kv_heads=KV_HEADS, page=PAGE, calls=args.calls, rows=[])
    for hd in map(int, args.hdims.split(",")):
        for b in BATCHES:
            for s in LENGTHS:
                if b * s * KV_HEADS * hd >= 2**31 or (hd > 128 and s < 8192 and b < 64):
                    continue
                max_pages = s // PAGE
                pages = b * max_pages
                nbytes = 2 * b * s * KV_HEADS * hd * 2
                copies = max(1, min(args.calls, math.ceil(L2_FLUSH_BYTES / nbytes)))
                key = jax.random.PRNGKey(b * 7 + s)
                caches = tuple(
                    tuple(jax.random.normal(jax.random.fold_in(key, 2 * c + i),
                                            (pages, PAGE, KV_HEADS, hd), jnp.bfloat16)
                          for i in range(2)) for c in range(copies))
                table = jnp.asarray(np.random.default_rng(0).permutation(pages)
                                    .reshape(b, max_pages).astype(np.int32))
                used = jnp.full((b,), s, jnp.int32)
                q = jax.random.normal(jax.random.fold_in(key, 99), (b, 1, HEADS, hd),
                                      jnp.bfloat16)
                plan = varlen.kernel_plan("paged_attention", **{
                    k: _spec(x) for k, x in _call(b, s, hd).items()
                    if isinstance(x, tuple)}, is_causal=True)
                row = dict(b=b, seqused=s, hdim=hd, splits=plan.num_splits, copies=copies,
                           tb_s={}, us={}, wall_us={})
                impls = [("split", dict(implementation="fa4")),
                         ("unsplit", dict(implementation="fa4", num_splits=1))]
                if b * s <= XLA_MAX_TOKENS:
                    impls.append(("xla", dict(implementation="xla")))
                for name, kw in impls:
                    if name == "unsplit" and plan.num_splits == 1:
                        continue  # the same kernel as "split"
                    fn = functools.partial(jax_fa4.paged_attention, is_causal=True, **kw)
                    try:
                        t, w = time_chain(fn, q, caches, (table, used), args.reps, args.calls)
                        row["tb_s"][name] = round(nbytes / t / 1e12, 3)
                        row["us"][name] = round(t * 1e6, 1)
                        row["wall_us"][name] = round(w * 1e6, 1)
                    except Exception as e:  # e.g. out of memory on the XLA path
                        row.setdefault("errors", {})[name] = str(e)[:200]
                res["rows"].append(row)
                print("decode", row, flush=True)
                if hd == 128 and (b, s) in SWEEP and not args.no_sweep:
                    sw = {}
                    for ns in SWEEP_SPLITS:
                        fn = functools.partial(jax_fa4.paged_attention, is_causal=True,
                                               implementation="fa4", num_splits=ns)
                        t, _ = time_chain(fn, q, caches, (table, used), 1, args.calls)
                        sw[ns] = round(nbytes / t / 1e12, 3)
                    res.setdefault("sweep", []).append(dict(b=b, seqused=s, tb_s=sw))
                    print("sweep", b, s, sw, flush=True)
                del caches
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    json.dump(res, open(args.out, "w"), indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
