"""Build kernel objects ahead of time, on any host with jax_fa4[compile] (no GPU).

Three ways to say what to build:

  # a product of variant properties
  python -m jax_fa4.precompile --dtype bfloat16,float16 --head-dim 64,128,256 \\
      --group 1,8 --mask none,causal,local --softcap none,50 --sinks no

  # the variants that listed calls need: FILE.py defines CALLS, a list of dicts with
  # 'query', 'key', 'value' as (shape, dtype) and attention's keyword arguments
  python -m jax_fa4.precompile --calls my_calls.py
  # ... and the backward kernels their gradients need (--deterministic: those of
  # deterministic=True, for every call; a call's own 'deterministic': True does it
  # for that call)
  python -m jax_fa4.precompile --calls my_calls.py --backward [--deterministic]

  # exactly the variants named (what a MissingKernelError under JAX_FA4_COMPILE=never
  # prints, ready to paste): JSON of the variant's kind and fields
  python -m jax_fa4.precompile --variant '{"kind":"sm90_forward","dtype":"bfloat16",...}'

Objects go to --cache-dir (default: JAX_FA4_CACHE_DIR or ~/.cache/jax_fa4/kernels);
copy that directory to the GPU hosts and point JAX_FA4_CACHE_DIR at it there
(with JAX_FA4_COMPILE=never to forbid compiling).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import itertools
import multiprocessing
import os
import sys
import time

from .kernels.config import ForwardVariant


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def variants_from_matrix(args) -> list[ForwardVariant]:
    out = []
    for dtype, hd, group, mask, cap, sinks in itertools.product(
        _split(args.dtype), _split(args.head_dim), _split(args.group), _split(args.mask),
        _split(args.softcap), _split(args.sinks),
    ):
        h, _, hv = hd.partition("/")
        windows = [(True, True), (True, False), (False, True)] if mask == "local" else [(False, False)]
        for wl, wr in windows:
            out.append(ForwardVariant(
                dtype=dtype, head_dim=int(h), head_dim_v=int(hv or h), qhead_per_kvhead=int(group),
                mask=mask, window_left=wl, window_right=wr,
                softcap=None if cap == "none" else float(cap), has_sinks=sinks == "yes"))
    return out


def _spec(x):
    """(shape, dtype) -> ShapeDtypeStruct; anything else unchanged."""
    import jax
    import numpy as np

    if (isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[0], (tuple, list))
            and isinstance(x[1], str)):
        return jax.ShapeDtypeStruct(tuple(x[0]), np.dtype(x[1]))
    return x


def plan_call(call: dict):
    """The kernel plan of one calls-file entry (arrays as (shape, dtype); 'fn' names the
    API; `sinks=True` stands for float32 sinks; keys starting with '_', 'lens' and
    'grad' are a test's own data; 'deterministic' matters to the backward only), or
    raises dispatch.Unsupported."""
    import jax
    import numpy as np

    from . import varlen
    from .api import kernel_plan

    call = {k: _spec(x) for k, x in call.items()
            if not k.startswith("_") and k not in ("grad", "lens", "deterministic")}
    fn = call.pop("fn", "attention")
    if call.get("sinks") is True:
        heads = (call.get("query") or call.get("q")).shape[-2]
        call["sinks"] = jax.ShapeDtypeStruct((heads,), np.float32)
    return kernel_plan(**call) if fn == "attention" else varlen.kernel_plan(fn, **call)


def variants_from_calls(path: str, backward: bool = False, deterministic: bool = False) -> list:
    """Variants for the calls listed in `path`'s CALLS: dicts of a function's arguments,
    arrays given as (shape, dtype); 'fn' names the function ('attention' by default,
    'varlen_attention', 'paged_attention'); `sinks=True` stands for float32 sinks; keys
    starting with '_' are ignored (a test's own data).
    backward: also the backward variants their gradients run: the deterministic ones
    for calls with 'deterministic': True, or for all with `deterministic`."""
    from .dispatch import Unsupported, plan_backward

    spec = importlib.util.spec_from_file_location("_jax_fa4_calls", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = []
    for call in mod.CALLS:
        # 'grad': False marks a call whose gradient is not taken (no backward to build).
        grad = call.get("grad", True)
        try:
            plan = plan_call(call)
            out.append(plan.kernel_variant)
        except Unsupported as e:
            print(f"  (falls back, nothing to build: {e})", file=sys.stderr)
            continue
        if backward and grad:
            try:
                det = deterministic or bool(call.get("deterministic", False))
                out.append(plan_backward(plan, det).variant)
            except Unsupported as e:
                print(f"  (pure-JAX backward, nothing to build: {e})", file=sys.stderr)
    return out


def _build(variant_cls: type, variant_dict: dict) -> tuple[str, float, int]:
    from .kernels.cache import get_object

    v = variant_cls.from_dict(variant_dict)
    t0 = time.perf_counter()
    obj = get_object(v)
    return v.describe(), time.perf_counter() - t0, len(obj)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jax_fa4.precompile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--calls", help="a .py file defining CALLS (see above)")
    what.add_argument("--variant", action="append", metavar="JSON",
                      help="one variant's JSON (repeatable); the matrix options are ignored")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--head-dim", default="128", help="comma list; 192/128 for hdim/hdim_v")
    p.add_argument("--group", default="1", help="query heads per KV head")
    p.add_argument("--mask", default="none,causal", help="none,causal,local")
    p.add_argument("--softcap", default="none")
    p.add_argument("--sinks", default="no", help="no,yes")
    p.add_argument("--backward", action="store_true",
                   help="with --calls: also the backward kernels of the calls' gradients")
    p.add_argument("--deterministic", action="store_true",
                   help="with --backward: the deterministic backward kernels "
                        "(attention(..., deterministic=True)) of every call")
    p.add_argument("--cache-dir", help="where to write (default: JAX_FA4_CACHE_DIR)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--check", action="store_true",
                   help="build nothing: list the variants missing from the cache and "
                        "exit 1 if any is (before carrying a cache to a GPU host)")
    args = p.parse_args(argv)
    if args.deterministic and not (args.calls and args.backward):
        p.error("--deterministic names backward kernels: use it with --calls and --backward")
    if args.cache_dir:
        os.environ["JAX_FA4_CACHE_DIR"] = args.cache_dir
    os.environ["JAX_FA4_COMPILE"] = "auto"
    os.environ.setdefault("JAX_FA4_QUIET", "1")  # workers: this command reports per variant

    if args.variant:
        from .kernels.compile import variant_from_spec

        variants = [variant_from_spec(spec) for spec in args.variant]
    elif args.calls:
        variants = variants_from_calls(args.calls, args.backward, args.deterministic)
    else:
        variants = variants_from_matrix(args)
    unique = list({v.key(): v for v in variants}.values())
    from .kernels.cache import cache_dir, load_from_disk

    todo = [v for v in unique if load_from_disk(v) is None]
    print(f"jax_fa4.precompile: {len(unique)} variants, {len(unique) - len(todo)} cached, "
          f"{len(todo)} {'missing' if args.check else 'to build'} in {cache_dir()}"
          + ("" if args.check else f" with {args.jobs} jobs"), flush=True)
    if args.check:
        for v in todo:
            print(f"  missing: {v.describe()}", flush=True)
        return 1 if todo else 0
    t0, failed = time.perf_counter(), 0
    # spawn, not fork: the parent may hold JAX threads.
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx) as pool:
        # The class travels by reference (its module is imported in the worker).
        futures = {pool.submit(_build, type(v), v.as_dict()): v for v in todo}
        for i, fut in enumerate(cf.as_completed(futures), 1):
            v = futures[fut]
            try:
                desc, dt, size = fut.result()
                print(f"[{i}/{len(todo)}] {desc}: {dt:.1f}s, {size / 1024:.0f} KiB", flush=True)
            except Exception as e:  # report every failure, then exit non-zero
                failed += 1
                print(f"[{i}/{len(todo)}] FAILED {v.describe()}: {e}", flush=True)
    print(f"jax_fa4.precompile: done in {time.perf_counter() - t0:.0f}s, {failed} failed",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
