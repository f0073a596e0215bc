"""GPU test matrix for split-KV decode (tests/test_gpu_split.py), shared with
`python -m jax_fa4.precompile --calls` (each case lists the unsplit and the split
plan: num_splits does not change the compiled split kernel, only 1 vs > 1 does)."""
import itertools

B, MAX_TOKENS = 5, 5000
SPLITS = (1, 2, 7, 32)
MASKS = {"none": {}, "causal": {"is_causal": True}, "window": {"local_window_size": (700, 0)},
         "window2": {"local_window_size": (64, 32)}}


def split_case(hd, page_size, mask, tq=1, kv_heads=2, group=4, num_splits=2, **kw):
    max_pages = -(-MAX_TOKENS // page_size)
    pages = B * max_pages + 3
    n = kv_heads * group
    return dict(fn="paged_attention", q=((B, tq, n, hd), "bfloat16"),
                k_cache=((pages, page_size, kv_heads, hd), "bfloat16"),
                v_cache=((pages, page_size, kv_heads, hd), "bfloat16"),
                page_table=((B, max_pages), "int32"), seqused_k=((B,), "int32"),
                num_splits=num_splits, **MASKS[mask], **kw)


def _cases():
    masks = itertools.cycle(["causal", "window", "none", "window2"])
    cases = [split_case(hd, ps, next(masks)) for hd, ps in itertools.product((64, 128, 256),
                                                                            (16, 64, 128))]
    cases.append(split_case(128, 64, "causal", tq=4))  # speculative decode rows
    cases.append(split_case(128, 64, "causal", sinks=True))
    cases.append(split_case(128, 64, "window", sinks=True, logits_soft_cap=30.0))
    cases.append(split_case(128, 128, "causal", kv_heads=4, group=1))  # no GQA packing
    # head dim 512 (Gemma-4 global layers): the split-K kernel's split epilogue; 64-token
    # pages by TMA, 16-token pages by cp.async
    cases.append(split_case(512, 64, "causal", group=8))
    cases.append(split_case(512, 64, "window", tq=2, sinks=True, logits_soft_cap=30.0))
    cases.append(split_case(512, 16, "window2"))
    # issue 18: decode tiles for head dims 96/192/256 and 128-token pages, and
    # speculative decode (Tq 2-8) at GQA groups up to 16 (Tq 8 x 16: two 64-row tiles)
    cases += [split_case(96, 64, "causal", tq=3, group=5),
              split_case(96, 128, "window", tq=6, group=4),
              split_case(192, 64, "none", tq=2, group=8),
              split_case(192, 128, "causal", tq=2, group=8),
              split_case(256, 64, "causal", tq=8, group=8),
              split_case(128, 128, "causal", tq=8, group=16),
              split_case(64, 64, "none", tq=5, group=3),
              split_case(128, 64, "causal", tq=7, group=2, sinks=True)]
    return cases


CASES = _cases()
# Precompile both kernels of every case.
CALLS = CASES + [dict(c, num_splits=1) for c in CASES] + [
    # attention(): dense k/v, short q (auto split)
    dict(query=((2, 1, 16, 128), "bfloat16"), key=((2, 9000, 2, 128), "bfloat16"),
         value=((2, 9000, 2, 128), "bfloat16")),
    dict(query=((2, 3, 16, 128), "bfloat16"), key=((2, 9000, 2, 128), "bfloat16"),
         value=((2, 9000, 2, 128), "bfloat16"), logits_soft_cap=30.0),
    dict(query=((1, 1, 8, 512), "bfloat16"), key=((1, 9000, 1, 512), "bfloat16"),
         value=((1, 9000, 1, 512), "bfloat16")),
]
