"""Memory safety of varlen / paged metadata: clamps every index the kernel reads by.

The FA4 kernel trusts its int32 metadata: it reads page `page_table[b, t // page_size]`
for every t < seqused_k[b], and packed rows cu_seqlens[b] .. cu_seqlens[b] + length.
An out-of-range page index, a `seqused_k` past the page table's capacity or
`cu_seqlens` past the rows would make it read out of bounds.  `clamped_operands`
rewrites those operands, on the device inside the jitted call, into values that are
always in bounds, and `execute.varlen` applies it before both the kernel and the pure-JAX
fallback, so both compute the same thing from the same (clamped) arguments:

* paged: page_table -> clip(page_table, 0, num_pages - 1);
  seqused_k -> clip(seqused_k, 0, max_pages * page_size), and 0 when the cache has
  no pages at all (no index is in range; every query row then sees no key).
* packed rows (cu_seqlens_q, and cu_seqlens_k of varlen_attention):
  cu -> clip(cummax(cu), 0, total_rows): non-decreasing and inside the rows (a
  sequence that starts past the last row, or before its predecessor's end, gets
  fewer rows, possibly none).
* seqused_q / seqused_k with packed rows: clip(seqused, 0, cu[b+1] - cu[b]).
* dense `attention`'s query_seq_lengths / key_value_seq_lengths (`dense_lengths`):
  clip(len, 0, T or S).  That is also jax.nn's meaning of such a length (rows i <
  len), so every path gets it, and JAX_FA4_UNGUARDED leaves it on.

Valid arguments pass through unchanged.  The ops are elementwise on (B,) / (B+1,) /
(B, max_pages) int32 arrays (plus a running max over B+1 entries) that XLA fuses into
one small kernel; benchmarks/bench_guard_cost.py measures what it costs a decode step.

JAX_FA4_UNGUARDED=1 (read when a call is traced) turns the clamps off.  It exists only
to measure their cost: with it, bad metadata reads out of bounds again.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
from jax import lax


def enabled() -> bool:
    """False only under JAX_FA4_UNGUARDED=1 (benchmarks); read at every call."""
    return os.environ.get("JAX_FA4_UNGUARDED", "") != "1"


def clamp_cu_seqlens(cu, total: int):
    """(B+1,) int32 -> non-decreasing offsets inside [0, total]."""
    return jnp.clip(lax.cummax(cu, axis=0), 0, total)


def clamped_operands(kind: str, args: dict) -> dict:
    """The operand dict (kernels/forward_abi.py names) of a 'varlen' or 'paged' call
    with its metadata clamped as the module docstring says; other kinds unchanged."""
    if kind not in ("varlen", "paged") or not enabled():
        return args
    a = dict(args)
    if kind == "paged":
        pages, page_size = a["k"].shape[:2]
        a["page_table"] = jnp.clip(a["page_table"], 0, max(pages - 1, 0))
        capacity = a["page_table"].shape[1] * page_size if pages else 0
        a["seqused_k"] = jnp.clip(a["seqused_k"], 0, capacity)
    for side in ("q", "k"):
        if f"cu_seqlens_{side}" not in a:  # dense q, or paged keys
            continue
        cu = clamp_cu_seqlens(a[f"cu_seqlens_{side}"], a[side].shape[0])
        a[f"cu_seqlens_{side}"] = cu
        if f"seqused_{side}" in a:
            a[f"seqused_{side}"] = jnp.clip(a[f"seqused_{side}"], 0, cu[1:] - cu[:-1])
    return a


def dense_lengths(q_len, kv_len, t: int, s: int):
    """attention's sequence lengths (int32 (B,) or None) inside [0, T] and [0, S]."""
    return (None if q_len is None else jnp.clip(q_len, 0, t),
            None if kv_len is None else jnp.clip(kv_len, 0, s))
