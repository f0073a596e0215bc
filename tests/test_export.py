"""`jax.export` of functions that use jax_fa4, from a CPU-only host.

* Exported for CPU: the pure-JAX fallback, no custom call; serialize -> deserialize ->
  run matches the direct call (also the VJP, serialized with vjp_order=1).
* Exported for CUDA (cross-export; compiles one kernel, marked `compile`): the module
  holds `@jax_fa4_cute_call` with the kernel object as its `object` attribute, JAX
  refuses it without `jax_fa4.export.disabled_safety_checks()`, and the serialized
  artifact round-trips with the object bytes intact (self-contained).
* Exported for ("cpu", "cuda"): one artifact, runs on CPU after a round trip.

All calls use one kernel variant: bf16, head_dim 64, GQA group 2, causal (the same as
test_lowering's test_causal_equal_lengths, so a full run compiles it once).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import has_compiler

import jax_fa4
from jax_fa4.ffi_target import TARGET

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def compiles(fn):
    """Cross-export for CUDA compiles the kernel (CuTe DSL; no GPU needed)."""
    fn = pytest.mark.skipif(not has_compiler(),
                            reason="needs jax_fa4[compile] (flash_attn and cutlass)")(fn)
    return pytest.mark.compile(fn)


CALL = f"stablehlo.custom_call @{TARGET}"
SHAPES = ((2, 128, 4, 64), (2, 128, 2, 64), (2, 128, 2, 64))  # q, k, v: GQA group 2


@pytest.fixture(scope="module", autouse=True)
def _own_kernel_cache(tmp_path_factory):
    """Exporting for CUDA compiles the kernel here: an externally set JAX_FA4_CACHE_DIR /
    JAX_FA4_COMPILE=never (precompiled GPU runs) does not apply."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_FA4_CACHE_DIR", str(tmp_path_factory.mktemp("export_kernels")))
        mp.delenv("JAX_FA4_COMPILE", raising=False)
        yield


def causal(q, k, v):
    return jax_fa4.attention(q, k, v, is_causal=True)


f = jax.jit(causal)


@pytest.fixture(scope="module")
def qkv():
    keys = jax.random.split(jax.random.key(0), 3)
    return tuple(jax.random.normal(key, s, jnp.bfloat16) for key, s in zip(keys, SHAPES))


def specs():
    return tuple(jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in SHAPES)


def round_trip(exp: jax.export.Exported, **kw) -> jax.export.Exported:
    blob = exp.serialize(**kw)
    assert isinstance(blob, (bytes, bytearray)) and len(blob) > 0
    return jax.export.deserialize(blob)


def assert_close(a, b):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=1e-2, atol=1e-2)


def test_disabled_safety_checks():
    checks = jax_fa4.export.disabled_safety_checks()
    assert checks == [jax.export.DisabledSafetyCheck.custom_call("jax_fa4_cute_call")]
    assert "export" in jax_fa4.__all__


def test_export_for_cpu_round_trip(qkv):
    exp = jax.export.export(f, platforms=("cpu",))(*specs())
    assert exp.platforms == ("cpu",)
    assert TARGET not in exp.mlir_module()
    exp2 = round_trip(exp)
    assert exp2.platforms == ("cpu",)
    assert TARGET not in exp2.mlir_module()
    assert exp2.out_avals[0].shape == SHAPES[0]
    assert_close(exp2.call(*qkv), f(*qkv))


def test_export_for_cpu_vjp_round_trip(qkv):
    """The custom_vjp's backward is exported too (serialize(vjp_order=1))."""
    exp2 = round_trip(jax.export.export(f, platforms=("cpu",))(*specs()), vjp_order=1)
    ct = jnp.ones(SHAPES[0], jnp.bfloat16)
    got = exp2.vjp().call(*qkv, ct)
    want = jax.jit(lambda *a: jax.vjp(causal, *a[:3])[1](a[3]))(*qkv, ct)
    assert len(got) == 3
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert_close(g, w)


@pytest.fixture(scope="module")
def cuda_exported():
    return jax.export.export(f, platforms=("cuda",),
                             disabled_checks=jax_fa4.export.disabled_safety_checks())(*specs())


def object_bytes(text: str) -> bytes:
    """The `object` attribute (dense<"0x..."> : tensor<Nxui8>) of the one custom call."""
    (line,) = [line for line in text.splitlines() if CALL in line]
    m = re.search(r'object = dense<"0x([0-9A-Fa-f]+)"> : tensor<(\d+)xui8>', line)
    assert m, line[:300]
    data = bytes.fromhex(m.group(1))
    assert len(data) == int(m.group(2))
    return data


@compiles
def test_export_for_cuda(cuda_exported):
    from jax_fa4.api import kernel_plan
    from jax_fa4.kernels import get_object

    exp = cuda_exported
    assert exp.platforms == ("cuda",)
    text = exp.mlir_module()
    assert text.count(CALL) == 1
    obj = object_bytes(text)
    assert obj[:4] == b"\x7fELF"
    assert obj == get_object(kernel_plan(*specs(), is_causal=True).variant)
    assert [a.shape for a in exp.out_avals] == [SHAPES[0]]


@compiles
def test_export_for_cuda_needs_disabled_checks():
    with pytest.raises(ValueError, match="custom call") as info:
        jax.export.export(f, platforms=("cuda",))(*specs())
    assert TARGET in str(info.value)


@compiles
def test_export_for_cuda_round_trip(cuda_exported):
    """The serialized artifact carries the kernel object: deserializing gives back the
    same custom call with the same bytes (what a GPU host without the compiler runs)."""
    exp2 = round_trip(cuda_exported)
    assert exp2.platforms == ("cuda",)
    assert tuple(exp2.disabled_safety_checks) == tuple(jax_fa4.export.disabled_safety_checks())
    text = exp2.mlir_module()
    assert text.count(CALL) == 1
    assert object_bytes(text) == object_bytes(cuda_exported.mlir_module())
    for attr in ("symbol = ", "size_dims = ", "i32_scalars = ", "f32_scalars = "):
        assert attr in text
    assert exp2.in_avals == cuda_exported.in_avals
    assert exp2.out_avals == cuda_exported.out_avals


@compiles
def test_multi_platform_export_runs_on_cpu(qkv):
    exp = jax.export.export(f, platforms=("cpu", "cuda"),
                            disabled_checks=jax_fa4.export.disabled_safety_checks())(*specs())
    assert exp.platforms == ("cpu", "cuda")
    assert exp.mlir_module().count(CALL) == 1
    exp2 = round_trip(exp)
    assert exp2.platforms == ("cpu", "cuda")
    assert exp2.mlir_module().count(CALL) == 1
    assert_close(exp2.call(*qkv), f(*qkv))
