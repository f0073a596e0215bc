"""GPU test matrix for varlen_attention and paged_attention (issue: paged KV / varlen),
shared by tests/test_gpu_paged.py and `python -m jax_fa4.precompile --calls`.

Shapes here are the static parts (rows, heads, pages); the test draws the per-sequence
lengths and page tables at random for each case.  'gen' holds those generation knobs
(ignored by precompile).
"""
import itertools

VARLEN_TOTAL_Q, VARLEN_TOTAL_K = 1200, 1600
VARLEN_B = 6
PAGED_B, PAGED_MAX_TOKENS = 3, 1100
MASKS = {"none": {}, "causal": {"is_causal": True}, "window": {"local_window_size": (255, 0)},
         "window2": {"local_window_size": (64, 32)}}


def varlen_case(dtype, hd, kv_heads, group, mask, seqused=False, hdv=None, **kw):
    n = kv_heads * group
    b = VARLEN_B
    c = dict(fn="varlen_attention", q=((VARLEN_TOTAL_Q, n, hd), dtype),
             k=((VARLEN_TOTAL_K, kv_heads, hd), dtype),
             v=((VARLEN_TOTAL_K, kv_heads, hdv or hd), dtype),
             cu_seqlens_q=((b + 1,), "int32"), cu_seqlens_k=((b + 1,), "int32"),
             max_seqlen_q=400, max_seqlen_k=700, **MASKS[mask], **kw)
    if seqused:
        c["seqused_k"] = ((b,), "int32")
    return c


def paged_case(dtype, hd, kv_heads, group, mask, page_size, tq, packed_q=False, hdv=None,
               **kw):
    n = kv_heads * group
    b = PAGED_B
    max_pages = -(-PAGED_MAX_TOKENS // page_size)
    pages = b * max_pages + 7
    c = dict(fn="paged_attention", k_cache=((pages, page_size, kv_heads, hd), dtype),
             v_cache=((pages, page_size, kv_heads, hdv or hd), dtype),
             page_table=((b, max_pages), "int32"), seqused_k=((b,), "int32"), **MASKS[mask], **kw)
    if packed_q:
        c.update(q=((b * tq, n, hd), dtype), cu_seqlens_q=((b + 1,), "int32"), max_seqlen_q=tq)
    else:
        c["q"] = ((b, tq, n, hd), dtype)
    return c


def _cases():
    cases = []
    masks = itertools.cycle(["causal", "none", "window", "window2"])
    for hd, group in itertools.product((128, 256), (1, 8)):
        for mask in ("none", "causal", "window"):
            cases.append(varlen_case("bfloat16", hd, 2 if group == 1 else 1, group, mask))
        cases.append(varlen_case("bfloat16", hd, 1, group, "causal", seqused=True))
    cases.append(varlen_case("float16", 64, 2, 4, "causal", logits_soft_cap=30.0, sinks=True))
    for ps, tq, hd, group in itertools.product((16, 64, 128, 256), (1, 4, 333), (128, 256), (1, 8)):
        cases.append(paged_case("bfloat16", hd, 2 if group == 1 else 1, group, next(masks), ps, tq))
    for ps in (16, 64, 128):
        cases.append(paged_case("bfloat16", 128, 1, 8, "causal", ps, 5, packed_q=True))
    cases.append(paged_case("bfloat16", 128, 2, 4, "causal", 64, 1, logits_soft_cap=30.0,
                            sinks=True))
    cases.append(paged_case("bfloat16", 128, 2, 8, "causal", 64, 1))  # decode step test
    return cases


CALLS = _cases()
