"""GPU cases of the deterministic backward (tests/test_gpu_deterministic.py), also the
precompile list:

    python -m jax_fa4.precompile --calls tests/gpu_cases_deterministic.py --backward

builds each call's forward kernel, its deterministic backward (the cases carry
`deterministic=True`) and its default backward (CALLS lists each case a second time
without it: the test compares the two).

Head dims {64, 128, 256} x {none, causal} x GQA groups {1, 4}, bfloat16, lengths that
give several query and key blocks (so several blocks add into each dQ tile, and with
GQA several heads into each dK/dV tile: the sums the deterministic schedule orders),
and one varlen case.
"""
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when precompile loads us
from gpu_cases_backward import _call, varlen_call  # noqa: E402

HEAD_DIMS = (64, 128, 256)
MASKS = {"none": {}, "causal": {"is_causal": True}}
GROUPS = (1, 4)

DENSE = [_call("bfloat16", 2, 777, 777, 2, g, hd, deterministic=True, **MASKS[mask])
         for hd, mask, g in itertools.product(HEAD_DIMS, MASKS, GROUPS)]
VARLEN = [varlen_call("bfloat16", (17, 777, 300), 2, 4, 128, is_causal=True,
                      deterministic=True)]


def default_of(case: dict) -> dict:
    """The same call with the default (non-deterministic) backward."""
    return {k: x for k, x in case.items() if k != "deterministic"}


# What precompile reads: every case, and its default twin (varlen without 'lens').
_ALL = DENSE + [{k: x for k, x in c.items() if k != "lens"} for c in VARLEN]
CALLS = _ALL + [default_of(c) for c in _ALL]
