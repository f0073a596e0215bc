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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_forward

from jax_fa4.kernels.config import ForwardVariant, TileConfig  # noqa: E402
from jax_fa4.kernels.forward_abi import size_dims  # noqa: E402

HDIM = 512


def _v(name, design, group, mask, **extra):
    return dict(name=name, design=design, group=group, mask=mask, **extra)


# What --compile builds.  group > 1: packed GQA.  kind: dense / varlen (q and kv packed)
# / paged (dense q, paged kv: by TMA when the page is one 64-row K/V tile, else cp.async).
VARIANTS = [
    _v(f"{design}_g{g}_{mask}", design, g, mask, kind="dense")
    for design in ("split_k", "split_pv")
    for g in (8, 1)
    for mask in ("causal", "none")
] + [
    _v("split_k_g8_local", "split_k", 8, "local", kind="dense"),
    _v("split_k_g8_causal_softcap", "split_k", 8, "causal", kind="dense", softcap=30.0),
    _v("split_k_g8_causal_sinks", "split_k", 8, "causal", kind="dense", sinks=True),
    _v("split_k_g8_causal_varlen", "split_k", 8, "causal", kind="varlen"),
    _v("split_k_g8_causal_paged_tma", "split_k", 8, "causal", kind="paged", page=64),
    _v("split_k_g8_causal_paged_cpasync", "split_k", 8, "causal", kind="paged", page=32),
]
# Timed shapes (b, s, h, h_kv), dense.
BENCH_SHAPES = [(2, 8192, 32, 4), (4, 4096, 8, 8), (1, 32768, 16, 2)]
# XLA materializes the b*h*s*s scores: skipped above this many.
XLA_MAX_SCORES = 1e10  # b2 s8192 h32: 4.3e9; b1 s32768 h16 (1.7e10) runs out of memory
CHECK_LENGTHS = (1, 17, 333, 4097)
LOCAL_WINDOW = (100, 0)  # jax.nn convention (left, right), runtime int32 arguments


def variant(e: dict) -> ForwardVariant:
    design, kind, local = e["design"], e["kind"], e["mask"] == "local"
    tile = TileConfig(64, 64, mma_pv_is_rs=design == "split_k", intra_wg_overlap=True,
                      num_stages=1)
    return ForwardVariant(
        "bfloat16", HDIM, HDIM, e["group"], e["mask"], window_left=local, window_right=local,
        softcap=e.get("softcap"), has_sinks=e.get("sinks", False),
        q_layout="packed" if kind == "varlen" else "dense",
        kv_layout={"dense": "dense", "varlen": "packed", "paged": "paged"}[kind],
        has_seqused_k=kind == "paged", paged_tma=kind == "paged" and e["page"] == 64,
        tile=tile)


# ---------------------------------------------------------------- compile (CPU) ----
def compile_object(design: str, v: ForwardVariant, symbol: str, split_pv_path: str | None):
    # For sm_90a whatever an earlier compile left in the DSL (compile_variant resets it).
    from jax_fa4.kernels.compile import target_sm90

    with target_sm90():
        return _compile_object(design, v, symbol, split_pv_path)


def _compile_object(design: str, v: ForwardVariant, symbol: str, split_pv_path: str | None):
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute

    from flash_attn.cute import utils as fa_utils

    from jax_fa4.kernels.forward import _tensors, compile_launcher

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
           Q_in_regs=False, intra_wg_overlap=t.intra_wg_overlap, mma_pv_is_rs=t.mma_pv_is_rs,
           score_mod=fa_utils.create_softcap_scoremod(v.softcap) if v.softcap else None,
           paged_kv_non_tma=v.kv_layout == "paged" and not v.paged_tma)
    local = v.mask == "local"

    @cute.jit
    def launch(stream: cuda.CUstream, *args):
        # forward.py's convention: pointers, o, lse, every operand dim, wl, wr, scale.
        wl, wr, scale = args[-3], args[-2], args[-1]
        ts = _tensors(v, args[:-3])
        fa(ts["q"], ts["k"], ts["v"], ts["o"], ts["lse"], scale,
           ts.get("cu_seqlens_q"), ts.get("cu_seqlens_k"), ts.get("seqused_q"),
           ts.get("seqused_k"), ts.get("page_table"),
           wl if cutlass.const_expr(local) else None,
           wr if cutlass.const_expr(local) else None, ts.get("sinks"), stream=stream)

    return compile_launcher(launch, v, symbol)


