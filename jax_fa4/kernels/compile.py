"""Compiles kernel variants with the CuTe DSL (no GPU needed: target sm_90a).

The cache (cache.py) calls in here for what it lacks; this module imports nothing of
the cache, so the two form no import cycle.  The CuTe DSL and FA4 are imported only
inside compile_variant, when a kernel is really built."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import sys
import time

from .backward_config import BackwardVariant
from .errors import MissingKernelError
from .split import SplitVariant
from .variant import CUTLASS_DSL_VERSION, FA4_VERSION, KernelVariant

logger = logging.getLogger("jax_fa4")

_REQUIRED = {"flash-attn-4": FA4_VERSION, "nvidia-cutlass-dsl": CUTLASS_DSL_VERSION}


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


def compile_variant(variant: KernelVariant, *, verbose: bool = False) -> bytes:
    """The object file of `variant` (a ForwardVariant, SplitVariant or BackwardVariant)."""
    check_toolchain()
    t0 = time.perf_counter()
    msg = f"jax_fa4: compiling [{variant.describe()}]"
    if verbose:
        print(msg + " ...", file=sys.stderr, flush=True)
    logger.info(msg)
    if isinstance(variant, SplitVariant):
        from .forward_split import compile_split

        obj = compile_split(variant)
    elif isinstance(variant, BackwardVariant):
        from .backward import compile_backward

        obj = compile_backward(variant)
    else:
        from .forward import compile_forward

        obj = compile_forward(variant)
    dt = time.perf_counter() - t0
    logger.info("jax_fa4: compiled %s in %.1fs (%d bytes)", variant.symbol, dt, len(obj))
    if verbose:
        print(f"jax_fa4:   done in {dt:.1f}s ({len(obj) / 1024:.0f} KiB)", file=sys.stderr)
    return obj
