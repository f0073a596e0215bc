"""`jax.export` support: the safety checks to disable for functions using jax_fa4.

Exporting for CUDA a function that runs an FA4 kernel emits a
`stablehlo.custom_call @jax_fa4_cute_call`.  JAX refuses to export custom calls that
are not in its list of targets with compatibility guarantees, so pass
`disabled_checks=jax_fa4.export.disabled_safety_checks()`::

    exp = jax.export.export(jax.jit(f), platforms=("cuda",),
                            disabled_checks=jax_fa4.export.disabled_safety_checks())(*args)
    blob = exp.serialize()

What the artifact carries and what the deploying host needs:

* The kernel object bytes travel inside the exported module, as the custom call's
  `object` attribute (with its launcher `symbol`, `size_dims` and the runtime
  scalars), so the artifact is self-contained: the host that runs it needs neither
  the CuTe DSL compiler nor FA4 nor jax_fa4's kernel cache.
* That host must `import jax_fa4` before calling the deserialized function (importing
  registers the FFI handler for `jax_fa4_cute_call` with XLA), and the handler must
  find `libcute_dsl_runtime.so`: from the installed nvidia-cutlass-dsl-libs-cu13 wheel
  (`jax_fa4[runtime]`, also in [cuda] and [compile]) or at the path in
  `$JAX_FA4_CUTE_RUNTIME`.
* The objects are SM90a code (H100/H200) built against the pinned CuTe DSL runtime,
  and the handler's attribute contract is jax_fa4's own and not versioned yet: deploy
  with the jax_fa4 (and nvidia-cutlass-dsl) versions that exported the artifact.

Platforms other than CUDA lower jax_fa4's pure-JAX fallback and need no disabled
check; a multi-platform export (e.g. `platforms=("cpu", "cuda")`) contains both.
"""
from __future__ import annotations

import jax

from .ffi_target import TARGET

__all__ = ["disabled_safety_checks"]


def disabled_safety_checks() -> list[jax.export.DisabledSafetyCheck]:
    """The `disabled_checks` for `jax.export.export` of functions that use jax_fa4:
    allows jax_fa4's custom call target (`jax_fa4.ffi_target.TARGET`), which is not
    among JAX's custom calls with compatibility guarantees."""
    return [jax.export.DisabledSafetyCheck.custom_call(TARGET)]
