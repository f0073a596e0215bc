"""`deterministic=True` (issue 20) on CPU: the option's validation; the backward plan
and variant it picks (its own key and symbol; the default variant's fields and key body
unchanged); the semaphore workspaces (shapes, int32, rank 4); precompile's calls and
flag; gradients through the fallback; and (marker `compile`) cross-lowering for CUDA and
compiling deterministic backward variants with the CuTe DSL.  The GPU half (same bits on
every run, agreement with the default backward) is tests/test_gpu_deterministic.py.
"""
from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import has_compiler

import jax_fa4
from jax_fa4 import precompile
from jax_fa4.api import kernel_plan
from jax_fa4.dispatch import plan_backward
from jax_fa4.kernels import compile as kcompile
from jax_fa4.kernels.backward_abi import (results, size_dims, workspace_dtype,
                                          workspace_names, workspace_shapes)
from jax_fa4.kernels.backward_config import BackwardVariant

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SDS = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16
_COMPILE_MARKS = [pytest.mark.compile,
                  pytest.mark.skipif(not has_compiler(), reason="needs jax_fa4[compile]")]


def _qkv(b=2, t=333, s=333, n=8, kh=2, h=128):
    return SDS((b, t, n, h), BF16), SDS((b, s, kh, h), BF16), SDS((b, s, kh, h), BF16)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [1, 0, "yes", None, jnp.asarray(True)])
def test_attention_rejects_a_non_bool(bad):
    q = jnp.zeros((1, 8, 2, 64), BF16)
    with pytest.raises(ValueError, match="deterministic must be a bool"):
        jax_fa4.attention(q, q, q, deterministic=bad)


@pytest.mark.parametrize("bad", [1, "true"])
def test_varlen_attention_rejects_a_non_bool(bad):
    q = jnp.zeros((16, 2, 64), BF16)
    cu = jnp.asarray([0, 16], jnp.int32)
    with pytest.raises(ValueError, match="deterministic must be a bool"):
        jax_fa4.varlen_attention(q, q, q, cu, cu, max_seqlen_q=16, max_seqlen_k=16,
                                 deterministic=bad)


def test_numpy_bool_is_accepted():
    q = jnp.zeros((1, 8, 2, 64), BF16)
    assert jax_fa4.attention(q, q, q, deterministic=np.bool_(True)).shape == q.shape


# ---------------------------------------------------------------------------
# Plans, variants, keys
# ---------------------------------------------------------------------------

# BackwardVariant("bfloat16", 128, 128, 4, mask="causal").as_dict() before issue 20:
# its objects' keys keep this body (the ABI and source digest entries changed).
DEFAULT_FIELDS_BEFORE = json.loads(
    '{"dtype": "bfloat16", "has_seqused_k": false, "has_seqused_q": false, "has_sinks": '
    'false, "head_dim": 128, "head_dim_v": 128, "layout": "dense", "mask": "causal", '
    '"qhead_per_kvhead": 4, "softcap": null, "tile": {"AtomLayoutMSdP": 1, "AtomLayoutMdQ": '
    '1, "AtomLayoutNdKV": 2, "SdP_swapAB": true, "dKV_swapAB": false, "dQ_single_wg": '
    'false, "dQ_swapAB": false, "m_block_size": 64, "n_block_size": 128, "num_stages_PdS": '
    '2, "num_stages_Q": 2, "num_stages_dO": 2, "num_wg": 2}, "window_left": false, '
    '"window_right": false}')


def test_default_variant_fields_are_unchanged():
    v = BackwardVariant("bfloat16", 128, 128, 4, mask="causal")
    assert v.as_dict() == DEFAULT_FIELDS_BEFORE
    assert "deterministic" not in json.loads(v.key())
    assert BackwardVariant("bfloat16", 128, 128, 4, mask="causal",
                           deterministic=False).key() == v.key()


def test_plan_backward_picks_a_deterministic_variant():
    plan = kernel_plan(*_qkv(), is_causal=True)
    default, det = plan_backward(plan).variant, plan_backward(plan, True).variant
    assert not default.deterministic and det.deterministic
    assert det.key() != default.key() and det.symbol != default.symbol
    assert json.loads(det.key())["deterministic"] is True
    assert det.describe() == default.describe() + ", deterministic"
    # everything else is the same kernel configuration
    assert BackwardVariant.from_dict({**det.as_dict(), "deterministic": False}) == default


