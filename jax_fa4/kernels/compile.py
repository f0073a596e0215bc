"""Compiles kernel variants with the CuTe DSL (no GPU needed: target sm_90a).

The cache (cache.py) calls in here for what it lacks; this module imports nothing of
the cache, so the two form no import cycle.  The CuTe DSL and FA4 are imported only
inside compile_variant, when a kernel is really built."""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shlex
import sys
import time

from .backward_config import BackwardVariant
from .config import ForwardVariant
from .errors import MissingKernelError
from .split import SplitVariant
from .variant import CUTLASS_DSL_VERSION, FA4_VERSION, KernelVariant

logger = logging.getLogger("jax_fa4")

_REQUIRED = {"flash-attn-4": FA4_VERSION, "nvidia-cutlass-dsl": CUTLASS_DSL_VERSION}

# Every kernel is built for Hopper, whatever GPU (or none) this host has.
TARGET_ARCH = "sm_90a"
_ARCH_VAR = "CUTE_DSL_ARCH"


def check_toolchain() -> None:
    """Raises MissingKernelError unless the pinned FA4 and CuTe DSL are installed."""
    problems = []
    for dist, want in _REQUIRED.items():
        try:
            have = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{dist} is not installed")
            continue
        if have != want:
            problems.append(f"{dist} {have} is installed, jax_fa4 needs {want}")
    if importlib.util.find_spec("torch") is None:
        problems.append("torch is not installed (FA4's kernel modules import it)")
    if problems:
        raise MissingKernelError(
            "jax_fa4: cannot compile kernels here: " + "; ".join(problems) + ". Install "
            "them with `pip install torch==2.13.0 && pip install 'jax_fa4[compile]'`, or "
            "precompile elsewhere and point JAX_FA4_CACHE_DIR at the result."
        )


def variant_spec(variant: KernelVariant) -> str:
    """`variant` as one line of JSON, its kind and its fields (as_dict): what
    `python -m jax_fa4.precompile --variant` takes to build exactly this variant."""
    return json.dumps({"kind": variant.KIND, **variant.as_dict()}, separators=(",", ":"))


def variant_from_spec(spec: str) -> KernelVariant:
    """The inverse of variant_spec."""
    d = json.loads(spec)
    kinds = {cls.KIND: cls for cls in (ForwardVariant, SplitVariant, BackwardVariant)}
    if not isinstance(d, dict) or d.get("kind") not in kinds:
        raise ValueError(f"a variant spec is a JSON object whose 'kind' is one of "
                         f"{sorted(kinds)}, got {spec!r}")
    return kinds[d.pop("kind")].from_dict(d)


def precompile_command(variant: KernelVariant, cache_dir) -> str:
    """A shell command that builds exactly `variant` into `cache_dir` (any host with
    jax_fa4[compile]; no GPU needed)."""
    return (f"python -m jax_fa4.precompile --cache-dir {shlex.quote(str(cache_dir))} "
            f"--variant {shlex.quote(variant_spec(variant))}")


def compile_variant(variant: KernelVariant, *, verbose: bool = False) -> bytes:
    """The object file of `variant` (a ForwardVariant, SplitVariant or BackwardVariant)."""
    check_toolchain()
    t0 = time.perf_counter()
    msg = f"jax_fa4: compiling [{variant.describe()}]"
    if verbose:
        print(msg + " ...", file=sys.stderr, flush=True)
    logger.info(msg)
    with target_sm90():
        obj = _compiler_for(variant)(variant)
    dt = time.perf_counter() - t0
    logger.info("jax_fa4: compiled %s in %.1fs (%d bytes)", variant.symbol, dt, len(obj))
    if verbose:
        print(f"jax_fa4:   done in {dt:.1f}s ({len(obj) / 1024:.0f} KiB)", file=sys.stderr)
    return obj


def _compiler_for(variant: KernelVariant):
    """The compile function of `variant`'s kind (importing its module imports the DSL:
    call inside target_sm90)."""
    if isinstance(variant, SplitVariant) and variant.prefetch:
        from .forward_split_prefetch import compile_split_prefetch

        return compile_split_prefetch
    if isinstance(variant, SplitVariant) and variant.combine == "fused":
        from .forward_split_fused import compile_split_fused

        return compile_split_fused
    if isinstance(variant, SplitVariant):
        from .forward_split import compile_split

        return compile_split
    if isinstance(variant, BackwardVariant):
        from .backward import compile_backward

        return compile_backward
    if variant.tile.persistent:
        from .forward_persistent import compile_forward_persistent

        return compile_forward_persistent
    if variant.tile.ctas_per_sm != 1:
        from .forward_occupancy import compile_forward_occupancy

        return compile_forward_occupancy
    from .forward import compile_forward

    return compile_forward


@contextlib.contextmanager
def target_sm90():
    """CUTE_DSL_ARCH=sm_90a while the DSL and the kernel modules are imported and a
    kernel compiles, then as the caller had it (removed if it was unset): the process's
    environment is the user's, and other CuTe DSL code in it may target another GPU.

    The DSL reads CUTE_DSL_ARCH once, when `import cutlass` builds its singletons (the
    kernel modules' own `setdefault` only matters for that first import).  So:
    * cutlass imported before us (by FA4, quack or the user) holds the caller's arch, or
      none, which on a host without a GPU means sm_100a: each singleton's arch is pinned
      for the compile and put back afterwards;
    * singletons that our import built hold sm_90a: afterwards they are reset to what
      the restored environment says, as if the caller had imported cutlass.
    Compiles are serialized by the cache's lock, so nothing else compiles in between."""
    had_cutlass = "cutlass" in sys.modules
    prev_env = os.environ.get(_ARCH_VAR)
    os.environ[_ARCH_VAR] = TARGET_ARCH
    pinned = []
    try:
        # Importing any of cutlass runs its __init__, which builds the DSL singletons.
        from cutlass.base_dsl.dsl import DSLSingletonMeta

        # `envar.arch` is the DSL's override point (quack pins it the same way); its
        # backing `_arch` is None until detected, which reading `arch` would trigger.
        # The DSL version is pinned (check_toolchain), so these internals are known.
        for dsl in list(DSLSingletonMeta._instances.values()):
            pinned.append((dsl.envar, dsl.envar._arch))
            dsl.envar.arch = TARGET_ARCH
        yield
    finally:
        if prev_env is None:
            os.environ.pop(_ARCH_VAR, None)
        else:
            os.environ[_ARCH_VAR] = prev_env
        for envar, arch in pinned:
            if had_cutlass:
                envar.arch = arch
            else:
                del envar.arch  # re-reads CUTE_DSL_ARCH: the caller's, restored above
