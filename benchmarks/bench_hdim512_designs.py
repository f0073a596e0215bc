"""Head dim 512 forward: split-K-exchange kernel (kernels/forward_hdim512_splitk.py) vs
the split-PV kernel (if importable) vs XLA, outside jax_fa4's dispatcher.

  CPU:  python benchmarks/bench_hdim512_designs.py --compile OUT [--split-pv PATH]
        compiles each variant through a small @cute.jit launcher (forward.py's argument
        convention) and writes OUT/<name>.o plus OUT/manifest.json.
  GPU:  python benchmarks/bench_hdim512_designs.py --run OUT [--json results.json]
        launches those objects through the FFI handler (jax.ffi.ffi_call of
        jax_fa4_cute_call with the attributes primitive._lower_cuda emits), checks them
        against a float32 reference (poisoned outputs, lengths 1/17/333/4097), then
        times them and XLA's jax.nn.dot_product_attention in the same process.

TFLOP/s = 4*b*h*sq*sk*d / time, halved for causal; jitted calls, block_until_ready over
--reps back-to-back calls after warm-up.  --split-pv names a checkout holding
jax_fa4/kernels/forward_hdim512.py (FlashAttentionForwardSm90SplitPV); it is imported
from there, never copied.
"""
import argparse
import importlib.util
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jax_fa4.kernels.config import ForwardVariant, TileConfig  # noqa: E402
from jax_fa4.kernels.forward_abi import size_dims  # noqa: E402

HDIM = 512
# (name, design, group, mask) compiled by --compile.  group > 1: packed GQA.
VARIANTS = [
    (f"{design}_g{g}_{mask}", design, g, mask)
    for design in ("split_k", "split_pv")
    for g in (8, 1)
    for mask in ("causal", "none")
] + [("split_k_g8_local", "split_k", 8, "local")]
# Timed shapes (b, s, h, h_kv).
BENCH_SHAPES = [(2, 8192, 32, 4), (4, 4096, 8, 8)]
CHECK_LENGTHS = (1, 17, 333, 4097)
LOCAL_WINDOW = (100, 0)  # jax.nn convention (left, right), runtime int32 arguments


def variant(design: str, group: int, mask: str) -> ForwardVariant:
    tile = TileConfig(64, 64, mma_pv_is_rs=design == "split_k", intra_wg_overlap=True,
                      num_stages=1)
    local = mask == "local"
    return ForwardVariant("bfloat16", HDIM, HDIM, group, mask, window_left=local,
                          window_right=local, tile=tile)