def test_explain_and_kernel_plan_are_unchanged():
    """The option exists wherever FA4's backward does: explain's answers do not depend
    on it (and neither explain nor kernel_plan takes it)."""
    assert jax_fa4.explain(*_qkv(), is_causal=True, backward=True, platform="cuda") is None
    reason = jax_fa4.explain(*_qkv(h=80), backward=True, platform="cuda")
    assert reason.startswith("backward: ")


def test_variant_spec_round_trips():
    v = BackwardVariant("bfloat16", 128, 128, 4, mask="causal", layout="packed",
                        has_seqused_k=True, deterministic=True)
    w = kcompile.variant_from_spec(kcompile.variant_spec(v))
    assert w == v and w.symbol == v.symbol
    spec = kcompile.variant_spec(BackwardVariant("bfloat16", 64, 64, 1))
    assert "deterministic" not in spec


def test_variant_refuses_a_non_bool():
    with pytest.raises(ValueError, match="deterministic must be a bool"):
        BackwardVariant("bfloat16", 64, 64, 1, deterministic=1)


# ---------------------------------------------------------------------------
# Semaphore workspaces (what FA4's interface allocates)
# ---------------------------------------------------------------------------

def test_semaphore_workspaces_dense():
    v = BackwardVariant("bfloat16", 128, 128, 4, mask="causal", deterministic=True)
    ws = workspace_shapes(v, (2, 333, 8, 128), (2, 333, 2, 128), (2, 333, 2, 128), 2)
    # tile 64x128: 333 query rows are 6 blocks, 333 keys 3 blocks
    assert ws["dq_semaphore"] == (2, 8, 6, 1)
    assert ws["dk_semaphore"] == ws["dv_semaphore"] == (2, 2, 3, 2)
    assert list(ws)[-3:] == ["dq_semaphore", "dk_semaphore", "dv_semaphore"]
    assert [workspace_dtype(n) for n in ws] == ["float32"] * 5 + ["int32"] * 3
    # the float32 workspaces are the default variant's
    default = BackwardVariant("bfloat16", 128, 128, 4, mask="causal")
    ws0 = workspace_shapes(default, (2, 333, 8, 128), (2, 333, 2, 128), (2, 333, 2, 128), 2)
    assert {n: s for n, s in ws.items() if "semaphore" not in n} == ws0


def test_semaphore_workspaces_packed_and_mha():
    v = BackwardVariant("bfloat16", 256, 256, 1, layout="packed", deterministic=True)
    ws = workspace_shapes(v, (500, 4, 256), (600, 4, 256), (600, 4, 256), 3)
    # tile 64x48; blocks of the whole packed total (8), per sequence (3); no GQA: no
    # dK/dV semaphores (each KV head's dK/dV has one writer)
    assert ws["dq_semaphore"] == (3, 4, 8, 1)
    assert "dk_semaphore" not in ws and v.semaphores == ("dq_semaphore",)


def test_semaphore_sizes_are_passed_rank_4():
    v = BackwardVariant("bfloat16", 64, 64, 2, layout="packed", deterministic=True)
    names = [n for n, _ in results(v)]
    ranks = dict(results(v))
    assert names[-3:] == ["dq_semaphore", "dk_semaphore", "dv_semaphore"]
    assert all(ranks[n] == 4 for n in v.semaphores) and ranks["dq_accum"] == 2
    default = BackwardVariant("bfloat16", 64, 64, 2, layout="packed")
    extra = len(size_dims(v)) - len(size_dims(default))
    assert extra == 12 and workspace_names(v)[:5] == workspace_names(default)


# ---------------------------------------------------------------------------
# Precompile
# ---------------------------------------------------------------------------

def _calls_file(tmp_path, calls):
    path = tmp_path / "calls.py"
    path.write_text(f"CALLS = {calls!r}\n")
    return str(path)


def test_precompile_builds_deterministic_backwards(tmp_path):
    call = dict(query=((2, 333, 8, 128), "bfloat16"), key=((2, 333, 2, 128), "bfloat16"),
                value=((2, 333, 2, 128), "bfloat16"), is_causal=True)
    path = _calls_file(tmp_path, [call, dict(call, deterministic=True)])
    fwd, bwd, fwd2, det = precompile.variants_from_calls(path, backward=True)
    assert fwd == fwd2 and not bwd.deterministic and det.deterministic
    path = _calls_file(tmp_path, [call])
    _, det = precompile.variants_from_calls(path, backward=True, deterministic=True)
    assert det.deterministic


