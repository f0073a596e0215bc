"""A jitted 64-step decode loop (paged_attention + update_paged_cache, donated
caches) timed with XLA command buffers (CUDA graphs) off and on.

  python benchmarks/bench_decode_loop.py --out decode_loop.json

Each setting runs in its own process (XLA_FLAGS are read at start-up).  Step: write
one new K/V token per sequence into its page, attend with the new token's query
(32 query / 4 KV heads, hdim 128, page 128), feed the output back as the next query.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SETTINGS = {
    "off": "--xla_gpu_enable_command_buffer=",
    "on (default types)": "",
    "on (+custom calls, loops)": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUSTOM_CALL,"
                                 "WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1",
}
B, HEADS, KV_HEADS, HDIM, PAGE, CONTEXT, STEPS = 8, 32, 4, 128, 128, 8192, 64

# For `python -m jax_fa4.precompile --calls benchmarks/bench_decode_loop.py`.
_MAX_PAGES = (CONTEXT + STEPS) // PAGE + 1
CALLS = [dict(fn="paged_attention", q=((B, 1, HEADS, HDIM), "bfloat16"),
              k_cache=((B * _MAX_PAGES, PAGE, KV_HEADS, HDIM), "bfloat16"),
              v_cache=((B * _MAX_PAGES, PAGE, KV_HEADS, HDIM), "bfloat16"),
              page_table=((B, _MAX_PAGES), "int32"), seqused_k=((B,), "int32"), is_causal=True,
              num_splits=ns) for ns in (None, 1)]


def run_one(reps: int, num_splits: int | None) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jax_fa4

    pages = B * _MAX_PAGES
    rng = np.random.default_rng(0)
    kc = jax.random.normal(jax.random.PRNGKey(0), (pages, PAGE, KV_HEADS, HDIM), jnp.bfloat16)
    vc = jax.random.normal(jax.random.PRNGKey(1), (pages, PAGE, KV_HEADS, HDIM), jnp.bfloat16)
    table = jnp.asarray(rng.permutation(pages).reshape(B, _MAX_PAGES), jnp.int32)
    q0 = jax.random.normal(jax.random.PRNGKey(2), (B, 1, HEADS, HDIM), jnp.bfloat16)
    wk = jax.random.normal(jax.random.PRNGKey(3), (HEADS * HDIM, KV_HEADS * HDIM),
                           jnp.bfloat16) / 64

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def decode(kc, vc, q, start):
        def step(i, carry):
            kc, vc, q = carry
            pos = jnp.full((B, 1), start + i, jnp.int32)
            kv = (q.reshape(B, -1) @ wk).reshape(B, 1, KV_HEADS, HDIM)
            kc, vc = jax_fa4.update_paged_cache(kc, vc, kv, kv, table, pos)
            o = jax_fa4.paged_attention(q, kc, vc, table, pos[:, 0] + 1, is_causal=True,
                                        implementation="fa4", num_splits=num_splits)
            return kc, vc, o
        return jax.lax.fori_loop(0, STEPS, step, (kc, vc, q))

    kc, vc, q = decode(kc, vc, q0, CONTEXT)  # compile + warm-up
    jax.block_until_ready(q)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        kc, vc, q = decode(kc, vc, q0, CONTEXT)
        jax.block_until_ready(q)
        times.append(time.perf_counter() - t0)
    loop = float(np.median(times))
    return dict(loop_ms=loop * 1e3, step_us=loop / STEPS * 1e6,
                finite=bool(jnp.isfinite(q.astype(jnp.float32)).all()))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/decode_loop.json")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--num-splits", type=int, default=None,
                   help="paged_attention's num_splits (default: its heuristic)")
    p.add_argument("--settings", default="all", help="'all' or 'off' (command buffers off)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_one(args.reps, args.num_splits)))
        return
    results = {}
    settings = SETTINGS if args.settings == "all" else {"off": SETTINGS["off"]}
    for name, flags in settings.items():
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        extra = [] if args.num_splits is None else ["--num-splits", str(args.num_splits)]
        r = subprocess.run([sys.executable, __file__, "--child", "--reps", str(args.reps)] + extra,
                           env=env, capture_output=True, text=True, timeout=600)
        if r.returncode:
            results[name] = dict(error=r.stderr[-1500:])
        else:
            results[name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"command buffers {name}: {results[name]}", flush=True)
    import jax

    out = dict(device=jax.devices()[0].device_kind, date=time.strftime("%Y-%m-%d"),
               config=dict(batch=B, heads=HEADS, kv_heads=KV_HEADS, hdim=HDIM, page=PAGE,
                           context=CONTEXT, steps=STEPS, num_splits=args.num_splits),
               results=results)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    json.dump(out, open(args.out, "w"), indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