# ---------------------------------------------------------------- compile (CPU) ----
def compile_object(design: str, v: ForwardVariant, symbol: str, split_pv_path: str | None):
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute
    from cutlass import Float32, Int32
    from cutlass.cute.runtime import make_ptr

    from jax_fa4.kernels.forward import _tensors
    from jax_fa4.kernels.forward_abi import operands

    if design == "split_k":
        from jax_fa4.kernels.forward_hdim512_splitk import FlashAttentionForwardSm90SplitK as K
    else:
        spec = importlib.util.spec_from_file_location(
            "split_pv_kernel", os.path.join(split_pv_path, "jax_fa4/kernels/forward_hdim512.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        K = mod.FlashAttentionForwardSm90SplitPV
    t = v.tile
    dt = cutlass.BFloat16
    fa = K(dt, v.head_dim, v.head_dim_v, v.qhead_per_kvhead,
           is_causal=v.mask == "causal", is_local=v.mask == "local", pack_gqa=v.pack_gqa,
           tile_m=t.tile_m, tile_n=t.tile_n, num_stages=t.num_stages, num_threads=384,
           Q_in_regs=False, intra_wg_overlap=t.intra_wg_overlap, mma_pv_is_rs=t.mma_pv_is_rs)
    local = v.mask == "local"

    @cute.jit
    def launch(stream: cuda.CUstream, *args):
        # forward.py's convention: pointers, o, lse, every operand dim, wl, wr, scale.
        wl, wr, scale = args[-3], args[-2], args[-1]
        ts = _tensors(v, args[:-3])
        fa(ts["q"], ts["k"], ts["v"], ts["o"], ts["lse"], scale, None, None, None, None, None,
           wl if cutlass.const_expr(local) else None,
           wr if cutlass.const_expr(local) else None, None, stream=stream)

    gmem = cute.AddressSpace.gmem
    ptrs = [make_ptr(dt, 16, gmem, assumed_align=16) for _ in operands(v)]
    ptrs += [make_ptr(dt, 16, gmem, assumed_align=16), make_ptr(Float32, 4, gmem, assumed_align=4)]
    sizes = [Int32(1) for _ in size_dims(v)]
    compiled = cute.compile(launch, cuda.CUstream(0), *ptrs, *sizes, Int32(0), Int32(0),
                            Float32(1.0))
    return compiled.dump_to_object(symbol)


def do_compile(out: str, split_pv_path: str | None, only: list[str] | None):
    os.makedirs(out, exist_ok=True)
    mpath = os.path.join(out, "manifest.json")
    manifest = json.load(open(mpath)) if os.path.exists(mpath) else {}
    for name, design, group, mask in VARIANTS:
        if only and name not in only:
            continue
        if design == "split_pv" and not split_pv_path:
            continue
        v = variant(design, group, mask)
        symbol = f"hd512_{name}"
        t0 = time.time()
        try:
            obj = compile_object(design, v, symbol, split_pv_path)
        except Exception as e:  # report and go on with the other variants
            print(f"{name}: compile FAILED: {type(e).__name__}: {e}", flush=True)
            continue
        with open(os.path.join(out, name + ".o"), "wb") as f:
            f.write(obj)
        manifest[name] = dict(design=design, group=group, mask=mask, symbol=symbol,
                              variant=v.as_dict(), size_dims=size_dims(v))
        print(f"{name}: {len(obj)} bytes in {time.time() - t0:.0f}s", flush=True)
        with open(mpath, "w") as f:
            json.dump(manifest, f, indent=1)


# ------------------------------------------------------------------- run (GPU) ----
def ffi_attention(entry, obj, q, k, v, window):
    """The custom call primitive._lower_cuda emits, issued directly with ffi_call."""
    import jax
    import jax.numpy as jnp

    b, s, h, _ = q.shape
    out_types = (jax.ShapeDtypeStruct((b, s, h, HDIM), q.dtype),
                 jax.ShapeDtypeStruct((b, h, s), jnp.float32))
    wl, wr = window
    return jax.ffi.ffi_call("jax_fa4_cute_call", out_types)(
        q, k, v,
        object=np.frombuffer(obj, dtype=np.uint8),
        symbol=entry["symbol"],
        size_dims=np.asarray(entry["size_dims"], dtype=np.int64).reshape(-1),
        i32_scalars=np.asarray([wl, wr], dtype=np.int32),
        f32_scalars=np.asarray([1 / math.sqrt(HDIM)], dtype=np.float32),
    )


def fa4_window(mask, s):
    """FA4 window bounds for sq == sk (no alignment offset): jax.nn's (left, right)."""
    return LOCAL_WINDOW if mask == "local" else (0, 0)


def reference(q, k, v, mask):
    import jax
    import jax.numpy as jnp

    g = q.shape[2] // k.shape[2]
    kf, vf = (jnp.repeat(x.astype(jnp.float32), g, axis=2) for x in (k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kf) / math.sqrt(HDIM)
    i = jnp.arange(q.shape[1])[:, None]
    j = jnp.arange(k.shape[1])[None, :]
    if mask == "causal":
        s = jnp.where(j <= i, s, -jnp.inf)
    elif mask == "local":
        left, right = LOCAL_WINDOW
        s = jnp.where((j >= i - left) & (j <= i + right), s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(s - lse[..., None]), vf)
    return o, lse


def check(entry, obj, jax, jnp):
    from jax_fa4 import ffi_target

    g, mask = entry["group"], entry["mask"]
    worst = 0.0
    ffi_target.set_poison_outputs(True)
    try:
        for n in CHECK_LENGTHS:
            hk = 2
            key = jax.random.split(jax.random.PRNGKey(n), 3)
            q = jax.random.normal(key[0], (1, n, hk * g, HDIM), jnp.bfloat16)
            k = jax.random.normal(key[1], (1, n, hk, HDIM), jnp.bfloat16)
            v = jax.random.normal(key[2], (1, n, hk, HDIM), jnp.bfloat16)
            o, lse = jax.jit(lambda q, k, v: ffi_attention(entry, obj, q, k, v,
                                                           fa4_window(mask, n)))(q, k, v)
            ro, rlse = reference(q, k, v, mask)
            o32 = o.astype(jnp.float32)
            nan = bool(jnp.isnan(o32).any() | jnp.isnan(lse).any())
            err = float(jnp.linalg.norm(o32 - ro) / jnp.linalg.norm(ro))
            lerr = float(jnp.max(jnp.abs(lse - rlse)))
            worst = max(worst, err if not nan else float("inf"))
            print(f"  check L={n}: rel err {err:.2e}, lse max abs err {lerr:.2e}"
                  f"{'  NaN!' if nan else ''}", flush=True)
    finally:
        ffi_target.set_poison_outputs(False)
    return worst


def time_fn(f, args, reps, jax, warmup=2):
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    out = None
    for _ in range(reps):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def do_run(src: str, json_out: str | None, reps: int, xla: bool):
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    import jax
    import jax.numpy as jnp

    from jax_fa4.ffi_target import ensure_registered

    ensure_registered()
    manifest = json.load(open(os.path.join(src, "manifest.json")))
    objs = {n: open(os.path.join(src, n + ".o"), "rb").read() for n in manifest}
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    results = dict(device=jax.devices()[0].device_kind, date=time.strftime("%Y-%m-%d"),
                   checks={}, timings=[])
    for name, entry in manifest.items():
        print(f"{name}:", flush=True)
        try:
            results["checks"][name] = check(entry, objs[name], jax, jnp)
        except Exception as e:
            results["checks"][name] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"  FAILED {results['checks'][name]}", flush=True)
    for b, s, h, hk in BENCH_SHAPES:
        key = jax.random.split(jax.random.PRNGKey(0), 3)
        q = jax.random.normal(key[0], (b, s, h, HDIM), jnp.bfloat16)
        k = jax.random.normal(key[1], (b, s, hk, HDIM), jnp.bfloat16)
        v = jax.random.normal(key[2], (b, s, hk, HDIM), jnp.bfloat16)
        for mask in ("causal", "none"):
            fl = 4.0 * b * h * s * s * HDIM / (2 if mask == "causal" else 1)
            row = dict(b=b, s=s, h=h, hk=hk, mask=mask, tflops={})
            for name, entry in manifest.items():
                if entry["mask"] != mask or entry["group"] != h // hk:
                    continue
                ok = results["checks"].get(name)
                if not isinstance(ok, float) or ok > 1e-2:
                    continue
                f = jax.jit(lambda q, k, v, e=entry, o=objs[name]: ffi_attention(
                    e, o, q, k, v, (0, 0)))
                row["tflops"][entry["design"]] = fl / time_fn(f, (q, k, v), reps, jax) / 1e12
            if xla:
                try:
                    f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
                        q, k, v, is_causal=mask == "causal", implementation="xla"))
                    row["tflops"]["xla"] = fl / time_fn(f, (q, k, v), max(3, reps // 4),
                                                        jax, warmup=1) / 1e12
                except Exception as e:
                    row["tflops"]["xla"] = None
                    row["xla_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            results["timings"].append(row)
            cells = "  ".join(f"{n}={t:6.1f}" if t else f"{n}=  n/a"
                              for n, t in row["tflops"].items())
            print(f"b{b} s{s} h{h}/{hk} d512 {mask:6s} TFLOP/s: {cells}", flush=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(results, f, indent=1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--compile", metavar="OUT")
    p.add_argument("--split-pv", metavar="CHECKOUT", help="tree with forward_hdim512.py")
    p.add_argument("--only", help="comma-separated variant names to compile")
    p.add_argument("--run", metavar="SRC")
    p.add_argument("--json")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-xla", action="store_true")
    a = p.parse_args()
    if a.compile:
        do_compile(a.compile, a.split_pv, a.only.split(",") if a.only else None)
    if a.run:
        do_run(a.run, a.json, a.reps, not a.no_xla)


if __name__ == "__main__":
    sys.exit(main())
