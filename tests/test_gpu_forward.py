"""FA4 path on an SM90 GPU vs a float32 reference (marker `gpu`; skipped elsewhere).

On the lent H100 these run with precompiled kernels (JAX_FA4_COMPILE=never); see
tests/gpu_cases.py for the matrix and docs/DEVICE.md for the recipe.  Outputs are
poisoned (NaN bytes) by the FFI handler before every launch, so an element the
kernel did not write fails the NaN check.
"""
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa4
from jax_fa4 import ffi_target

sys.path.insert(0, os.path.dirname(__file__))
from gpu_cases import CALLS  # noqa: E402
from reference import attention_jnp, window_of  # noqa: E402


def _has_sm90() -> bool:
    try:
        return any(str(getattr(d, "compute_capability", "")).startswith("9")
                   for d in jax.devices("gpu"))
    except RuntimeError:
        return False


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _has_sm90(), reason="needs an SM90 (Hopper) GPU"),
              pytest.mark.usefixtures("poisoned_outputs")]




@functools.partial(jax.jit, static_argnames=("scale", "window", "softcap"))
def reference(q, k, v, sinks, *, scale, window, softcap):
    """float32 attention (tests/reference.py).  window: top-left (left, right), None
    unbounded.  Rows with no visible key: zeros, lse = sink/-inf.  lse (B, T, N)."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    return attention_jnp(q, k, v, sinks, scale=scale, window=window, softcap=softcap)


def _inputs(case, seed):
    rng = np.random.default_rng(seed)
    arrays = [jnp.asarray(rng.standard_normal(case[n][0], np.float32), case[n][1])
              for n in ("query", "key", "value")]
    kw = {k: v for k, v in case.items() if k not in ("query", "key", "value")}
    if kw.get("sinks"):
        kw["sinks"] = jnp.asarray(rng.standard_normal(case["query"][0][2], np.float32))
    return arrays, kw


def _window(kw):
    """(left, right) of a case's is_causal / local_window_size (tests/reference.py)."""
    return window_of(kw.get("is_causal"), kw.get("local_window_size"))


def _case_id(c):
    (b, sq, n, hd), dt = c["query"]
    sk, kh, hdv = c["key"][0][1], c["key"][0][2], c["value"][0][3]
    extra = "-".join(f"{k}={v}" for k, v in c.items() if k not in ("query", "key", "value"))
    return f"{dt[:4]}-b{b}-q{sq}-k{sk}-h{n}/{kh}-d{hd}" + (f"v{hdv}" if hdv != hd else "") + (
        f"-{extra}" if extra else "")


def _relerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("case", CALLS, ids=[_case_id(c) for c in CALLS])
def test_forward_matches_reference(case):
    run_case(case)