def do_compile(out: str, split_pv_path: str | None, only: list[str] | None):
    os.makedirs(out, exist_ok=True)
    mpath = os.path.join(out, "manifest.json")
    manifest = json.load(open(mpath)) if os.path.exists(mpath) else {}
    for e in VARIANTS:
        name, design = e["name"], e["design"]
        if only and name not in only:
            continue
        if design == "split_pv" and not split_pv_path:
            continue
        v = variant(e)
        symbol = f"hd512_{name}"
        t0 = time.time()
        try:
            obj = compile_object(design, v, symbol, split_pv_path)
        except Exception as e:  # report and go on with the other variants
            print(f"{name}: compile FAILED: {type(e).__name__}: {e}", flush=True)
            continue
        with open(os.path.join(out, name + ".o"), "wb") as f:
            f.write(obj)
        manifest[name] = dict(e, symbol=symbol, variant=v.as_dict(), size_dims=size_dims(v))
        print(f"{name}: {len(obj)} bytes in {time.time() - t0:.0f}s", flush=True)
        with open(mpath, "w") as f:
            json.dump(manifest, f, indent=1)


# ------------------------------------------------------------------- run (GPU) ----
def ffi_attention(entry, obj, ops: dict, window):
    """The custom call primitive._lower_cuda emits, issued directly with ffi_call.
    `ops`: operands by forward_abi name; returns (o, lse) laid out as the kernel does."""
    import jax
    import jax.numpy as jnp

    from jax_fa4.kernels.forward_abi import operands

    v = ForwardVariant.from_dict(entry["variant"])
    q = ops["q"]
    lse_shape = (q.shape[0], q.shape[2], q.shape[1]) if q.ndim == 4 else (q.shape[1], q.shape[0])
    out_types = (jax.ShapeDtypeStruct(q.shape[:-1] + (HDIM,), q.dtype),
                 jax.ShapeDtypeStruct(lse_shape, jnp.float32))
    return jax.ffi.ffi_call("jax_fa4_cute_call", out_types)(
        *[ops[name] for name, _ in operands(v)],
        object=np.frombuffer(obj, dtype=np.uint8),
        symbol=entry["symbol"],
        size_dims=np.asarray(entry["size_dims"], dtype=np.int64).reshape(-1),
        i32_scalars=np.asarray(window, dtype=np.int32),
        f32_scalars=np.asarray([1 / math.sqrt(HDIM)], dtype=np.float32),
    )


