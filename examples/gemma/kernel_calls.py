"""The jax_fa4 calls of the Gemma example's GPU runs, for building their kernels ahead
of time on a host with the compiler:

    python -m jax_fa4.precompile --calls examples/gemma/kernel_calls.py --cache-dir DIR

Covers `python -m examples.gemma --preset mid` with its default prompts (both
--prefill modes, 64-token pages) and tests/test_gemma_example.py's GPU test.  Kernel
variants depend on dtype, head dims, GQA group, mask, page size and layouts, and a
decode call's split-KV choice may depend on batch and context length, so the calls
use the runs' exact shapes.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.gemma.config import DEFAULT_RUNS, PRESETS  # noqa: E402
from examples.gemma.paths import generation_calls  # noqa: E402

_RUNS = [DEFAULT_RUNS["mid"],              # the CLI's mid preset
         ([1100, 77], 16)]                 # test_gpu_mid_preset_takes_fa4_and_matches_xla

CALLS = [dict(fn=fn, **kw)
         for lens, new in _RUNS for mode in ("varlen", "paged")
         for fn, kw in generation_calls(PRESETS["mid"], lens, new, 64, mode).values()]
