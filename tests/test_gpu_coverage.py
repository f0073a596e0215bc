"""The GPU cases that give every reachable kernel class a test (tests/plan_space.py,
tests/gpu_cases_coverage.py), run with the forward, paged/varlen and backward checks
of the other GPU test files (marker `gpu`; poisoned outputs, float32/float64
references, rel. error <= 1e-2, no NaN)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from gpu_cases_coverage import CALLS  # noqa: E402
from test_gpu_backward import check_dense_gradients, check_varlen_gradients  # noqa: E402
from test_gpu_forward import _case_id as _dense_id  # noqa: E402
from test_gpu_forward import _has_sm90, run_case as run_dense  # noqa: E402
from test_gpu_paged import _case_id as _varlen_id  # noqa: E402
from test_gpu_paged import run_case as run_varlen  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _has_sm90(), reason="needs an SM90 (Hopper) GPU"),
              pytest.mark.usefixtures("poisoned_outputs")]


def _id(c):
    base = _dense_id(c) if "query" in c else _varlen_id(c)
    split = f"-splits{c['num_splits']}" if "num_splits" in c else ""
    return base.replace("-grad=True", "") + split + ("-grad" if c.get("grad") else "")


@pytest.mark.parametrize("case", CALLS, ids=[_id(c) for c in CALLS])
def test_class_case(case):
    fn = case.get("fn", "attention")
    if fn == "attention":
        run_dense({k: v for k, v in case.items() if k != "grad"})
        if case.get("grad"):
            check_dense_gradients(case)
    elif case.get("grad"):
        check_varlen_gradients(case)
    else:
        run_varlen(case, "fa4")
