"""Decode: K/V read bandwidth of paged_attention against the card's copy bandwidth, split
(heuristic; kernels/split.py's "issue18" plan) vs the split path as planned before
issue 18 ("before": the "issue17" plan, FA4's own combine block shape, decode tiles for
head dims 64/128 only) vs unsplit (num_splits=1) vs Pallas' GPU paged_attention vs jax_fa4's
pure-JAX path, all in the same run.

  python benchmarks/bench_decode.py --out decode.json --png decode.png

Tq query tokens per sequence (1: decode; 4, 8: speculative decode), 32 query / 4 KV
heads (GQA 8), page 64, bf16, causal; batch {1, 8, 32} x seqused {4k ... 128k} x hdim
{128, 256, 512} x Tq {1, 4, 8} by default.  Bandwidth = bytes of K and V read
(2 * b * seqused * 4 * hdim * 2) / time per call; "ceiling" is a device-to-device copy
of 2 GiB in the same run (bytes read + written / time), the most a read can reach.

Time per call: the per-layer call inside one jitted multi-layer program: R calls
chained (each output feeds the next query, so calls cannot be merged), each layer
reading its own copy of the cache (enough copies for >= 160 MB per round, so no call
finds its K/V in L2), divided by R.  "device" is the GPU span of the chain from a
profiler trace (benchmarks/device_time.py: first kernel start to last kernel end,
launch gaps included, host dispatch not); "wall" the host clock around the program
(median of --reps).  Pools over 2**31 elements (the kernels' int32 indexing) are
skipped.  A sweep of forced split counts follows (--sweep).  Pallas takes one query
token per sequence and no causal offset: it runs at Tq = 1 only, with scale 1 on
pre-scaled queries (docs/PAGED.md), on a cache in its own (K, pages, page, H) layout.
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
from jax_fa4.kernels import split

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import device_time  # noqa: E402

HEADS, KV_HEADS, PAGE = 32, 4, 64
BATCHES, LENGTHS = (1, 8, 32), (4096, 8192, 16384, 32768, 65536, 131072)
HDIMS, TQS = (128, 256, 512), (1, 4, 8)
# (hdim, batch, context, Tq) rows that also time forced split counts (--sweep): hdim
# 128's batch-1 rows, head dims 256 and 512 at batch 1 and 16k/32k (the small-grid split
# count per head dim), and Tq 8 at 4k, where the float32 partials weigh against the cache
SWEEP = [(128, 1, 16384, 1), (128, 1, 32768, 1), (128, 1, 131072, 1), (128, 8, 32768, 1),
         (256, 1, 16384, 1), (256, 1, 32768, 1), (512, 1, 16384, 1), (512, 1, 32768, 1),
         (128, 1, 4096, 8), (512, 1, 4096, 8), (512, 1, 4096, 1)]
SWEEP_SPLITS = (4, 8, 12, 16, 20, 24, 28, 32, 33, 40, 66, 128)
XLA_MAX_TOKENS = 8 * 32768  # the pure-JAX path gathers every page: memory and time
L2_FLUSH_BYTES = 160e6  # > the H100's 50 MB / H200's 60 MB L2, with margin
IMPLS = ("split", "pdl", "prefetch", "fused", "before", "unsplit", "pallas", "xla")
# The implementations that are the split path under a named split plan: the default;
# issue18p (PDL launch); issue18q (+ L2 prefetch before the wait, early-trigger
# combine); issue18f (the merge inside the split kernel); issue17 (as issue 17 left it).
PLAN_IMPLS = {"split": split.DEFAULT_PLAN, "pdl": "issue18p", "prefetch": "issue18q",
              "fused": "issue18f", "before": "issue17"}


def _call(b, s, hd, tq=1, num_splits=None):
    max_pages = s // PAGE
    kv = ((b * max_pages, PAGE, KV_HEADS, hd), "bfloat16")
    c = dict(fn="paged_attention", q=((b, tq, HEADS, hd), "bfloat16"), k_cache=kv,
             v_cache=kv, page_table=((b, max_pages), "int32"), seqused_k=((b,), "int32"),
             is_causal=True)
    return c if num_splits is None else dict(c, num_splits=num_splits)


def _fits(b, s, hd):
    return b * s * KV_HEADS * hd < 2**31


# For `python -m jax_fa4.precompile --calls benchmarks/bench_decode.py`.
CALLS = [_call(b, s, hd, tq, ns) for b in BATCHES for s in LENGTHS for hd in HDIMS
         for tq in TQS for ns in (None, 1) if _fits(b, s, hd)]


def _spec(x):
    return jax.ShapeDtypeStruct(x[0], np.dtype(x[1]))


def time_chain(fn, q, caches, rest, reps, calls):
    """(device s, wall s) per call of fn(q, k, v, *rest), `calls` calls chained in one
    jitted program, call i reading caches[i % len(caches)]."""
    def step(i, q, caches, *rest):
        kc, vc = caches[i % len(caches)]
        return fn(q, kc, vc, *rest).astype(q.dtype).reshape(q.shape)

    loop = device_time.chain(step, calls)
    dev = device_time.per_call(loop, calls, q, caches, *rest)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(q, caches, *rest))
        times.append(time.perf_counter() - t0)
    return (dev if dev is not None else float("nan")), float(np.median(times)) / calls


def copy_ceiling(reps: int, nbytes: float = 2 * 2**30) -> float:
    """The card's device-to-device copy bandwidth, TB/s counting bytes read and written:
    a chain of 8 dependent elementwise passes over a buffer far larger than L2 (the
    optimization barrier keeps XLA from fusing them into one)."""
    x = jnp.ones((int(nbytes) // 4,), jnp.float32)

    def passes(y):
        for _ in range(8):
            y = jax.lax.optimization_barrier(y * 1.0000001)
        return y
    f = jax.jit(passes)
    dev = device_time.device_time(f, x)
    if dev:
        t = dev[0] / 8
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(f(x))
            times.append(time.perf_counter() - t0)
        t = float(np.median(times)) / 8
    return round(2 * nbytes / t / 1e12, 3)


def _pallas():
    try:
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
    except ImportError:
        return None
    return paged_attention


def _planned(name, fn):
    """fn, with split calls planned by kernels/split.SPLIT_PLANS[name] (read when the
    call is traced)."""
    def f(*a):
        with split.use_plan(name):
            return fn(*a)
    return f


def _impls(args, b, s, tq, plan):
    """(name, attention fn of (q, k, v, table, used), cache layout) to time."""
    fa4 = functools.partial(jax_fa4.paged_attention, is_causal=True)
    # the split path under each plan (kernels/split.SPLIT_PLANS) an implementation names
    out = [(name, _planned(plan_name, functools.partial(fa4, implementation="fa4")), "ours")
           for name, plan_name in PLAN_IMPLS.items() if name in args.impls]
    # The unsplit kernel and the pure-JAX path are Tq 1 baselines (Tq 4/8 compare the
    # split path with its own Tq 1 row).
    if "unsplit" in args.impls and plan.num_splits > 1 and tq == 1:  # else "split"'s kernel
        out.append(("unsplit", functools.partial(fa4, implementation="fa4", num_splits=1),
                    "ours"))
    pallas = _pallas()
    if "pallas" in args.impls and tq == 1 and pallas is not None and args.platform == "gpu":
        # Its default 8 pages per compute block overflow shared memory from 16k keys on
        # at page 64 (282 KB at hdim 128): 256 keys per block at hdim 128, fewer above.
        def pallas_fn(q, k, v, table, used):  # Pallas does not scale q.k: pre-scale q
            q1 = (q[:, 0] * q.shape[-1] ** -0.5).astype(q.dtype)
            return pallas(q1, k, v, table, used,
                          pages_per_compute_block=max(1, 4 * 128 // q.shape[-1]))[:, None]
        out.append(("pallas", pallas_fn, "pallas"))
    if "xla" in args.impls and b * s <= XLA_MAX_TOKENS and tq == 1:
        out.append(("xla", functools.partial(fa4, implementation="xla"), "ours"))
    return out


def _caches(key, copies, pages, hd, layout):
    shape = ((pages, PAGE, KV_HEADS, hd) if layout == "ours"
             else (KV_HEADS, pages, PAGE, hd))
    return tuple(tuple(jax.random.normal(jax.random.fold_in(key, 2 * c + i), shape,
                                         jnp.bfloat16) for i in range(2))
                 for c in range(copies))


def bench_row(args, b, s, hd, tq):
    max_pages = s // PAGE
    pages = b * max_pages
    nbytes = 2 * b * s * KV_HEADS * hd * 2
    copies = max(1, min(args.calls, math.ceil(L2_FLUSH_BYTES / nbytes)))
    key = jax.random.PRNGKey(b * 7 + s + tq)
    table = jnp.asarray(np.random.default_rng(0).permutation(pages)
                        .reshape(b, max_pages).astype(np.int32))
    used = jnp.full((b,), s, jnp.int32)
    q = jax.random.normal(jax.random.fold_in(key, 99), (b, tq, HEADS, hd), jnp.bfloat16)
    plan = varlen.kernel_plan("paged_attention", **{
        k: _spec(x) for k, x in _call(b, s, hd, tq).items() if isinstance(x, tuple)},
        is_causal=True)
    row = dict(b=b, seqused=s, hdim=hd, tq=tq, splits=plan.num_splits, copies=copies,
               tb_s={}, us={}, wall_us={})
    caches = {}
    for name, fn, layout in _impls(args, b, s, tq, plan):
        try:
            if layout not in caches:
                caches = {layout: _caches(key, copies, pages, hd, layout)}  # one at a time
            t, w = time_chain(fn, q, caches[layout], (table, used), args.reps, args.calls)
            t = t if math.isfinite(t) else w  # no GPU trace (CPU): the host clock
            row["tb_s"][name] = round(nbytes / t / 1e12, 3)
            row["us"][name] = round(t * 1e6, 1)
            row["wall_us"][name] = round(w * 1e6, 1)
        except Exception as e:  # e.g. out of memory, or Pallas' shared memory at hdim 512
            row.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:200]}"
    if (hd, b, s, tq) in SWEEP and args.sweep:
        sw = {}
        ours = caches.get("ours") or _caches(key, copies, pages, hd, "ours")
        for ns in args.sweep_splits:
            fn = functools.partial(jax_fa4.paged_attention, is_causal=True,
                                   implementation="fa4", num_splits=ns)
            try:
                t, _ = time_chain(fn, q, ours, (table, used), 1, args.calls)
                sw[ns] = round(nbytes / t / 1e12, 3)
            except Exception as e:  # e.g. a count the API refuses for this shape
                row.setdefault("errors", {})[f"sweep {ns}"] = f"{type(e).__name__}: {str(e)[:200]}"
        row["sweep"] = sw
    return row


def markdown(res: dict) -> str:
    """PERF.md tables (one per head dim and Tq) from a results JSON; columns for the
    implementations the file has."""
    names = {"split": "split", "pdl": "split, PDL launch", "prefetch": "split, PDL + L2 prefetch",
             "fused": "fused combine",
             "before": "before (issue 17)", "unsplit": "unsplit",
             "pallas": "pallas", "xla": "xla"}
    have = [k for k in names if any(k in r["tb_s"] or k in r.get("errors", {})
                                    for r in res["rows"])]
    out = [f"copy ceiling: {res.get('ceiling_tb_s', float('nan')):.2f} TB/s", ""]
    for hd, tq in sorted({(r["hdim"], r.get("tq", 1)) for r in res["rows"]}):
        out += [f"hdim {hd}, Tq {tq}:", "",
                "| b | seqused | S | " + " | ".join(names[k] for k in have) + " | split / unsplit |",
                "| --- " * (len(have) + 4) + "|"]
        for r in (r for r in res["rows"] if r["hdim"] == hd and r.get("tq", 1) == tq):
            tb, us = r["tb_s"], r["us"]
            cell = lambda k: f"{tb[k]:.2f} ({us[k]:.0f} µs)" if k in tb else "—"  # noqa: E731
            ratio = (f"{us['unsplit'] / us['split']:.1f}×" if "unsplit" in us and "split" in us
                     else "—")
            out.append(f"| {r['b']} | {r['seqused'] // 1024}k | {r['splits']} | "
                       + " | ".join(cell(k) for k in have) + f" | {ratio} |")
        out.append("")
    for r in res["rows"]:
        if "sweep" in r:
            out.append(f"sweep hdim {r['hdim']} b{r['b']} x {r['seqused'] // 1024}k Tq "
                       f"{r.get('tq', 1)}: " + ", ".join(
                f"S={k}: {v:.2f}" for k, v in r["sweep"].items()))
    return "\n".join(out)


def plot(res: dict, path: str) -> None:
    """TB/s vs context length, one panel per head dim: the split path per batch (colour)
    and Tq (marker); at Tq 1 the path before issue 18, the unsplit kernel, Pallas and
    the pure-JAX path (line style); the copy ceiling."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hdims = sorted({r["hdim"] for r in res["rows"]})
    batches = sorted({r["b"] for r in res["rows"]})
    colours = dict(zip(batches, ("tab:blue", "tab:red", "tab:green", "tab:purple")))
    markers = {1: "o", 4: "s", 8: "^"}
    styles = {"split": "-", "pdl": (0, (3, 1, 1, 1)), "prefetch": (0, (1, 1)), "fused": (0, (5, 1)),
              "before": (0, (1, 1)), "unsplit": ":",
              "pallas": "--", "xla": "-."}
    fig, axes = plt.subplots(1, len(hdims), figsize=(5 * len(hdims), 4.4), sharey=True,
                             squeeze=False)
    handles = {}
    for ax, hd in zip(axes[0], hdims):
        rows = [r for r in res["rows"] if r["hdim"] == hd]
        for b in batches:
            for tq in sorted({r.get("tq", 1) for r in rows}):
                for name, style in styles.items():
                    if name != "split" and tq != 1:
                        continue
                    pts = sorted((r["seqused"], r["tb_s"][name]) for r in rows
                                 if r["b"] == b and r.get("tq", 1) == tq and name in r["tb_s"])
                    if pts:
                        label = f"{name} b{b}" + (f" Tq{tq}" if name == "split" else "")
                        (line,) = ax.plot(*zip(*pts), linestyle=style, color=colours[b],
                                          marker=markers.get(tq, "o"), ms=3.5, lw=1.3,
                                          alpha=1.0 if name == "split" else 0.7, label=label)
                        handles.setdefault(label, line)
        if "ceiling_tb_s" in res:
            handles.setdefault("copy ceiling", ax.axhline(res["ceiling_tb_s"], color="k", lw=0.8,
                                                          label="copy ceiling"))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (keys per sequence)")
        ax.set_title(f"hdim {hd}")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("K/V read TB/s (per-layer call)")
    fig.legend(handles.values(), handles.keys(), loc="lower center", fontsize=7,
               ncol=min(8, len(handles)), frameon=False)
    fig.suptitle(f"paged decode, {res['device']}, bf16, 32/4 heads, page {PAGE}, {res['date']}")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def _ints(s):
    return tuple(int(x) for x in s.split(","))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/decode.json")
    p.add_argument("--png", help="also plot TB/s vs context length")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--calls", type=int, default=16, help="layers (calls) chained per program")
    p.add_argument("--sweep", action="store_true", help="forced split counts too")
    p.add_argument("--sweep-splits", type=_ints, default=SWEEP_SPLITS,
                   help="the split counts --sweep forces")
    p.add_argument("--table", metavar="JSON", help="print PERF.md tables from a results file")
    p.add_argument("--plot", metavar="JSON", help="plot a results file (with --png)")
    p.add_argument("--hdims", type=_ints, default=HDIMS)
    p.add_argument("--batches", type=_ints, default=BATCHES)
    p.add_argument("--lengths", type=_ints, default=LENGTHS)
    p.add_argument("--tq", type=_ints, default=TQS)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--ceiling-bytes", type=float, default=2 * 2**30)
    args = p.parse_args()
    args.impls = set(args.impls.split(","))
    if args.table or args.plot:
        res = json.load(open(args.table or args.plot))
        if args.table:
            print(markdown(res))
        if args.plot:
            plot(res, args.png or "decode.png")
        return
    dev = jax.devices()[0]
    args.platform = dev.platform
    print(f"device: {dev.device_kind}, jax {jax.__version__}", flush=True)
    res = dict(device=dev.device_kind, date=time.strftime("%Y-%m-%d"), heads=HEADS,
               kv_heads=KV_HEADS, page=PAGE, calls=args.calls, rows=[],
               ceiling_tb_s=copy_ceiling(args.reps, args.ceiling_bytes))
    print(f"copy ceiling {res['ceiling_tb_s']} TB/s", flush=True)
    for hd in args.hdims:
        for b in args.batches:
            for s in args.lengths:
                for tq in args.tq:
                    if not _fits(b, s, hd):
                        continue
                    row = bench_row(args, b, s, hd, tq)
                    res["rows"].append(row)
                    print("decode", row, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    json.dump(res, open(args.out, "w"), indent=1)
    print(f"wrote {args.out}")
    if args.png:
        plot(res, args.png)


if __name__ == "__main__":
    sys.exit(main())
