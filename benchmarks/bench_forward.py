"""Forward attention throughput on one GPU: jax_fa4 vs cuDNN vs XLA vs a direct launch.

  python benchmarks/bench_forward.py --out results.json [--quick]
  python benchmarks/plot_forward.py results.json docs/forward_tflops.png
  python benchmarks/bench_forward.py --set issue20 --out r.json --png r.png  # issue 20's rows

"jax_fa4" is `jax_fa4.attention` under jax.jit; "cudnn" and "xla" are
`jax.nn.dot_product_attention(implementation=...)` under jax.jit; "direct" launches
the same compiled FA4 object through the CuTe DSL runtime C API with ctypes,
bypassing XLA, and is timed with CUDA events.  JAX paths are timed with
block_until_ready over `--reps` back-to-back calls after warm-up ("tflops"), and from
the GPU trace of 8 chained calls in one program ("device_tflops": no host dispatch or
final sync, which the host clock spreads over --reps calls).
TFLOP/s = 4*b*h*sq*sk*d / time (halved for causal).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jax_fa4  # noqa: E402
from jax_fa4.api import kernel_plan  # noqa: E402
from jax_fa4.ffi_target import runtime_library_path  # noqa: E402
from jax_fa4.kernels import get_object  # noqa: E402
from jax_fa4.kernels.config import use_forward_persistent  # noqa: E402
from jax_fa4.kernels.forward_abi import size_dims  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import device_time  # noqa: E402


def flops(b, h, sq, sk, d, causal):
    f = 4.0 * b * h * sq * sk * d
    return f / 2 if causal else f


def time_jax(fn, args, reps, warmup=3):
    """Seconds per call of the jitted fn(q, k, v): host clock over `reps` back-to-back
    calls after warm-up (the first dispatch and the final sync are spread over reps)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    out = None
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def write_results(path, device, **data):
    """The run's JSON: the card, jax's version, the date and `data` (rows, a sweep)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(device=device, jax=jax.__version__, date=time.strftime("%Y-%m-%d"),
                       **data), f, indent=1)
    print(f"wrote {path}", flush=True)


class DirectLauncher:
    """Runs a jax_fa4 kernel object straight through libcute_dsl_runtime (no XLA)."""

    def __init__(self):
        self.rt = ctypes.CDLL(os.environ.get("JAX_FA4_CUTE_RUNTIME") or runtime_library_path())
        self.cu = ctypes.CDLL("libcuda.so.1")
        self.rt.CuteDSLRT_Module_Create_From_Bytes.argtypes = [
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_size_t,
            ctypes.c_void_p, ctypes.c_size_t]
        self.rt.CuteDSLRT_Module_Get_Function.argtypes = [
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p]
        self.rt.CuteDSLRT_Function_Run.argtypes = [
            ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        self.fns = {}

    def function(self, variant):
        if variant.symbol not in self.fns:
            obj = get_object(variant)
            mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
            assert self.rt.CuteDSLRT_Module_Create_From_Bytes(
                ctypes.byref(mod), obj, len(obj), None, 0) == 0
            assert self.rt.CuteDSLRT_Module_Get_Function(
                ctypes.byref(fn), mod, variant.symbol.encode()) == 0
            self.fns[variant.symbol] = fn
        return self.fns[variant.symbol]

    def time_attention(self, plan, scale, q, k, v, reps):
        """Seconds per launch of `plan`'s kernel on dense q, k, v, and its output (O
        starts as NaN, so an unwritten element shows; written in place by the launch)."""
        b, s, h = q.shape[:3]
        o = jnp.full((b, s, h, v.shape[-1]), jnp.nan, q.dtype)
        lse = jnp.zeros((b, h, s), jnp.float32)
        jax.block_until_ready((q, k, v, o, lse))
        return self.time(plan, scale, [q, k, v, o, lse], reps), o

    def time(self, plan, scale, buffers, reps, warmup=3):
        fn = self.function(plan.variant)
        stream = ctypes.c_void_p(0)  # legacy default stream; JAX work is finished first
        ptrs = [ctypes.c_void_p(b.unsafe_buffer_pointer()) for b in buffers]
        sizes = [ctypes.c_int32(buffers[i].shape[a]) for i, a in size_dims(plan.variant)]
        scalars = [ctypes.c_int32(plan.window_left), ctypes.c_int32(plan.window_right),
                   ctypes.c_float(scale)]
        ret = ctypes.c_int32(0)
        vals = [stream, *ptrs, *sizes, *scalars, ret]
        args = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.byref(x), ctypes.c_void_p)
                                               for x in vals])
        run = lambda: self.rt.CuteDSLRT_Function_Run(fn, args, len(vals))  # noqa: E731
        for _ in range(warmup):
            assert run() == 0 and ret.value == 0
        ev0, ev1 = ctypes.c_void_p(), ctypes.c_void_p()
        self.cu.cuEventCreate(ctypes.byref(ev0), 0)
        self.cu.cuEventCreate(ctypes.byref(ev1), 0)
        self.cu.cuEventRecord(ev0, stream)
        for _ in range(reps):
            run()
        self.cu.cuEventRecord(ev1, stream)
        self.cu.cuEventSynchronize(ev1)
        ms = ctypes.c_float()
        self.cu.cuEventElapsedTime(ctypes.byref(ms), ev0, ev1)
        return ms.value / 1e3 / reps


def bench_one(cfg, direct, reps, backends, xla_cap_bytes=30e9):
    b, s, h, hk, d, causal, dtype = (cfg[k] for k in ("b", "s", "h", "hk", "d", "causal", "dtype"))
    scale = cfg.get("scale", 1 / math.sqrt(d))
    dt = jnp.dtype(dtype)
    key = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(key[0], (b, s, h, d), dt)
    k = jax.random.normal(key[1], (b, s, hk, d), dt)
    v = jax.random.normal(key[2], (b, s, hk, d), dt)
    fl = flops(b, h, s, s, d, causal)
    res, outs = dict(cfg, tflops={}), {}
    for name in backends:
        # "<backend>_persistent": the same with the persistent dense forward
        # (kernels/forward_persistent.py), planned and traced inside the switch
        base = name.removesuffix("_persistent")
        try:
            with use_forward_persistent(base != name):
                outs[name] = _time_backend(res, name, base, q, k, v, scale, causal, fl,
                                           direct, reps, xla_cap_bytes)
            if base != name and outs.get(base) is not None and outs[name] is not None:
                # a timing never stands without a check of what it computed
                a, b = (x.astype(jnp.float32) for x in (outs[name], outs[base]))
                res.setdefault("rel_err_vs_plain", {})[name] = float(
                    jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        except Exception as e:  # record why a backend could not run this shape
            res["tflops"][name] = None
            res.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return res


def _time_backend(res, name, base, q, k, v, scale, causal, fl, direct, reps, xla_cap_bytes):
    b, s, h, d = q.shape
    if base == "direct":
        t, out = direct.time_attention(kernel_plan(q, k, v, is_causal=causal), scale, q, k, v,
                                       reps)
    else:
        if base == "xla" and b * h * s * s * 4 * 3 > xla_cap_bytes:
            raise MemoryError(f"XLA would materialize a >{xla_cap_bytes / 1e9:.0f} GB "
                              "score matrix")
        impl = {"jax_fa4": "fa4"}.get(base, base)
        fn = (jax_fa4.attention if base == "jax_fa4" else jax.nn.dot_product_attention)
        f = jax.jit(lambda q, k, v, fn=fn, impl=impl: fn(
            q, k, v, scale=scale, is_causal=causal, implementation=impl))
        return time_program(res, name, f, (q, k, v), fl, reps)
    res["tflops"][name] = fl / t / 1e12
    return out


def time_program(res, name, f, args, fl, reps):
    """Times the jitted f(q, k, v) -- host clock over `reps` calls ("tflops") and the GPU
    trace of 8 chained calls ("device_tflops") -- records both in `res` for backend
    `name` at `fl` FLOPs, and returns f's output (for a check of what it computed)."""
    t = time_jax(f, args, reps)
    res["tflops"][name] = fl / t / 1e12
    # the output (q's shape: V has q's head dim in these benchmarks) is the next query
    td = device_time.per_call(device_time.chain(
        lambda i, q, k, v, f=f: f(q, k, v).astype(q.dtype), 8), 8, *args)
    if td:
        res.setdefault("device_tflops", {})[name] = fl / td / 1e12
    return f(*args)


