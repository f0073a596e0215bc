"""Calls of tests/test_gpu_multi.py, global shapes (for `python -m jax_fa4.precompile
--calls`).  A sharded run launches the per-shard variant; with heads or batch split
over M devices the kernel variant is the same one (same head dim, GQA group and mask:
shapes are dynamic), so these calls cover any device count that divides 8."""

DENSE = dict(query=((8, 1024, 32, 128), "bfloat16"), key=((8, 1024, 8, 128), "bfloat16"),
             value=((8, 1024, 8, 128), "bfloat16"), is_causal=True)
PAGED = dict(fn="paged_attention", q=((8, 1, 32, 128), "bfloat16"),
             k_cache=((256, 64, 8, 128), "bfloat16"), v_cache=((256, 64, 8, 128), "bfloat16"),
             page_table=((8, 32), "int32"), seqused_k=((8,), "int32"), is_causal=True)

CALLS = [DENSE, PAGED]
