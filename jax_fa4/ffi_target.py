"""Registers the C++ FFI handler (csrc/cute_call.cc) with XLA for CUDA."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import threading

import jax
import numpy as np

TARGET = "jax_fa4_cute_call"
_lock = threading.Lock()
_registered = False


def runtime_library_path() -> str | None:
    """libcute_dsl_runtime.so: $JAX_FA4_CUTE_RUNTIME, else the installed CuTe DSL's
    (found without importing it).  The library lives in the nvidia-cutlass-dsl-libs-cu13
    (or -cu12) wheel, under the `nvidia_cutlass_dsl` namespace package that wheel shares
    with the others of the DSL: it is there with jax_fa4[compile], [cuda] or [runtime],
    and a namespace package may span several site directories, so all are searched."""
    if p := os.environ.get("JAX_FA4_CUTE_RUNTIME"):
        return p
    spec = importlib.util.find_spec("nvidia_cutlass_dsl")
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = [lib for root in spec.submodule_search_locations
            for lib in pathlib.Path(root).glob("cu*/lib/libcute_dsl_runtime.so")]
    return str(max(libs, key=lambda p: p.parent.parent.name)) if libs else None  # cu13 first


def call_attributes(obj: bytes, symbol: str, size_dims, i32_scalars, f32_scalars) -> dict:
    """The attributes of one `jax_fa4_cute_call`, as csrc/cute_call.cc reads them: the
    kernel object and its launcher's symbol, the (operand, axis) pairs whose sizes the
    launcher takes as int32 arguments, then its int32 and float32 scalars."""
    return dict(object=np.frombuffer(obj, dtype=np.uint8), symbol=symbol,
                size_dims=np.asarray(size_dims, dtype=np.int64).reshape(-1),
                i32_scalars=np.asarray(i32_scalars, dtype=np.int32),
                f32_scalars=np.asarray(f32_scalars, dtype=np.float32))


def ensure_registered() -> None:
    """Registers the handler once.  The library itself is dlopen'ed by the handler at
    first execution, so lowering (also on CPU-only hosts) never loads it."""
    global _registered
    with _lock:
        if _registered:
            return
        from . import _ffi

        if path := runtime_library_path():
            _ffi.set_runtime_path(path)
        jax.ffi.register_ffi_target(TARGET, _ffi.handlers(), platform="CUDA")
        _registered = True


def loaded_kernel_count() -> int:
    """How many distinct kernel objects the handler has loaded in this process."""
    from . import _ffi

    return _ffi.loaded_kernels()


def set_poison_outputs(on: bool) -> None:
    """Testing aid: have the handler fill every kernel output with NaN bytes before
    each launch (needs a CUDA driver), so unwritten elements show up as NaN."""
    from . import _ffi

    _ffi.set_poison_outputs(bool(on))
