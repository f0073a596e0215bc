"""Where the FFI handler finds libcute_dsl_runtime.so (ffi_target.runtime_library_path):
$JAX_FA4_CUTE_RUNTIME, else the CuTe DSL libs wheel under the `nvidia_cutlass_dsl`
namespace package, which jax_fa4[runtime] installs without the rest of the DSL."""
from __future__ import annotations

import importlib.machinery
import importlib.util

from jax_fa4 import ffi_target

REAL_FIND_SPEC = importlib.util.find_spec


def fake_dsl(monkeypatch, *roots):
    """`nvidia_cutlass_dsl` as a namespace package spread over `roots`."""
    spec = importlib.machinery.ModuleSpec("nvidia_cutlass_dsl", None, is_package=True)
    spec.submodule_search_locations = [str(r) for r in roots]
    monkeypatch.setattr(ffi_target.importlib.util, "find_spec",
                        lambda name, *a: spec if name == "nvidia_cutlass_dsl"
                        else REAL_FIND_SPEC(name, *a))
    monkeypatch.delenv("JAX_FA4_CUTE_RUNTIME", raising=False)


def lib(root, cuda):
    path = root / cuda / "lib" / "libcute_dsl_runtime.so"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x7fELF")
    return path


def test_cu13_in_any_portion_of_the_namespace(tmp_path, monkeypatch):
    a, b = tmp_path / "user-site", tmp_path / "venv-site"
    lib(a, "cu12")
    want = lib(b, "cu13")  # e.g. jax_fa4[runtime] in the venv, an old cu12 elsewhere
    fake_dsl(monkeypatch, a, b)
    assert ffi_target.runtime_library_path() == str(want)


def test_environment_wins_and_absence_is_none(tmp_path, monkeypatch):
    fake_dsl(monkeypatch, tmp_path)
    assert ffi_target.runtime_library_path() is None  # the DSL's other wheels only
    lib(tmp_path, "cu13")
    monkeypatch.setenv("JAX_FA4_CUTE_RUNTIME", "/opt/rt/libcute_dsl_runtime.so")
    assert ffi_target.runtime_library_path() == "/opt/rt/libcute_dsl_runtime.so"
