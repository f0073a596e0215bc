"""Calls whose metadata tests/test_memory_safety.py (pure-JAX path, CPU) and
tests/test_gpu_memory_safety.py (FA4 kernel) corrupt: out-of-range page indices,
seqused_k past the page table, cu_seqlens past the rows or decreasing, seqused past a
sequence, max_seqlen below a sequence's length.  Also read by
`python -m jax_fa4.precompile --calls tests/gpu_cases_memory_safety.py`.

CASES: name -> call (arrays as (shape, dtype), static keyword arguments).  The bad
values themselves are fixed per case in test_memory_safety.bad_inputs (same for both
tests).  bf16, head dim 128, 16 query / 2 KV heads; paged with pages of 16 (cp.async)
and 128 (TMA), dense q decode (split-KV, num_splits=None) and Tq = 5 (num_splits=1),
packed q; varlen with bad offsets, with and without max_seqlen bounding every length.
"""
B, HEADS, KV_HEADS, HDIM = 3, 16, 2, 128
PAGED_MAX_TOKENS = 1100
VARLEN_B, VARLEN_TOTAL_Q, VARLEN_TOTAL_K = 4, 64, 256


def paged_call(page_size, tq, packed_q=False, num_splits=None):
    max_pages = -(-PAGED_MAX_TOKENS // page_size)
    kv = ((B * max_pages + 5, page_size, KV_HEADS, HDIM), "bfloat16")
    c = dict(fn="paged_attention", k_cache=kv, v_cache=kv, page_table=((B, max_pages), "int32"),
             seqused_k=((B,), "int32"), is_causal=True)
    if packed_q:
        # max_seqlen_q bounds every (clamped) sequence of test_memory_safety.bad_inputs
        c.update(q=((B * tq, HEADS, HDIM), "bfloat16"), cu_seqlens_q=((B + 1,), "int32"),
                 max_seqlen_q=B * tq)
    else:
        c["q"] = ((B, tq, HEADS, HDIM), "bfloat16")
    if num_splits is not None:
        c["num_splits"] = num_splits
    return c


def varlen_call(max_seqlen_q, max_seqlen_k):
    b = VARLEN_B
    kv = ((VARLEN_TOTAL_K, KV_HEADS, HDIM), "bfloat16")
    return dict(fn="varlen_attention", q=((VARLEN_TOTAL_Q, HEADS, HDIM), "bfloat16"), k=kv, v=kv,
                cu_seqlens_q=((b + 1,), "int32"), cu_seqlens_k=((b + 1,), "int32"),
                seqused_q=((b,), "int32"), seqused_k=((b,), "int32"),
                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, is_causal=True)


CASES = {
    "paged-ps16-decode": paged_call(16, 1),
    "paged-ps128-decode": paged_call(128, 1),
    "paged-ps16-tq5": paged_call(16, 5, num_splits=1),
    "paged-ps128-tq5": paged_call(128, 5, num_splits=1),
    "paged-ps16-packed": paged_call(16, 5, packed_q=True),
    "paged-ps128-packed": paged_call(128, 5, packed_q=True),
    # the clamped lengths are at most 30 queries and 126 keys (bad_inputs)
    "varlen": varlen_call(30, 126),
    "varlen-short-max": varlen_call(16, 64),  # fallback truncates; same kernel as "varlen"
}

CALLS = list(CASES.values())
