"""GPU test matrix for the FA4 SM90 backward (tests/test_gpu_backward.py), also the
precompile list: `python -m jax_fa4.precompile --calls tests/gpu_cases_backward.py
--backward` builds each call's forward and backward kernels.

A sub-product that runs in well under two minutes: every head dim {64, 128, 256} meets
every mask and GQA group {1, 4, 8}, lengths {17, 333, 4097} cycling; softcap, sinks,
the other head dims, float16, unequal lengths and varlen cross the main axes.
"""
import itertools

HEAD_DIMS = (64, 128, 256)
LENGTHS = (17, 333, 4097)
GROUPS = (1, 4, 8)
MASKS = {"none": {}, "causal": {"is_causal": True}, "window": {"local_window_size": (127, 64)}}


def _call(dtype, b, sq, sk, kv_heads, group, hd, hdv=None, **kw):
    n = kv_heads * group
    return dict(query=((b, sq, n, hd), dtype), key=((b, sk, kv_heads, hd), dtype),
                value=((b, sk, kv_heads, hdv or hd), dtype), **kw)


def varlen_call(dtype, lens, kv_heads, group, hd, seqused=False, **kw):
    """Packed sequences of equal q/k lengths `lens` (static here: the test builds
    cu_seqlens from them); seqused: 7 padding rows after the last sequence."""
    n, total = kv_heads * group, sum(lens) + (7 if seqused else 0)
    return dict(fn="varlen_attention", q=((total, n, hd), dtype),
                k=((total, kv_heads, hd), dtype), v=((total, kv_heads, hd), dtype),
                cu_seqlens_q=((len(lens) + 1,), "int32"), cu_seqlens_k=((len(lens) + 1,), "int32"),
                max_seqlen_q=max(lens), max_seqlen_k=max(lens), lens=tuple(lens),
                **({"seqused_q": ((len(lens),), "int32"), "seqused_k": ((len(lens),), "int32")}
                   if seqused else {}), **kw)


def _cases():
    cases = []
    lens = itertools.cycle(LENGTHS)
    for hd, mask, g in itertools.product(HEAD_DIMS, MASKS, GROUPS):
        s = next(lens)
        cases.append(_call("bfloat16", 1 if s > 1000 else 2, s, s, 2 if g < 8 else 1, g, hd,
                           **MASKS[mask]))
    for hd in HEAD_DIMS:
        cases.append(_call("bfloat16", 2, 333, 333, 1, 4, hd, logits_soft_cap=30.0,
                           is_causal=True))
        cases.append(_call("bfloat16", 2, 333, 333, 1, 4, hd, sinks=True,
                           local_window_size=(127, 64)))
    cases.append(_call("bfloat16", 2, 333, 333, 2, 2, 96, is_causal=True))
    cases.append(_call("bfloat16", 2, 333, 333, 2, 2, 192))
    cases.append(_call("bfloat16", 2, 333, 333, 2, 1, 192, 128, is_causal=True))
    cases.append(_call("float16", 2, 333, 333, 2, 4, 128, is_causal=True, sinks=True,
                       logits_soft_cap=50.0))
    cases.append(_call("bfloat16", 2, 17, 4097, 2, 4, 128))  # decode-like, non-causal
    cases.append(_call("bfloat16", 2, 333, 17, 2, 4, 64, is_causal=True))  # T > S
    return cases


DENSE = _cases()
VARLEN = [
    varlen_call("bfloat16", (17, 333, 200), 2, 4, 128, is_causal=True),
    varlen_call("bfloat16", (333, 17, 64), 2, 1, 64, seqused=True),
    varlen_call("bfloat16", (100, 333), 1, 8, 256, local_window_size=(127, 0), sinks=True),
]
# What precompile reads: every call above (varlen without the test-only 'lens').
CALLS = DENSE + [{k: x for k, x in c.items() if k != "lens"} for c in VARLEN]