def test_precompile_deterministic_needs_backward(capsys):
    with pytest.raises(SystemExit):
        precompile.main(["--calls", "x.py", "--deterministic"])
    assert "--backward" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Gradients (CPU: the primitive's pure-JAX backward, deterministic as it is)
# ---------------------------------------------------------------------------

def test_cpu_gradients_equal_the_default_ones():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 40, 4, 64)), BF16)
    k, v = (jnp.asarray(rng.standard_normal((2, 40, 2, 64)), BF16) for _ in range(2))

    def grads(det):
        f = lambda q, k, v: jnp.sum(jax_fa4.attention(  # noqa: E731
            q, k, v, is_causal=True, deterministic=det).astype(jnp.float32) ** 2)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

    for a, b in zip(grads(True), grads(False)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


# ---------------------------------------------------------------------------
# CUDA lowering and compiling (CuTe DSL, no GPU)
# ---------------------------------------------------------------------------

TARGET = "stablehlo.custom_call @jax_fa4_cute_call"


def _backward_call(f, *args):
    """(symbol, result types) of the one backward custom call in f's CUDA lowering."""
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    found = []
    for line in text.splitlines():
        if TARGET in line and '"jax_fa4_bwd_' in line:
            sig = re.search(r"->\s*\(([^()]*)\)\s*$", line)
            found.append((re.search(r'symbol = "([^"]+)"', line).group(1),
                          sig.group(1).split(", ")))
    assert len(found) == 1, found
    return found[0]


def compiles(f):
    for m in _COMPILE_MARKS:
        f = m(f)
    return f


@compiles
def test_dense_grad_cross_lowers_with_semaphores():
    def grad(det):
        f = lambda q, k, v: jnp.sum(jax_fa4.attention(  # noqa: E731
            q, k, v, is_causal=True, deterministic=det).astype(jnp.float32))
        return jax.grad(f, argnums=(0, 1, 2))

    sym0, res0 = _backward_call(grad(False), *_qkv())
    sym1, res1 = _backward_call(grad(True), *_qkv())
    plan = kernel_plan(*_qkv(), is_causal=True)
    assert sym0 == plan_backward(plan).variant.symbol
    assert sym1 == plan_backward(plan, True).variant.symbol != sym0
    assert res1[:len(res0)] == res0
    assert res1[len(res0):] == ["tensor<2x8x6x1xi32>", "tensor<2x2x3x2xi32>",
                                "tensor<2x2x3x2xi32>"]


@compiles
def test_varlen_grad_cross_lowers_with_semaphores():
    q, k = SDS((300, 4, 64), BF16), SDS((310, 4, 64), BF16)
    cu = SDS((4,), jnp.int32)
    f = lambda q, k, v, cq, ck: jnp.sum(jax_fa4.varlen_attention(  # noqa: E731
        q, k, v, cq, ck, max_seqlen_q=200, max_seqlen_k=200, is_causal=True,
        deterministic=True).astype(jnp.float32))
    sym, res = _backward_call(jax.grad(f, argnums=(0, 1, 2)), q, k, k, cu, cu)
    # tile 128x128 (hdim 64): blocks of the packed total 300, 3 sequences; MHA
    assert res[-1] == "tensor<3x4x3x1xi32>" and sum("i32" in r for r in res) == 1
    assert sym.startswith("jax_fa4_bwd_")


DET_VARIANTS = [
    BackwardVariant("bfloat16", 96, 96, 2, mask="local", window_left=True, window_right=True,
                    has_sinks=True, deterministic=True),
    BackwardVariant("float16", 256, 256, 4, mask="causal", layout="packed",
                    has_seqused_q=True, has_seqused_k=True, deterministic=True),
]


@compiles
@pytest.mark.parametrize("variant", DET_VARIANTS, ids=lambda v: v.describe())
def test_deterministic_variants_compile(variant, kernel_cache):
    from jax_fa4.kernels import get_object

    obj = get_object(variant)
    assert obj[:4] == b"\x7fELF" and variant.symbol.encode() in obj
