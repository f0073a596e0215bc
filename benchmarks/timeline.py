"""Where a call's GPU time goes: every kernel of one jitted program from a profiler
trace, with its duration and the gap before it, grouped per kernel name.

  python benchmarks/timeline.py decode --b 1 --s 16384 --hdim 128   # issue 18's shapes
  python benchmarks/timeline.py decode --b 8 --s 32768 --hdim 128
  python benchmarks/timeline.py forward --b 32 --s 1024 --hdim 128 --causal
  python benchmarks/timeline.py forward --b 2 --s 8192 --heads 32 --kv-heads 4 --hdim 512 \
      --design single_qk --no-trace     # one untraced call, for Nsight Compute
  python benchmarks/timeline.py backward --b 4 --s 4096 --heads 8 --hdim 256 --causal

`decode`: paged_attention (one query token, 32 query / 4 KV heads, page 64, bf16,
causal) called once per layer for --layers layers inside one jitted program, each layer
on its own cache copy (so K/V is never L2-resident), as bench_decode.py times it; the
report covers the middle layer's kernels (the call's own launches and every XLA op it
adds: metadata clamps, the split kernel, the combine, copies) and the whole program's
per-layer span.  `forward`: jax_fa4.attention forward once (--design: the head-dim-512
design, kernels/config.use_hdim512_design).  `backward`: the gradient of the forward
(dq, dk, dv for a given dO, as bench_backward.py times it): the forward again, the
backward's preprocess, main and postprocess kernels, zeroing and any XLA op around them
(--deterministic: FA4's deterministic backward).  Writes --out JSON.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_fa4
from jax_fa4.kernels.config import use_hdim512_design

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import device_time  # noqa: E402
from device_time import kernel_events  # noqa: E402


def breakdown(events):
    """Per event: name, duration, start (from the first event) and the gap since the
    previous one ended (µs; negative: it started before that one ended, e.g. a
    programmatic dependent launch); and the totals per kernel name."""
    rows, prev_end = [], None
    t0 = events[0][1] if events else 0
    for name, start, dur in events:
        gap = 0.0 if prev_end is None else (start - prev_end) / 1e3
        rows.append(dict(name=name[:80], us=round(dur / 1e3, 2), start_us=round((start - t0) / 1e3, 2),
                         gap_us=round(max(0.0, gap), 2), overlap_us=round(max(0.0, -gap), 2)))
        prev_end = start + dur if prev_end is None else max(prev_end, start + dur)
    per_name = collections.defaultdict(lambda: [0, 0.0])
    for r in rows:
        per_name[r["name"]][0] += 1
        per_name[r["name"]][1] += r["us"]
    span = ((events[-1][1] + events[-1][2] - events[0][1]) / 1e3) if events else 0.0
    return dict(span_us=round(span, 2), busy_us=round(sum(r["us"] for r in rows), 2),
                gaps_us=round(sum(r["gap_us"] for r in rows), 2), events=rows,
                per_name={k: dict(count=c, us=round(t, 2)) for k, (c, t) in per_name.items()})


def decode_program(b, s, hd, layers, page=64, heads=32, kv_heads=4, tq=1):
    """(jitted program, args): `layers` paged_attention calls chained, each on its own
    cache copy (layer_slices tells the layers apart: each launches the same kernels)."""
    max_pages = s // page
    pages = b * max_pages
    key = jax.random.PRNGKey(0)
    caches = tuple(tuple(jax.random.normal(jax.random.fold_in(key, 2 * i + j),
                                           (pages, page, kv_heads, hd), jnp.bfloat16)
                         for j in range(2)) for i in range(layers))
    table = jnp.asarray(np.random.default_rng(0).permutation(pages)
                        .reshape(b, max_pages).astype(np.int32))
    used = jnp.full((b,), s, jnp.int32)
    q = jax.random.normal(key, (b, tq, heads, hd), jnp.bfloat16)

    def layer(i, q, caches, table, used):
        kc, vc = caches[i]
        return jax_fa4.paged_attention(q, kc, vc, table, used, is_causal=True).astype(q.dtype)
    return device_time.chain(layer, layers), (q, caches, table, used)


def layer_slices(events, layers):
    """Splits the program's kernels into `layers` equal runs (each layer launches the
    same kernels); the middle one is the representative call."""
    n = len(events) // layers
    return [events[i * n:(i + 1) * n] for i in range(layers)] if n else [events]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("decode", "forward", "backward"))
    p.add_argument("--b", type=int, default=1)
    p.add_argument("--s", type=int, default=16384)
    p.add_argument("--hdim", type=int, default=128)
    p.add_argument("--tq", type=int, default=1)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="forward: default --heads")
    p.add_argument("--design", default=None, help="forward, head dim 512: split_k, ...")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--deterministic", action="store_true", help="backward")
    p.add_argument("--impl", choices=("jax_fa4", "cudnn"), default="jax_fa4",
                   help="forward/backward: jax_fa4.attention or jax.nn's cuDNN attention "
                        "(for a kernel-to-kernel Nsight Compute comparison)")
    p.add_argument("--out", default="benchmarks/results/timeline.json")
    p.add_argument("--no-trace", action="store_true",
                   help="run the program once, untraced (for ncu)")
    a = p.parse_args()
    design = (use_hdim512_design(a.design) if a.design else contextlib.nullcontext())
    with design:
        run(a)


def attention_program(a):
    """(jitted program, args): one forward call, or (`backward`) dq, dk, dv of one
    call for a given dO."""
    shape = (a.b, a.s, a.heads, a.hdim)
    kv_shape = (a.b, a.s, a.kv_heads or a.heads, a.hdim)
    q, k, v, do = (jax.random.normal(jax.random.PRNGKey(i), sh, jnp.bfloat16)
                   for i, sh in enumerate((shape, kv_shape, kv_shape, shape)))
    if a.impl == "cudnn":
        attn = functools.partial(jax.nn.dot_product_attention, is_causal=a.causal,
                                 implementation="cudnn")
    else:
        attn = functools.partial(jax_fa4.attention, is_causal=a.causal,
                                 deterministic=a.deterministic)
    if a.what == "forward":
        return jax.jit(attn), (q, k, v)
    return jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do)), (q, k, v, do)


def run(a):
    if a.no_trace:
        if a.what == "decode":
            prog, args = decode_program(a.b, a.s, a.hdim, a.layers, tq=a.tq)
        else:
            prog, args = attention_program(a)
        jax.block_until_ready(prog(*args))
        return
    dev = jax.devices()[0]
    res = dict(device=dev.device_kind, jax=jax.__version__, args=vars(a))
    if a.what == "decode":
        prog, args = decode_program(a.b, a.s, a.hdim, a.layers, tq=a.tq)
        events = kernel_events(prog, *args)
        per_layer = layer_slices(events, a.layers)
        res["program"] = breakdown(events)
        res["layer"] = breakdown(per_layer[len(per_layer) // 2])
        res["per_layer_span_us"] = round(res["program"]["span_us"] / a.layers, 2)
    else:
        f, args = attention_program(a)
        res["program"] = breakdown(kernel_events(f, *args))
    print(json.dumps({k: v for k, v in res.items() if k != "program"}, indent=1)[:4000])
    print("program: span", res["program"]["span_us"], "µs, busy", res["program"]["busy_us"],
          "µs; per kernel name:")
    for name, t in sorted(res["program"]["per_name"].items(), key=lambda kv: -kv[1]["us"]):
        print(f"  {t['us']:10.2f} µs  x{t['count']:<4} {name}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    json.dump(res, open(a.out, "w"), indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
