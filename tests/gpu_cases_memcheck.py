"""Cases for compute-sanitizer memcheck on the GPU: paged and split calls on both page
paths (TMA and cp.async), packed q, varlen, head dims 128/256/512, the repros of the
issue "Correct or refused", and out-of-range inputs (tests/gpu_cases_memory_safety.py,
when present).  Also the precompile list (`python -m jax_fa4.precompile --calls`).

On the GPU host (one process; each buffer its own allocation so memcheck sees the
bounds of every operand, not of XLA's memory pool):

    XLA_PYTHON_CLIENT_ALLOCATOR=platform compute-sanitizer --tool memcheck \\
        --error-exitcode 9 python3 tests/gpu_cases_memcheck.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when precompile loads us
from gpu_cases_fuzz import REPROS  # noqa: E402
from gpu_cases_paged import paged_case, varlen_case  # noqa: E402

PAGED = [
    paged_case("bfloat16", 128, 1, 8, "causal", 16, 1),  # cp.async pages, split (auto)
    paged_case("bfloat16", 128, 1, 8, "causal", 16, 1, num_splits=1),  # cp.async, unsplit
    paged_case("bfloat16", 128, 2, 4, "causal", 64, 1, num_splits=7),  # decode tile, TMA
    paged_case("bfloat16", 128, 2, 1, "window", 128, 333),  # TMA pages, prefill
    paged_case("bfloat16", 128, 1, 8, "causal", 64, 5, packed_q=True),  # cp.async, packed q
    paged_case("bfloat16", 256, 1, 4, "none", 16, 1, num_splits=7),  # cp.async split
    paged_case("bfloat16", 256, 1, 4, "causal", 64, 4, num_splits=3),  # TMA split
    paged_case("bfloat16", 512, 1, 8, "causal", 16, 1, num_splits=3),  # hdim 512 cp.async
    paged_case("bfloat16", 512, 1, 8, "none", 64, 1, num_splits=3),  # hdim 512 TMA
    paged_case("bfloat16", 128, 2, 4, "causal", 64, 1, logits_soft_cap=30.0, sinks=True),
    varlen_case("bfloat16", 128, 2, 4, "causal"),
    varlen_case("bfloat16", 96, 1, 8, "none", seqused=True),
]
CALLS = PAGED + REPROS


def main() -> int:
    import test_gpu_fuzz
    import test_gpu_paged

    from jax_fa4 import ffi_target

    ffi_target.set_poison_outputs(True)
    failed = 0
    for i, case in enumerate(PAGED):
        try:
            test_gpu_paged.run_case(case, "fa4")
            print(f"ok    paged[{i}] {test_gpu_paged._case_id(case)}", flush=True)
        except AssertionError as e:
            failed += 1
            print(f"WRONG paged[{i}]: {str(e)[:200]}", flush=True)
    for case in REPROS:
        try:
            test_gpu_fuzz.test_fuzz_call(case)
            print(f"ok    {case['_id']}", flush=True)
        except AssertionError as e:
            failed += 1
            print(f"WRONG {case['_id']}: {str(e)[:200]}", flush=True)
    try:
        import test_gpu_memory_safety as ms
    except ImportError:
        ms = None
    if ms is not None and hasattr(ms, "run_all"):
        failed += ms.run_all()
    print(f"memcheck cases done, {failed} wrong", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