def run_case(case):
    """Runs `case` (a gpu_cases.py entry) on the FA4 path and checks it against the
    float32 reference: the custom call is in the program, no NaN, rel. error <= 1e-2."""
    (q, k, v), kw = _inputs(case, seed=hash(_case_id(case)) % 2**32)
    f = jax.jit(functools.partial(jax_fa4.attention, implementation="fa4",
                                  return_lse=True, **kw))
    compiled = f.lower(q, k, v).compile()
    assert "jax_fa4_cute_call" in compiled.as_text(), "the FA4 custom call is not in the program"
    o, lse = compiled(q, k, v)
    o, lse = np.asarray(o.astype(jnp.float32)), np.asarray(lse)
    assert o.shape == case["query"][0][:3] + (case["value"][0][3],)
    assert not np.isnan(o).any(), "NaN in the output: unwritten (poisoned) or bad values"
    assert not np.isnan(lse).any(), "NaN in the LSE: unwritten (poisoned) or bad values"
    ro, rlse = reference(q, k, v, kw.get("sinks"), scale=float(1 / np.sqrt(q.shape[-1])),
                         window=_window(kw), softcap=kw.get("logits_soft_cap"))
    ro, rlse = np.asarray(ro), np.asarray(rlse)
    assert _relerr(o, ro) <= 1e-2, f"output rel. error {_relerr(o, ro):.2e}"
    finite = np.isfinite(rlse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    if finite.any():
        assert _relerr(lse[finite], rlse[finite]) <= 1e-3
    assert ffi_target.loaded_kernel_count() >= 1


def test_default_implementation_takes_fa4_on_sm90():
    (q, k, v), _ = _inputs(CALLS[0], seed=0)
    hlo = jax.jit(jax_fa4.attention).lower(q, k, v).compile().as_text()
    assert "jax_fa4_cute_call" in hlo
    assert jax_fa4.explain(q, k, v) is None


def test_same_jit_runs_on_cpu_and_gpu():
    case = [c for c in CALLS if c["query"][0][1] == 333][0]
    (q, k, v), kw = _inputs(case, seed=1)
    f = jax.jit(functools.partial(jax_fa4.attention, **kw))
    on_gpu = np.asarray(f(q, k, v).astype(jnp.float32))
    cpu = jax.devices("cpu")[0]
    on_cpu = np.asarray(f(*(jax.device_put(x, cpu) for x in (q, k, v))).astype(jnp.float32))
    assert _relerr(on_gpu, on_cpu) <= 1e-2


def test_grad_and_vmap_on_gpu():
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 333, 8, 128), np.float32), jnp.bfloat16)
               for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]
    loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2))  # noqa: E731
    fa = functools.partial(jax_fa4.attention, is_causal=True, implementation="fa4")
    ref = lambda q, k, v: reference(q, k, v, None, scale=128 ** -0.5,  # noqa: E731
                                    window=(None, 0), softcap=None)[0]
    g = jax.jit(jax.grad(loss(fa), argnums=(0, 1, 2)))(q, k, v)
    gr = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, gr):
        assert _relerr(a, b) <= 2e-2
    vm = jax.jit(jax.vmap(fa))(q[:, None], k[:, None], v[:, None])
    loop = jnp.stack([fa(q[i:i + 1], k[i:i + 1], v[i:i + 1]) for i in range(2)])
    assert _relerr(vm.astype(jnp.float32), loop.astype(jnp.float32)) == 0.0


def test_runs_inside_cuda_graphs():
    """The handler is marked command-buffer compatible: a loop captured into CUDA
    graphs by XLA must give the same result as eager launches."""
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np, jax_fa4
        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.standard_normal((2, 256, 8, 128), np.float32), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((2, 256, 2, 128), np.float32), jnp.bfloat16)
        def step(i, o):
            return jax_fa4.attention(o, k, k, is_causal=True, implementation="fa4")
        f = jax.jit(lambda q: jax.lax.fori_loop(0, 8, step, q))
        print(float(jnp.sum(f(q).astype(jnp.float32))))
    """)
    # The child must not try to preallocate: this pytest process already holds most of
    # the GPU's memory.
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    outs = []
    for flags in ("--xla_gpu_enable_command_buffer=", "--xla_gpu_enable_command_buffer="
                  "FUSION,CUSTOM_CALL,WHILE --xla_gpu_graph_min_graph_size=1"):
        env["XLA_FLAGS"] = flags
        r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(float(r.stdout.strip().splitlines()[-1]))
    assert np.isfinite(outs[0]) and outs[0] == outs[1]


def test_exported_artifact_runs_on_gpu():
    """A serialized jax.export artifact (platforms cpu+cuda) runs the FA4 kernel here
    and matches the direct call: the kernel object travels inside the artifact."""
    rng = np.random.default_rng(11)
    q = jnp.asarray(rng.standard_normal((2, 256, 8, 128), np.float32), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((2, 256, 2, 128), np.float32), jnp.bfloat16)
    # implementation=None: 'fa4' would refuse the artifact's CPU lowering.
    f = jax.jit(functools.partial(jax_fa4.attention, is_causal=True))
    exp = jax.export.export(f, platforms=("cpu", "cuda"),
                            disabled_checks=jax_fa4.export.disabled_safety_checks())(q, k, k)
    restored = jax.export.deserialize(exp.serialize())
    assert "jax_fa4_cute_call" in restored.mlir_module()
    out = np.asarray(restored.call(q, k, k).astype(jnp.float32))
    assert not np.isnan(out).any()
    assert _relerr(out, np.asarray(f(q, k, k).astype(jnp.float32))) == 0.0
