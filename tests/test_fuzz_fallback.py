"""The GPU fuzz's calls on the CPU: every call there takes the pure-JAX fallback, so the
same seeded draw over the whole accepted space (dense / varlen / paged, windows,
softcap, sinks, GQA 1-16, head dims 8-512, empty and odd lengths, gradients for a third)
checks the fallback against the float64 reference with the GPU test's own body
(tests/test_gpu_fuzz.py: no NaN, rel. error <= 1e-2, LSE, rows that see no key, refusals
at trace time).

Only the calls small enough for a 2-core CI machine run (work = query rows x keys x
query heads <= JAX_FA4_FUZZ_CPU_MAX_WORK, default 4e5: 60-80 of a seed's
328 calls, ~35 s).  The seed is
the GPU run's (JAX_FA4_FUZZ_SEED), so a session's fresh seed is also checked here.
"""
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import gpu_cases_fuzz  # noqa: E402
import test_gpu_fuzz as fuzz  # noqa: E402

MAX_WORK = float(os.environ.get("JAX_FA4_FUZZ_CPU_MAX_WORK", "4e5"))


def _work(c) -> float:
    q = c.get("query", c.get("q"))[0]
    k = c.get("key", c.get("k", c.get("k_cache")))[0]
    return float(np.prod(q[:-1])) * float(np.prod(k[:-2]))


SMALL = [c for c in gpu_cases_fuzz.CALLS if _work(c) <= MAX_WORK]


def test_the_small_draw_spans_the_api():
    fns = {c.get("fn", "attention") for c in SMALL}
    assert fns == {"attention", "varlen_attention", "paged_attention"}, fns
    assert len(SMALL) >= 20 and any(c.get("grad") for c in SMALL)


@pytest.mark.parametrize("case", SMALL, ids=[fuzz._id(c) for c in SMALL])
def test_fuzz_call_on_the_fallback(case):
    with jax.default_device(jax.devices("cpu")[0]):
        fuzz.test_fuzz_call(case)


def test_skip_names_ids_and_ranges():
    assert gpu_cases_fuzz.skipped("") == set()
    ids = gpu_cases_fuzz.skipped("repro, 0-3,34,repro1")
    assert ids == {c["_id"] for c in gpu_cases_fuzz.REPROS} | {0, 1, 2, 3, 34}
    kept = [c for c in gpu_cases_fuzz.REPROS + gpu_cases_fuzz.calls(n=40) if c["_id"] not in ids]
    assert [c["_id"] for c in kept] == [i for i in range(40) if i not in (0, 1, 2, 3, 34)]


# vmap: the same small calls mapped over a leading axis of two draws (every array
# operand mapped, sinks included) against each draw alone.  Before 2026-12-08 mapped
# sinks of varlen/paged calls, and mapped sinks with mapped sequence lengths, raised
# NotImplementedError; they now run one call per map entry.
VMAP_MAX_WORK = float(os.environ.get("JAX_FA4_FUZZ_CPU_VMAP_MAX_WORK", "1e5"))
VMAP = [c for c in SMALL if _work(c) <= VMAP_MAX_WORK]


@pytest.mark.parametrize("case", VMAP, ids=[fuzz._id(c) for c in VMAP])
def test_fuzz_call_under_vmap(case):
    import functools

    import jax.numpy as jnp

    draws = [fuzz._inputs(dict(case, _seed=case["_seed"] + i))[:2] for i in range(2)]
    names = sorted(draws[0][0])
    f = functools.partial(fuzz._api(case), return_lse=True, **fuzz._kwargs(case))

    def call(sinks, *xs):
        return f(**dict(zip(names, xs)), sinks=sinks)

    with jax.default_device(jax.devices("cpu")[0]):
        try:
            jax.eval_shape(call, draws[0][1], *[draws[0][0][n] for n in names])
        except (ValueError, NotImplementedError):
            return  # refused at trace time: the plain fuzz test checks the reason
        xs = [jnp.stack([jnp.asarray(a[n]) for a, _ in draws]) for n in names]
        sinks = None if draws[0][1] is None else jnp.stack([s for _, s in draws])
        vo, vl = jax.jit(jax.vmap(call, in_axes=(None if sinks is None else 0,) + (0,) * len(xs)))(
            sinks, *xs)
        for i, (a, s) in enumerate(draws):
            o, lse = jax.jit(call)(s, *[a[n] for n in names])
            o, vo_i = np.asarray(o, np.float32), np.asarray(vo[i], np.float32)
            assert not np.isnan(vo_i).any()
            assert np.linalg.norm(o - vo_i) <= 1e-2 * max(np.linalg.norm(o), 1e-30)
            lse, vl_i = np.asarray(lse), np.asarray(vl[i])
            np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(vl_i))
            fin = np.isfinite(lse)
            np.testing.assert_allclose(vl_i[fin], lse[fin], rtol=1e-3, atol=1e-3)