# Tile candidates tried by --tile-sweep (direct launches only), keyed by head dim:
# (tile_m, tile_n, P in registers[, K/V stages, CTAs per SM]).  The first of each head
# dim is FA4's own: every other tile's output is checked against its output.
SWEEP_TILES = {
    64: [(192, 128, True), (128, 128, True), (192, 192, True), (128, 192, True),
         (192, 96, True), (192, 128, False)],
    # 64-row tiles (one MMA warpgroup, as the decode tile) and 64 keys: less causal
    # masking waste and more thread blocks at issue 20's short sequences; the last two
    # keep two 64-row CTAs resident per SM (kernels/forward_occupancy.py: 80 KiB of
    # shared memory and 128 registers a thread each), so one CTA's fixed steps overlap
    # the other's GEMMs; the one-stage 64 x 128 tile at one CTA per SM before them is
    # their control (what the second CTA alone changes)
    128: [(128, 128, True), (128, 176, True), (128, 96, True), (192, 128, False),
          (128, 64, True), (64, 128, True), (64, 128, True, 1, 1), (64, 128, True, 1, 2),
          (64, 64, True, 2, 2)],
}
# Sequence lengths swept per head dim (batch = 32768 // s): issue 20's short rows
# (b64 s512, b32 s1024, b16 s2048 at head dim 128) and a long one.
SWEEP_SEQS = {64: (1024, 4096), 128: (512, 1024, 2048, 4096)}


