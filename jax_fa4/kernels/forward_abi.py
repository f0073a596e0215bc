"""The forward launcher's argument convention, shared by the compile side (forward.py,
which imports cutlass) and the lowering side (which must not).

    stream, <operand pointers>, <result pointers>, <every dimension of every operand
    as int32>, window_left: int32, window_right: int32, scale: float32

Operands, in order (which ones exist depends on the variant):
    q               (b, s_q, h, d) dense  | (total_q, h, d) packed
    k, v            (b, s_k, h_k, d)      | (total_k, h_k, d) packed | (pages, page_size, h_k, d)
    cu_seqlens_q    (b+1,) int32            packed q
    cu_seqlens_k    (b+1,) int32            packed k/v
    seqused_q       (b,) int32
    seqused_k       (b,) int32
    page_table      (b, max_pages) int32    paged k/v
    sinks           (h,) float32
Results: o (q's shape with d_v), lse float32 (b, h, s_q) dense | (h, total_q) packed.
"""
from __future__ import annotations

from .config import ForwardVariant


def operands(v: ForwardVariant) -> list[tuple[str, int]]:
    """(name, rank) of the custom call's operands for variant `v`, in order."""
    q_rank = 4 if v.q_layout == "dense" else 3
    kv_rank = 3 if v.kv_layout == "packed" else 4
    ops = [("q", q_rank), ("k", kv_rank), ("v", kv_rank)]
    ops += [(name, 1) for name, on in (
        ("cu_seqlens_q", v.q_layout == "packed"),
        ("cu_seqlens_k", v.kv_layout == "packed"),
        ("seqused_q", v.has_seqused_q),
        ("seqused_k", v.has_seqused_k),
    ) if on]
    if v.kv_layout == "paged":
        ops.append(("page_table", 2))
    if v.has_sinks:
        ops.append(("sinks", 1))
    return ops


def size_dims(v: ForwardVariant) -> list[tuple[int, int]]:
    """(operand index, axis) of each int32 size argument, in launcher order."""
    return [(i, a) for i, (_, rank) in enumerate(operands(v)) for a in range(rank)]
