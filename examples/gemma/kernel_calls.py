"""The jax_fa4 calls of the Gemma example with the mid preset (bf16, 64-token pages,
both prefill modes), for building its kernels ahead of time on a host with the compiler:

    python -m jax_fa4.precompile --calls examples/gemma/kernel_calls.py --cache-dir DIR

Kernel variants depend on dtype, head dims, GQA group, mask, page size and layouts, not
on lengths or batch, so these cover every batch and prompt length of that preset (and of
tests/test_gemma_example.py's GPU test).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.gemma.config import PRESETS  # noqa: E402
from examples.gemma.paths import attention_calls  # noqa: E402

PAGE_SIZE = 64

CALLS = []
for _mode in ("varlen", "paged"):
    for (_phase, _kind), (_fn, _kw) in attention_calls(
            PRESETS["mid"], batch=2, total_prefill=1100, max_prompt=1000, num_pages=64,
            page_size=PAGE_SIZE, max_pages=32, prefill=_mode).items():
        if _phase == "prefill" or _mode == "varlen":  # decode calls are the same in both
            CALLS.append(dict(fn=_fn, **_kw))
