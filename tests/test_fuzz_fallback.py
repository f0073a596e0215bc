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
