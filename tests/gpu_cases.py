"""The GPU test matrix for the dense forward, shared by tests/test_gpu_forward.py and
the precompile step (`python -m jax_fa4.precompile --calls tests/gpu_cases.py`).

A covering design rather than the full product (which would be ~1800 runs): every
head dim meets every mask kind and GQA group, every sequence length meets every
head dim, and dtype / softcap / sinks / batch / unequal lengths each cross the
main axes.  Each entry: query/key/value as (shape, dtype) plus attention kwargs.
"""
import itertools

HEAD_DIMS = (64, 96, 128, 192, 256)
LENGTHS = (1, 17, 128, 333, 4097)
GROUPS = (1, 4, 8)
MASKS = {"none": {}, "causal": {"is_causal": True}, "window": {"local_window_size": (127, 64)},
         "causal_window": {"is_causal": True, "local_window_size": (200, 0)}}


def _call(dtype, b, sq, sk, kv_heads, group, hd, hdv=None, **kw):
    n = kv_heads * group
    return dict(query=((b, sq, n, hd), dtype), key=((b, sk, kv_heads, hd), dtype),
                value=((b, sk, kv_heads, hdv or hd), dtype), **kw)


def _cases():
    cases = []
    # 1. head dim x mask x group, lengths and batch cycling.
    lens = itertools.cycle(LENGTHS)
    for i, (hd, mask, g) in enumerate(itertools.product(HEAD_DIMS, MASKS, GROUPS)):
        s = next(lens)
        cases.append(_call("bfloat16", 1 + 2 * (i % 2), s, s, 2 if g < 8 else 1, g, hd,
                           **MASKS[mask]))
    # 2. every length with every head dim (causal and not), batch 1 and 3.
    for hd, s, causal in itertools.product(HEAD_DIMS, LENGTHS, (False, True)):
        cases.append(_call("bfloat16", 3 if causal else 1, s, s, 2, 4, hd, is_causal=causal))
    # 3. float16 across head dims and masks.
    for hd, mask in itertools.product(HEAD_DIMS, ("none", "causal", "window")):
        cases.append(_call("float16", 2, 333, 333, 2, 4, hd, **MASKS[mask]))
    # 4. softcap and sinks.
    for hd, mask, g in itertools.product((64, 128, 256), ("none", "causal", "window"), (1, 8)):
        cases.append(_call("bfloat16", 2, 333, 333, 1, g, hd, logits_soft_cap=30.0, **MASKS[mask]))
        cases.append(_call("bfloat16", 2, 333, 333, 1, g, hd, sinks=True, **MASKS[mask]))
    cases.append(_call("float16", 1, 4097, 4097, 2, 4, 128, logits_soft_cap=50.0, sinks=True,
                       is_causal=True))
    # 5. unequal lengths (cross attention, decode-like, q longer than k).
    for hd in (64, 128, 256):
        cases.append(_call("bfloat16", 3, 17, 4097, 2, 4, hd))  # decode-like, non-causal
        cases.append(_call("bfloat16", 2, 1, 333, 2, 8, hd))
        cases.append(_call("bfloat16", 2, 333, 17, 2, 4, hd, is_causal=True))  # T > S
        cases.append(_call("bfloat16", 1, 128, 4097, 1, 8, hd, local_window_size=(64, 4096)))
    # 6. value head dim different from the key's.
    cases.append(_call("bfloat16", 2, 333, 333, 2, 4, 192, 128, is_causal=True))
    cases.append(_call("bfloat16", 2, 333, 333, 2, 1, 128, 64))
    # 7. many tiles: ~1000 (query tile, head, batch) tiles, several per SM, so that a
    # persistent kernel's CTAs loop over tiles (kernels/forward_persistent.py), with an
    # odd length; every head dim and mask kind, packed GQA.
    for hd, mask in itertools.product(HEAD_DIMS, MASKS):
        cases.append(_call("bfloat16", 16, 1000, 1000, 2, 4, hd, **MASKS[mask]))
    cases.append(_call("bfloat16", 64, 333, 333, 2, 1, 128, is_causal=True, sinks=True))
    cases.append(_call("bfloat16", 32, 517, 517, 1, 8, 64, logits_soft_cap=30.0))
    return cases


CALLS = _cases()