def check_case(entry, n, jax, jnp):
    """(operands, reference (o, lse) in float32) for one check of `entry` at length n."""
    from jax_fa4 import fallback_forward as fallback

    g, kind, hk = entry["group"], entry["kind"], 2
    window = {"causal": (None, 0), "local": LOCAL_WINDOW, "none": (None, None)}[entry["mask"]]
    common = dict(scale=1 / math.sqrt(HDIM), window=window, softcap=entry.get("softcap"))
    key = jax.random.split(jax.random.PRNGKey(n), 4)
    rnd = lambda i, shape: jax.random.normal(key[i], shape, jnp.bfloat16)  # noqa: E731
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ops = {}
    if entry.get("sinks"):
        ops["sinks"] = jax.random.normal(key[3], (hk * g,), jnp.float32)
    if kind == "dense":
        ops.update(q=rnd(0, (1, n, hk * g, HDIM)), k=rnd(1, (1, n, hk, HDIM)),
                   v=rnd(2, (1, n, hk, HDIM)))
        ref = fallback.reference_attention(f32(ops["q"]), f32(ops["k"]), f32(ops["v"]),
                                           ops.get("sinks"), **common)
    elif kind == "varlen":  # three sequences: n, 17 and 333 rows (q and kv alike)
        lens = [n, 17, 333]
        cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
        tot = int(cu[-1])
        ops.update(q=rnd(0, (tot, hk * g, HDIM)), k=rnd(1, (tot, hk, HDIM)),
                   v=rnd(2, (tot, hk, HDIM)), cu_seqlens_q=cu, cu_seqlens_k=cu)
        ref = fallback.varlen_fallback(
            f32(ops["q"]), f32(ops["k"]), f32(ops["v"]), cu, cu, None, None, ops.get("sinks"),
            max_seqlen_q=max(lens), max_seqlen_k=max(lens), **common)
    else:  # paged: 3 sequences of n query rows over n, n+50, 2n+7 keys in shuffled pages
        page = entry["page"]
        used = np.asarray([n, n + 50, 2 * n + 7], np.int32)
        per = -(-int(used.max()) // page)
        pages = np.random.default_rng(n).permutation(3 * per + 5)[: 3 * per].reshape(3, per)
        ops.update(q=rnd(0, (3, n, hk * g, HDIM)), k=rnd(1, (3 * per + 5, page, hk, HDIM)),
                   v=rnd(2, (3 * per + 5, page, hk, HDIM)),
                   seqused_k=jnp.asarray(used), page_table=jnp.asarray(pages, jnp.int32))
        ref = fallback.paged_fallback(
            f32(ops["q"]), f32(ops["k"]), f32(ops["v"]), ops["page_table"], ops["seqused_k"],
            None, None, ops.get("sinks"), max_seqlen_q=n, **common)
    return ops, ref


def fa4_window(mask):
    """The kernel's runtime window scalars (FA4 convention; sq == sk in the checks)."""
    return LOCAL_WINDOW if mask == "local" else (0, 0)


def check(entry, obj, jax, jnp):
    from jax_fa4 import ffi_target

    worst = 0.0
    ffi_target.set_poison_outputs(True)
    try:
        for n in CHECK_LENGTHS:
            ops, (ro, rlse) = check_case(entry, n, jax, jnp)
            o, lse = jax.jit(lambda ops: ffi_attention(entry, obj, ops,
                                                       fa4_window(entry["mask"])))(ops)
            o32 = o.astype(jnp.float32)
            nan = bool(jnp.isnan(o32).any() | jnp.isnan(lse).any())
            err = float(jnp.linalg.norm(o32 - ro) / jnp.linalg.norm(ro))
            fin = jnp.isfinite(rlse)
            lerr = float(jnp.max(jnp.where(fin, jnp.abs(lse - rlse), 0.0)))
            lbad = bool(jnp.any(fin != jnp.isfinite(lse)))
            worst = max(worst, err if not (nan or lbad) else float("inf"))
            print(f"  check L={n}: rel err {err:.2e}, lse max abs err {lerr:.2e}"
                  f"{'  NaN!' if nan else ''}{'  lse -inf mismatch!' if lbad else ''}",
                  flush=True)
    finally:
        ffi_target.set_poison_outputs(False)
    return worst


def do_run(src: str, json_out: str | None, reps: int, xla: bool, only: list[str] | None):
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    import jax
    import jax.numpy as jnp

    from bench_forward import time_jax

    from jax_fa4.ffi_target import ensure_registered

    ensure_registered()
    manifest = json.load(open(os.path.join(src, "manifest.json")))
    manifest = {n: e for n, e in manifest.items() if not only or n in only}
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
                if (entry["mask"] != mask or entry["group"] != h // hk or entry["kind"] != "dense"
                        or entry.get("softcap") or entry.get("sinks")):
                    continue
                ok = results["checks"].get(name)
                if not isinstance(ok, float) or ok > 1e-2:
                    continue
                f = jax.jit(lambda q, k, v, e=entry, o=objs[name]: ffi_attention(
                    e, o, dict(q=q, k=k, v=v), (0, 0)))
                row["tflops"][entry["design"]] = fl / time_jax(f, (q, k, v), reps) / 1e12
            if xla and b * h * s * s <= XLA_MAX_SCORES:
                try:
                    f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
                        q, k, v, is_causal=mask == "causal", implementation="xla"))
                    row["tflops"]["xla"] = fl / time_jax(f, (q, k, v), max(3, reps // 4),
                                                         warmup=1) / 1e12
                except Exception as e:
                    row["tflops"]["xla"] = None
                    row["xla_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if not row["tflops"]:
                continue
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
    p.add_argument("--only", help="comma-separated variant names to compile / run")
    p.add_argument("--run", metavar="SRC")
    p.add_argument("--json")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-xla", action="store_true")
    a = p.parse_args()
    if a.compile:
        do_compile(a.compile, a.split_pv, a.only.split(",") if a.only else None)
    if a.run:
        do_run(a.run, a.json, a.reps, not a.no_xla, a.only.split(",") if a.only else None)


if __name__ == "__main__":
    sys.exit(main())
