"""GPU test matrix for head dim 512 (kernels/forward_hdim512_splitk.py, forward_hdim512.py),
shared by tests/test_gpu_hdim512.py and `python -m jax_fa4.precompile --calls`.

Dense: mask {none, causal, causal window (1023, 0)} x GQA {1, 8} x lengths
{1, 17, 333, 4097} (4097 only with GQA 8 to keep the run short), plus a two-sided
window, softcap, sinks, float16 and unequal lengths.  Varlen and paged
(page size 64: TMA pages; 16: cp.async pages) entries use tests/gpu_cases_paged.py's
shapes; their test draws the lengths.
"""
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when precompile loads us
from gpu_cases_paged import paged_case, varlen_case  # noqa: E402

D = 512
# The designs the GPU test runs: split_k (the default) and split_pv; JAX_FA4_TEST_HDIM512_DESIGNS
# (comma list) overrides, e.g. "single_qk" for that design on its own.
DESIGNS = tuple(os.environ.get("JAX_FA4_TEST_HDIM512_DESIGNS", "split_k,split_pv").split(","))
MASKS = {"none": {}, "causal": {"is_causal": True}, "window": {"local_window_size": (1023, 0)}}


def dense_case(b, sq, sk, kv_heads, group, dtype="bfloat16", **kw):
    n = kv_heads * group
    return dict(query=((b, sq, n, D), dtype), key=((b, sk, kv_heads, D), dtype),
                value=((b, sk, kv_heads, D), dtype), **kw)


def _cases():
    cases = []
    for mask, group, s in itertools.product(MASKS, (1, 8), (1, 17, 333, 4097)):
        if s == 4097 and group == 1:
            continue
        cases.append(dense_case(2 if s < 4097 else 1, s, s, 2 if group == 1 else 1, group,
                                **MASKS[mask]))
    cases.append(dense_case(2, 333, 333, 1, 8, local_window_size=(100, 37)))
    cases.append(dense_case(2, 333, 333, 1, 8, is_causal=True, logits_soft_cap=30.0))
    cases.append(dense_case(2, 333, 333, 2, 4, sinks=True, local_window_size=(1023, 0)))
    cases.append(dense_case(2, 1, 4097, 1, 8))  # decode-like
    cases.append(dense_case(1, 17, 1000, 2, 4, local_window_size=(1100, 983)))  # prefill chunk
    cases.append(dense_case(2, 333, 333, 2, 4, dtype="float16", is_causal=True))
    for mask, group in itertools.product(MASKS, (1, 8)):
        cases.append(varlen_case("bfloat16", D, 2 if group == 1 else 1, group, mask))
    cases.append(varlen_case("bfloat16", D, 1, 8, "causal", seqused=True,
                             logits_soft_cap=30.0, sinks=True))
    for ps, tq, mask in ((64, 1, "causal"), (64, 333, "none"), (64, 17, "window"),
                         (16, 4, "causal")):
        cases.append(paged_case("bfloat16", D, 1, 8, mask, ps, tq))
    cases.append(paged_case("bfloat16", D, 2, 1, "causal", 64, 5, packed_q=True))
    return cases


CALLS = _cases()


def precompile_designs(cache_dir=None):
    """Builds the kernel objects of DESIGNS for CALLS (`python -m jax_fa4.precompile
    --calls` builds the default design's only):
    python -c "import sys; sys.path.insert(0, 'tests'); import gpu_cases_hdim512 as g;
    g.precompile_designs('DIR')"."""
    from jax_fa4 import precompile
    from jax_fa4.kernels import config, get_object

    if cache_dir:
        os.environ["JAX_FA4_CACHE_DIR"] = cache_dir
    os.environ["JAX_FA4_COMPILE"] = "auto"
    for d in DESIGNS:
        with config.use_hdim512_design(d):
            for v in precompile.variants_from_calls(os.path.abspath(__file__)):
                print(v.describe(), flush=True)
                get_object(v)