def _sweep_tile(t):
    from jax_fa4.kernels import TileConfig

    tm, tn, rs, stages, ctas = tuple(t) + (2, 1)[len(t) - 3:]  # defaults: 2 stages, 1 CTA/SM
    return TileConfig(tm, tn, rs, True, num_stages=stages, ctas_per_sm=ctas)


def sweep_variants(match=None):
    """(config, variant) pairs for --tile-sweep; also used to precompile them.  `match`:
    comma-separated substrings, of which a tile's description (TileConfig.describe)
    must hold one; the first (reference) tile of each head dim is always kept."""
    import dataclasses

    from jax_fa4.kernels import ForwardVariant

    parts = [m for m in (match or "").split(",") if m]

    out = []
    for d, tiles in SWEEP_TILES.items():
        for s in SWEEP_SEQS[d]:
            for causal in (False, True):
                h = 2048 // d
                cfg = dict(b=32768 // s, s=s, h=h, hk=h, d=d, causal=causal, dtype="bfloat16")
                base = ForwardVariant("bfloat16", d, d, 1, "causal" if causal else "none")
                for i, t in enumerate(tiles):
                    tile = _sweep_tile(t)
                    if i == 0 or not parts or any(m in tile.describe() for m in parts):
                        out.append((cfg, dataclasses.replace(base, tile=tile)))
    return out


def tile_sweep(direct, reps, match=None):
    """TFLOP/s of each tile by direct launch, and each tile's output against the first
    (FA4's) tile's on the same inputs: a timing never stands without a check of what it
    computed."""
    from jax_fa4.dispatch import KernelPlan

    rows, ref = [], {}
    for cfg, variant in sweep_variants(match):
        b, s, h, d, causal = (cfg[k] for k in ("b", "s", "h", "d", "causal"))
        key = jax.random.split(jax.random.PRNGKey(0), 3)
        q, k, v = (jax.random.normal(kk, (b, s, h, d), jnp.bfloat16) for kk in key)
        t, err = variant.tile, None
        try:
            sec, out = direct.time_attention(KernelPlan(variant, 0, 0), 1 / math.sqrt(d),
                                             q, k, v, reps)
            tf = flops(b, h, s, s, d, causal) / sec / 1e12
            out = out.astype(jnp.float32)
            first = ref.setdefault(json.dumps(cfg, sort_keys=True), out)
            err = float(jnp.linalg.norm(out - first) / jnp.linalg.norm(first))
        except Exception as e:  # a tile that does not fit or fails to load
            tf = None
            print(f"  {variant.describe()}: {type(e).__name__}: {e}", flush=True)
        rows.append(dict(cfg, tile=[t.tile_m, t.tile_n, t.mma_pv_is_rs], tflops=tf,
                         persistent=t.persistent, num_stages=t.num_stages,
                         ctas_per_sm=t.ctas_per_sm, rel_err_vs_first_tile=err))
        print(f"sweep b{b} s{s} d{d} {'causal' if causal else 'full'} {t.describe()}: "
              f"{tf and round(tf, 1)}  (rel. error vs the first tile {err})", flush=True)
    return rows


def configs(quick):
    out = [dict(b=4, s=8192, h=16, hk=16, d=128, causal=True, dtype="bfloat16", headline=True)]
    seqs = (1024, 4096, 8192) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    for d in (64, 128, 256):
        for causal in (False, True):
            for s in seqs:
                h = 2048 // d
                out.append(dict(b=max(1, 32768 // s), s=s, h=h, hk=h, d=d, causal=causal,
                                dtype="bfloat16"))
    return out


def _row(b, s, h, hk, d, causal, label, **kw):
    return dict(b=b, s=s, h=h, hk=hk, d=d, causal=causal, dtype="bfloat16", label=label, **kw)


# Issue 20's rows (its table, the short-sequence / many-batch shapes, head dim 512 at
# Gemma-4's global shapes, and the two published SM90 forward figures).
ISSUE20 = (
    [_row(4, 8192, 16, 16, 128, True, "d128 causal b4 s8k"),
     _row(4, 8192, 16, 16, 128, False, "d128 b4 s8k"),
     _row(2, 8192, 16, 16, 64, True, "d64 causal b2 s8k"),
     _row(4, 4096, 8, 8, 256, True, "d256 causal b4 s4k"),
     _row(4, 4096, 8, 8, 256, False, "d256 b4 s4k"),
     _row(32, 1024, 16, 16, 128, True, "d128 causal b32 s1k"),
     _row(1, 8192, 32, 4, 512, True, "d512 causal b1 s8k 32/4 (Gemma-4)", scale=1.0),
     _row(4, 4096, 8, 8, 512, True, "d512 causal b4 s4k", scale=1.0),
     _row(1, 17408, 40, 40, 128, False, "published: d128 h40 s17k"),
     _row(1, 16384, 32, 2, 256, True, "published: d256 causal 32/2 s16k")]
    + [_row(b, s, 16, 16, 128, causal, f"short: d128{' causal' if causal else ''} b{b} s{s}")
       for s, b in ((512, 64), (1024, 32), (2048, 16)) for causal in (True, False)])

# What `python -m jax_fa4.precompile --calls benchmarks/bench_forward.py` builds.
CALLS = [dict(query=((c["b"], c["s"], c["h"], c["d"]), c["dtype"]),
              key=((c["b"], c["s"], c["hk"], c["d"]), c["dtype"]),
              value=((c["b"], c["s"], c["hk"], c["d"]), c["dtype"]), is_causal=c["causal"],
              **({"scale": c["scale"]} if "scale" in c else {})) for c in ISSUE20]


def bar_chart(results, names, value, label, ylabel, title, path):
    """Bars of value(row, backend) per row (label(row) under each group), one colour per
    backend of `names` that has a value anywhere; bench_backward draws with it too."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in names if any(value(r, n) for r in results)]
    fig, ax = plt.subplots(figsize=(max(8, 0.8 * len(results)), 4.5))
    w = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        ax.bar([j + i * w for j in range(len(results))],
               [value(r, n) or 0 for r in results], w, label=n)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(results))])
    ax.set_xticklabels([label(r) for r in results], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}, {time.strftime('%Y-%m-%d')}")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def plot_rows(results, device, path):
    """Bars of TFLOP/s per shape: jax_fa4 beside cuDNN and XLA."""
    bar_chart(results, ("jax_fa4", "jax_fa4_persistent", "cudnn", "xla"),
              lambda r, n: r["tflops"].get(n),
              lambda r: r.get("label", ""), "TFLOP/s", f"forward attention, bf16, {device}",
              path)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/forward.json")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--set", choices=("default", "issue20"), default="default")
    p.add_argument("--png", help="bars of TFLOP/s per shape")
    p.add_argument("--backends", default="jax_fa4,cudnn,xla,direct")
    p.add_argument("--tile-sweep", action="store_true",
                   help="only time alternative tiles (SWEEP_TILES) by direct launch")
    p.add_argument("--sweep-match", metavar="TEXT[,TEXT]",
                   help="with --tile-sweep / --sweep-specs: only the tiles whose "
                        "description holds one of these (e.g. '/SM,1 stage'), and each "
                        "head dim's first")
    p.add_argument("--sweep-specs", action="store_true",
                   help="print the tile sweep's variant specs, one per line (for "
                        "python -m jax_fa4.precompile --variant)")
    args = p.parse_args()
    if args.sweep_specs:
        from jax_fa4.kernels.compile import variant_spec
        for spec in dict.fromkeys(variant_spec(v) for _, v in sweep_variants(args.sweep_match)):
            print(spec)
        return
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}", flush=True)
    direct = DirectLauncher()
    if args.tile_sweep:
        rows = tile_sweep(direct, args.reps, args.sweep_match)
        write_results(args.out, dev.device_kind, sweep=rows)
        return
    backends = args.backends.split(",")
    results = []
    cfgs = configs(args.quick) if args.set == "default" else ISSUE20
    for i, cfg in enumerate(cfgs, 1):
        r = bench_one(cfg, direct, args.reps, backends)
        results.append(r)
        cells = "  ".join(f"{n}={v:7.1f}" if v else f"{n}=   n/a" for n, v in r["tflops"].items())
        errs = "".join(f"  err({n})={e:.1e}" for n, e in r.get("rel_err_vs_plain", {}).items())
        print(f"[{i}/{len(cfgs)}] b{r['b']} s{r['s']} h{r['h']} d{r['d']} "
              f"{'causal' if r['causal'] else 'full  '} {cells}{errs}", flush=True)
    write_results(args.out, dev.device_kind, results=results)
    if args.png:
        plot_rows(results, dev.device_kind, args.png)


if __name__ == "__main__":
    sys.exit(main())
