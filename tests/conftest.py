"""Shared test configuration for jax_fa4.

* Unless JAX_FA4_CACHE_DIR is set already (e.g. to precompiled kernels on a GPU
  host), the session gets its own temporary kernel cache directory, set before any
  test runs, so tests never read or write ~/.cache/jax_fa4.
* On CPU-only installs (no PJRT plugin such as jax_cuda12_plugin), XLA compiles test
  programs at backend optimization level 0 unless XLA_FLAGS says otherwise: CPU
  compiles get ~4x faster, and they are most of the CPU suite's time.
* `kernel_cache`: a fresh, empty cache directory for one test, with jax_fa4's
  in-memory kernel cache cleared, so the test sees compile -> disk -> memory from
  scratch.
* `has_compiler()`: whether the CuTe DSL toolchain (flash_attn + cutlass) is
  installed, checked without importing it.

The `gpu` and `compile` markers are declared in pyproject.toml.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest

from jax_fa4.cpu_compile import use_fast_cpu_compile


def has_compiler() -> bool:
    """True if FA4 (flash_attn) and the CuTe DSL (cutlass) are importable.

    Uses find_spec only: importing them is slow and would defeat tests that check
    jax_fa4 never imports them on its own."""
    try:
        return (importlib.util.find_spec("flash_attn") is not None
                and importlib.util.find_spec("cutlass") is not None)
    except (ImportError, ValueError):
        return False


# Read when JAX creates its first backend, i.e. after this (conftest) import.
use_fast_cpu_compile()


requires_compiler = pytest.mark.skipif(
    not has_compiler(), reason="needs jax_fa4[compile] (flash-attn-4 and nvidia-cutlass-dsl)")


@pytest.fixture(scope="session", autouse=True)
def _session_kernel_cache_dir(tmp_path_factory):
    """Points JAX_FA4_CACHE_DIR at a per-session temporary directory (for the whole
    session, including subprocesses started by tests) and restores it afterwards."""
    old = os.environ.get("JAX_FA4_CACHE_DIR")
    if old:  # an explicit cache (e.g. precompiled kernels for the GPU tests) is kept
        yield pathlib.Path(old)
        return
    path = tmp_path_factory.mktemp("jax_fa4_kernels")
    os.environ["JAX_FA4_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("JAX_FA4_CACHE_DIR", None)
    else:
        os.environ["JAX_FA4_CACHE_DIR"] = old


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """A fresh, empty kernel cache for one test: JAX_FA4_CACHE_DIR -> a new temporary
    directory, JAX_FA4_COMPILE unset (i.e. "auto"), and the in-memory cache cleared
    before and after the test.  Yields the directory (a pathlib.Path)."""
    from jax_fa4.kernels import cache

    path = tmp_path / "kernels"
    monkeypatch.setenv("JAX_FA4_CACHE_DIR", str(path))
    monkeypatch.delenv("JAX_FA4_COMPILE", raising=False)
    cache.clear_memory_cache()
    yield path
    cache.clear_memory_cache()


@pytest.fixture(scope="module")
def poisoned_outputs():
    """GPU tests: the FFI handler fills every kernel output with NaN bytes before each
    launch, so an element the kernel did not write shows up as NaN."""
    from jax_fa4 import ffi_target

    ffi_target.set_poison_outputs(True)
    yield
    ffi_target.set_poison_outputs(False)


# JAX_FA4_PLAN_DIFF="issue17,issue18": keep only the GPU cases whose kernel differs
# between those two split plans (kernels/split.SPLIT_PLANS), to validate a new plan in
# one short device call; "issue18,issue18+persistent": between a plan and the same plan
# with the persistent dense forward (kernels/config.use_forward_persistent).  A case is
# a test parameter that is a calls-file dict (precompile.plan_call); a test without one
# is kept only in test_gpu_split.py and test_gpu_paged.py, a case that cannot be
# planned here is kept.
def _plan_key(case: dict, plan_name: str):
    from jax_fa4.dispatch import Unsupported
    from jax_fa4.kernels import config, split
    from jax_fa4.precompile import plan_call

    name, _, extra = plan_name.partition("+")
    if extra not in ("", "persistent"):
        raise ValueError(f"JAX_FA4_PLAN_DIFF: {plan_name!r} (a split plan, +persistent)")
    with split.use_plan(name), config.use_forward_persistent(extra == "persistent"):
        try:
            return plan_call(case).kernel_variant.key()
        except Unsupported:
            return "fallback"


def pytest_collection_modifyitems(config, items):
    names = os.environ.get("JAX_FA4_PLAN_DIFF")
    if not names:
        return
    a, b = names.split(",")
    # the tests without a calls-file case that run what differs: split and paged calls
    # between split plans, dense forward calls (vmap, CUDA graphs, export, sharding)
    # between plain and persistent
    no_case_files = set()
    if a.partition("+")[0] != b.partition("+")[0]:
        no_case_files |= {"test_gpu_split.py", "test_gpu_paged.py"}
    if a.partition("+")[2] != b.partition("+")[2]:
        no_case_files |= {"test_gpu_forward.py", "test_gpu_multi.py"}
    keep, drop = [], []
    for item in items:
        cases = [p for p in getattr(getattr(item, "callspec", None), "params", {}).values()
                 if isinstance(p, dict)]
        if not cases:
            differs = item.path.name in no_case_files
        else:
            try:
                differs = any(_plan_key(c, a) != _plan_key(c, b) for c in cases)
            except Exception:  # not a calls-file dict: keep it
                differs = True
        (keep if differs else drop).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
