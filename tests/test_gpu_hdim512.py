"""Head dim 512 on an SM90 GPU vs float32 references: dense, varlen and paged, for
the kernel designs (split-K exchange, the default, and split-PV; single-QK on request:
see gpu_cases_hdim512.DESIGNS)
(marker `gpu`; skipped elsewhere).  Matrix: tests/gpu_cases_hdim512.py; the checks are
test_gpu_forward's and test_gpu_paged's (poisoned outputs, no NaN, rel. error <= 1e-2).

The non-default design is selected by patching the tile heuristic for the test; its
kernel objects are built by `gpu_cases_hdim512.precompile_designs()` (see there).
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import test_gpu_forward  # noqa: E402
import test_gpu_paged  # noqa: E402
from gpu_cases_hdim512 import CALLS, DESIGNS  # noqa: E402
from jax_fa4.kernels import config  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not test_gpu_forward._has_sm90(),
                                 reason="needs an SM90 (Hopper) GPU"),
              pytest.mark.usefixtures("poisoned_outputs")]


def _case_id(c):
    return (test_gpu_paged._case_id(c) if "fn" in c else test_gpu_forward._case_id(c))


@pytest.fixture(params=DESIGNS)
def design(request):
    """Makes dispatch pick `request.param` for head dim 512."""
    with config.use_hdim512_design(request.param):
        yield request.param


@pytest.mark.parametrize("case", CALLS, ids=[_case_id(c) for c in CALLS])
def test_hdim512_matches_reference(case, design):
    if "fn" in case:
        test_gpu_paged.run_case(case, "fa4")
    else:
        test_gpu_forward.run_case(case)
