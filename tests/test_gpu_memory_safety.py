"""Bad varlen / paged metadata through the FA4 kernel (marker `gpu`; skipped without
an SM90 GPU): out-of-range page indices (negative, past the pool, INT_MIN),
seqused_k past the page table or negative, cu_seqlens decreasing or past the rows,
seqused past its sequence, max_seqlen below a sequence's length.  Cases and bad values:
tests/gpu_cases_memory_safety.py and test_memory_safety.bad_inputs (precompile with
`python -m jax_fa4.precompile --calls tests/gpu_cases_memory_safety.py`).

Each call must not crash, leave no NaN (outputs are poisoned with NaN bytes before
every launch) and equal the float64 reference on the clamped arguments (docs/PAGED.md,
"Bad input: what each gets").  The kernel computes every row, so max_seqlen below a
length changes nothing here (only the pure-JAX path truncates).
"""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_gpu_forward import _has_sm90  # noqa: E402
from test_memory_safety import NAMES, bad_inputs, check, clamp, reference, run  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _has_sm90(), reason="needs an SM90 (Hopper) GPU"),
              pytest.mark.usefixtures("poisoned_outputs")]


@pytest.mark.parametrize("name", NAMES)
def test_kernel_bad_metadata_matches_clamped_reference(name):
    kw = bad_inputs(name, np.random.default_rng(NAMES.index(name)))
    o, lse, hlo = run(name, kw, "fa4")
    assert "jax_fa4_cute_call" in hlo
    check(o, lse, *reference(name, clamp(name, kw)))
