"""`deterministic=True` on an SM90 GPU (marker `gpu`; skipped elsewhere): jax.grad
through attention / varlen_attention runs FA4's deterministic backward kernel, gives
the same bits on each of 3 runs, and agrees with the default backward and the float32
reference within tests/test_gpu_backward.py's tolerances.  Matrix:
tests/gpu_cases_deterministic.py.  Kernel outputs are poisoned (NaN bytes, so int32
-1 in the semaphores) before every launch: the launcher must zero the semaphores
itself, or the kernel waits for a count it never sees.
"""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa4
from jax_fa4 import varlen
from jax_fa4.api import kernel_plan
from jax_fa4.dispatch import plan_backward

sys.path.insert(0, os.path.dirname(__file__))
from gpu_cases_deterministic import DENSE, VARLEN, default_of  # noqa: E402
from test_gpu_backward import _arrays, _check_grads, _loss, _varlen_inputs  # noqa: E402
from test_gpu_forward import _case_id, _has_sm90, _window, reference  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _has_sm90(), reason="needs an SM90 (Hopper) GPU"),
              pytest.mark.usefixtures("poisoned_outputs")]

RUNS = 3
NAMES = ["dq", "dk", "dv"]


def _bits(grads):
    return [np.asarray(g).tobytes() for g in grads]


def _check(grad_det, grad_default, want, args, det_symbol):
    """grad_det (jitted) runs the deterministic kernel and gives identical bits on every
    run; its gradients match the default backward's and the reference's."""
    assert det_symbol in grad_det.lower(*args).as_text(), \
        "the deterministic backward kernel is not in the program"
    runs = [grad_det(*args) for _ in range(RUNS)]
    first = _bits(runs[0])
    for i, run in enumerate(runs[1:], 2):
        for name, a, b in zip(NAMES, first, _bits(run)):
            assert a == b, f"{name} of run {i} differs from run 1"
    _check_grads(runs[0], want, NAMES)
    _check_grads(runs[0], [np.asarray(g, np.float32) for g in grad_default(*args)], NAMES)


@pytest.mark.parametrize("case", DENSE, ids=[_case_id(c) for c in DENSE])
def test_dense_gradients_are_deterministic(case):
    rng = np.random.default_rng(hash(_case_id(case)) % 2**32)
    q, k, v = _arrays(rng, [case[n] for n in ("query", "key", "value")])
    kw = {n: x for n, x in case.items() if n not in ("query", "key", "value", "deterministic")}
    w_o = jnp.asarray(rng.standard_normal(q.shape[:3] + (v.shape[3],), np.float32))
    w_lse = jnp.asarray(rng.standard_normal(q.shape[:3], np.float32))

    def grad(det):
        fa = lambda q, k, v, s: jax_fa4.attention(  # noqa: E731
            q, k, v, implementation="fa4", return_lse=True, deterministic=det, **kw)
        return jax.jit(jax.grad(_loss(fa, w_o, w_lse), argnums=(0, 1, 2)))

    ref = functools.partial(reference, scale=float(q.shape[-1] ** -0.5), window=_window(kw),
                            softcap=None)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.jit(jax.grad(_loss(ref, w_o, w_lse), argnums=(0, 1, 2)))(*f32, None)
    plan = kernel_plan(q, k, v, **kw)
    symbol = plan_backward(plan, True).variant.symbol
    _check(grad(True), grad(False), want, (q, k, v, None), symbol)


@pytest.mark.parametrize("case", VARLEN, ids=[f"varlen-{i}" for i in range(len(VARLEN))])
def test_varlen_gradients_are_deterministic(case):
    rng = np.random.default_rng(11)
    lens, cu, (q, k, v), kw, _ = _varlen_inputs(default_of(case), rng)
    w_o = jnp.asarray(rng.standard_normal(q.shape[:2] + (v.shape[2],), np.float32))
    w_lse = jnp.asarray(rng.standard_normal(q.shape[:2], np.float32))

    def grad(det):
        fa = lambda q, k, v, s: varlen.varlen_attention(  # noqa: E731
            q, k, v, cu, cu, implementation="fa4", return_lse=True, deterministic=det, **kw)
        return jax.jit(jax.grad(_loss(fa, w_o, w_lse), argnums=(0, 1, 2)))

    window = _window({n: kw[n] for n in ("is_causal", "local_window_size") if n in kw})
    scale = float(q.shape[-1] ** -0.5)

    def ref(q, k, v, s):  # per sequence (equal q/k lengths: windows align alike)
        outs, lses = [], []
        for b, n in enumerate(lens):
            sl = slice(int(cu[b]), int(cu[b]) + n)
            o, lse = reference(q[None, sl], k[None, sl], v[None, sl], s, scale=scale,
                               window=window, softcap=None)
            outs.append(o[0])
            lses.append(lse[0])
        return jnp.concatenate(outs), jnp.concatenate(lses)

    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.grad(_loss(ref, w_o, w_lse), argnums=(0, 1, 2))(*f32, None)
    plan = varlen.kernel_plan("varlen_attention", q=q, k=k, v=v, cu_seqlens_q=cu,
                              cu_seqlens_k=cu, **kw)
    symbol = plan_backward(plan, True).variant.symbol
    _check(grad(True), grad(False), want, (q, k, v, None), symbol)
