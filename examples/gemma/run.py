"""Gemma-4-style inference with jax_fa4: prefill a batch of prompts of different
lengths into a paged KV cache, then decode in a jitted while loop.

    python -m examples.gemma                      # tiny preset (CPU: seconds)
    python -m examples.gemma --preset mid         # 12 layers of the 31B shapes (one H100)
    python -m examples.gemma --preset mid --attention jax_fa4,xla --json gemma.json
    python examples/gemma/run.py --preset tiny --prompt-lens 40,17 --new-tokens 16

Weights are random (see checkpoint.py to load a real checkpoint's tensors); prompts are
random token ids.  --attention xla runs the same model with plain-JAX attention over the
gathered cache (the baseline); several backends run on the same weights and prompts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples.gemma` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from jax_fa4.cpu_compile import use_fast_cpu_compile  # noqa: E402


# On a CPU-only install, compile at XLA's backend optimization level 0: compiling the
# unrolled layers dominates a tiny-preset run (about 2x faster overall).
use_fast_cpu_compile()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from examples.gemma import cache as kv_cache  # noqa: E402
from examples.gemma import generate, model, paths  # noqa: E402
from examples.gemma.config import DEFAULT_RUNS, PRESETS  # noqa: E402
from examples.gemma.sampler import SamplerConfig  # noqa: E402

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m examples.gemma", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--layers", type=int, help="override the preset's number of layers")
    p.add_argument("--dtype", help="override the preset's dtype (bfloat16, float32)")
    p.add_argument("--batch", type=int, help="sequences (default: one per prompt length; "
                   "prompt lengths repeat to fill the batch)")
    p.add_argument("--prompt-lens", help="comma list of prompt lengths")
    p.add_argument("--new-tokens", type=int, help="tokens to generate per sequence")
    p.add_argument("--attention", default="jax_fa4",
                   help="jax_fa4, xla, or a comma list (each runs on the same weights)")
    p.add_argument("--prefill", choices=("varlen", "paged"), default="varlen",
                   help="jax_fa4 prefill call: varlen_attention on the new K/V, or "
                   "paged_attention with packed queries against the cache")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--eos-id", type=int, help="stop a sequence at this token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress-every", type=int, help="decode progress every N steps "
                   "(0: off; a host callback in the loop; default: new_tokens // 4)")
    p.add_argument("--assert-fa4", action="store_true", help="fail unless every jax_fa4 "
                   "attention call takes the FA4 kernel (needs an H100/H200)")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations before the "
                   "timed one (the first run of a program pays one-time costs)")
    p.add_argument("--json", metavar="OUT", help="write the summary as JSON")
    args = p.parse_args(argv)
    for name in args.attention.split(","):
        if name not in ("jax_fa4", "xla"):
            p.error(f"--attention: unknown backend {name!r} (jax_fa4, xla)")
    if args.assert_fa4 and "jax_fa4" not in args.attention.split(","):
        p.error("--assert-fa4 checks the jax_fa4 attention: add jax_fa4 to --attention")
    return args


def setup(args):
    cfg = PRESETS[args.preset]
    over = {k: v for k, v in dict(num_layers=args.layers, dtype=args.dtype).items() if v}
    cfg = dataclasses.replace(cfg, **over)
    lens, new = DEFAULT_RUNS[args.preset]
    lens = [int(x) for x in args.prompt_lens.split(",")] if args.prompt_lens else lens
    batch = args.batch or len(lens)
    lens = [lens[i % len(lens)] for i in range(batch)]
    return cfg, lens, args.new_tokens or new


def run_backend(backend, params, cfg, prompts, new_tokens, args, sampler):
    """Compiles prefill and decode, runs `args.warmup` untimed generations, then one
    timed one (each on a fresh cache).  Returns (summary dict, tokens (B, new_tokens),
    {phase: jax.stages.Lowered})."""
    lens = [len(x) for x in prompts]
    capacity = [n + new_tokens for n in lens]
    cache = kv_cache.init_cache(cfg, capacity, args.page_size, args.seed)
    tokens = jnp.asarray(np.concatenate(prompts), jnp.int32)
    batch = generate.prefill_batch(lens)
    k1, k2 = jax.random.split(jax.random.PRNGKey(args.seed))
    steps = new_tokens - 1
    every = new_tokens // 4 if args.progress_every is None else args.progress_every
    r = dict(backend=backend, prefill_tokens=sum(lens))

    print(f"[{backend}] compiling prefill and decode ({steps} steps) ...", flush=True)
    t0 = time.perf_counter()
    lowered = {"prefill": generate.prefill.lower(
        params, cache, tokens, batch, k1, cfg=cfg, backend=backend, prefill=args.prefill,
        sampler=sampler)}
    run_prefill = lowered["prefill"].compile()
    r["prefill_compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    first_spec = jax.ShapeDtypeStruct((len(lens),), jnp.int32)
    lowered["decode"] = generate.decode.lower(
        params, cache, first_spec, k2, cfg=cfg, steps=steps, backend=backend, sampler=sampler,
        eos_id=args.eos_id, progress_every=every)
    run_decode = lowered["decode"].compile()
    r["decode_compile_s"] = time.perf_counter() - t0
    print(f"[{backend}] compiled in {r['prefill_compile_s']:.1f} s (prefill) + "
          f"{r['decode_compile_s']:.1f} s (decode)", flush=True)

    for it in range(args.warmup + 1):
        timed = it == args.warmup
        tag = f"[{backend}]" if timed else f"[{backend}] warm-up:"
        if it:  # the previous run's cache goes first (memory)
            del cache
            cache = kv_cache.init_cache(cfg, capacity, args.page_size, args.seed)
        t0 = time.perf_counter()
        cache, first, _ = run_prefill(params, cache, tokens, batch, k1)
        first.block_until_ready()
        r["prefill_s"] = time.perf_counter() - t0
        r["prefill_tok_per_s"] = sum(lens) / r["prefill_s"]
        print(f"{tag} prefill: {len(lens)} prompts, {sum(lens)} tokens in "
              f"{r['prefill_s'] * 1e3:.1f} ms ({r['prefill_tok_per_s']:,.0f} tok/s)", flush=True)
        t0 = time.perf_counter()
        cache, rest, steps_run, _ = run_decode(params, cache, first, k2)
        rest.block_until_ready()
        r["decode_s"] = time.perf_counter() - t0
        n = r["decode_steps"] = int(steps_run)
        r["decode_tok_per_s"] = len(lens) * n / r["decode_s"] if n else 0.0
        r["step_ms"] = r["decode_s"] / max(n, 1) * 1e3
        print(f"{tag} decode: {n} steps x {len(lens)} sequences in {r['decode_s']:.2f} s "
              f"({r['step_ms']:.2f} ms/step, {r['decode_tok_per_s']:,.0f} tok/s)", flush=True)
    out = np.concatenate([np.asarray(first)[:, None], np.asarray(rest)[:, :n]], axis=1)
    del cache
    return r, out, lowered


def explain_attention(cfg, lens, new_tokens, args):
    """{(phase, kind): None if the FA4 kernel takes that jax_fa4 call, else why not}."""
    return paths.explain_paths(paths.generation_calls(cfg, lens, new_tokens, args.page_size,
                                                      args.prefill))


def print_summary(cfg, runs):
    print("\n| attention | prefill tok/s | decode tok/s | ms/step | compile s (prefill, decode) |")
    print("| --- | --- | --- | --- | --- |")
    for r in runs:
        print(f"| {r['backend']} | {r['prefill_tok_per_s']:,.0f} | {r['decode_tok_per_s']:,.1f} | "
              f"{r['step_ms']:.2f} | {r['prefill_compile_s']:.1f}, {r['decode_compile_s']:.1f} |")
    for r in runs:
        print(f"\n{r['backend']}: attention path per layer type")
        for kind in ("local", "global"):
            win = f", window {cfg.window}" if kind == "local" else ""
            print(f"  {kind} (head_dim {cfg.head_dim(kind)}, {cfg.kv_heads(kind)} kv heads{win}):")
            for phase in ("prefill", "decode"):
                print(f"    {phase:8s} {r['paths'][f'{phase}/{kind}']}")


def main(argv=None):
    args = parse_args(argv)
    cfg, lens, new_tokens = setup(args)
    sampler = SamplerConfig(args.temperature, args.top_k, args.top_p)
    dev = jax.devices()[0]
    item = jnp.dtype(cfg.dtype).itemsize
    print(f"device: {dev.device_kind} ({dev.platform}); preset {args.preset}: "
          f"{cfg.num_layers} layers ({cfg.layer_kinds.count('global')} global), "
          f"{cfg.num_params() / 1e6:,.1f} M params ({cfg.num_params() * item / 2**30:.1f} GiB "
          f"{cfg.dtype}), KV cache {kv_cache.cache_bytes(cfg, [n + new_tokens for n in lens], args.page_size) / 2**30:.2f} GiB")
    print(f"batch {len(lens)}, prompt lengths {lens}, {new_tokens} new tokens, "
          f"page size {args.page_size}, prefill via {args.prefill}", flush=True)

    reasons = explain_attention(cfg, lens, new_tokens, args)
    failed = paths.check_all_fa4(cfg, reasons, {}) if args.assert_fa4 else []
    if failed:
        _fail_assert(failed)  # known before compiling anything

    t0 = time.perf_counter()
    params = model.init_params(cfg, args.seed)
    jax.block_until_ready(params)
    print(f"random weights: {time.perf_counter() - t0:.1f} s", flush=True)
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(2, cfg.vocab_size, n).astype(np.int32) for n in lens]

    runs, tokens = [], {}
    for backend in args.attention.split(","):
        r, tokens[backend], lowered = run_backend(backend, params, cfg, prompts, new_tokens,
                                                  args, sampler)
        if backend == "xla":
            r["paths"] = {f"{ph}/{kind}": "xla (jnp attention on the gathered cache)"
                          for ph, kind in reasons}
        else:
            r["paths"] = {f"{ph}/{kind}": paths.describe(why)
                          for (ph, kind), why in reasons.items()}
            r["kernel_calls"] = {ph: paths.count_kernel_calls(low) for ph, low in lowered.items()}
            if args.assert_fa4:
                failed += paths.check_all_fa4(cfg, {}, lowered)
        runs.append(r)
        print(f"[{backend}] first tokens (random weights: meaningless): " + "; ".join(
            " ".join(str(t) for t in row[:8]) for row in tokens[backend][:4]), flush=True)

    print_summary(cfg, runs)
    summary = dict(date=time.strftime("%Y-%m-%d"), device=dev.device_kind,
                   jax=jax.__version__, preset=args.preset, config=dataclasses.asdict(cfg),
                   prompt_lens=lens, new_tokens=new_tokens, page_size=args.page_size,
                   prefill=args.prefill, warmup=args.warmup, runs=runs)
    if len(tokens) > 1:
        a, b = list(tokens.values())[:2]
        n = min(a.shape[1], b.shape[1])
        summary["token_agreement"] = float((a[:, :n] == b[:, :n]).mean())
        print(f"\ntokens agree between {' and '.join(list(tokens)[:2])}: "
              f"{summary['token_agreement']:.1%}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1))
        print(f"wrote {args.json}")
    if args.assert_fa4:
        if failed:
            _fail_assert(failed)
        print("--assert-fa4: every attention call took the FA4 kernel")


def _fail_assert(problems):
    print("--assert-fa4: FAILED\n  " + "\n  ".join(problems), file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
