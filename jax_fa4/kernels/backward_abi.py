"""The backward launcher's argument convention, shared by the compile side
(backward.py, which imports cutlass) and the lowering side (which must not).

    stream, <operand pointers>, <result pointers>, <every dimension of every operand,
    then of every workspace result, as int32>, window_left: int32,
    window_right: int32, scale: float32

Operands (dense | packed layout; which ones exist depends on the variant):
    q, k, v, o, do   (b, s, h, d)                  | (total, h, d)
    lse, dlse        float32 (b, h, s_q)           | (h, total_q)
    cu_seqlens_q/k   (b+1,) int32                    packed
    seqused_q/k      (b,) int32
    sinks            (h,) float32
Results: dq, dk, dv (like q, k, v), dsinks (h,) float32 with sinks, then the float32
workspaces FA4's kernels pass between each other (XLA allocates them as extra
results of the custom call; the launcher zeroes what needs zeroing):
    dq_accum         (b, h, s_q_pad * d_pad)       | (h, total_q_pad * d_pad)
    dpsum, lse_log2  (b, h, s_q_pad)               | (h, total_q_pad)
    dk_accum         (b, h_k, s_k_pad * d_pad)     | (h_k, total_k_pad * d_pad)   GQA only
    dv_accum         (b, h_k, s_k_pad * dv_pad)    | (h_k, total_k_pad * dv_pad)  GQA only
s_pad rounds up to the tile (m for q, n for k); packed totals get one extra tile per
sequence (FA4's padded per-sequence offsets); d_pad rounds to tile.hdim_multiple_of.
"""
from __future__ import annotations

from .backward_config import BackwardVariant, round_up


def operands(v: BackwardVariant) -> list[tuple[str, int]]:
    """(name, rank) of the custom call's operands, in order."""
    r = 4 if v.layout == "dense" else 3
    stats = 3 if v.layout == "dense" else 2
    ops = [(n, r) for n in ("q", "k", "v", "o", "do")] + [("lse", stats), ("dlse", stats)]
    if v.layout == "packed":
        ops += [("cu_seqlens_q", 1), ("cu_seqlens_k", 1)]
    ops += [(n, 1) for n, on in (("seqused_q", v.has_seqused_q),
                                 ("seqused_k", v.has_seqused_k)) if on]
    if v.has_sinks:
        ops.append(("sinks", 1))
    return ops


def gradient_names(v: BackwardVariant) -> list[str]:
    """The results the caller keeps, in order."""
    return ["dq", "dk", "dv"] + (["dsinks"] if v.has_sinks else [])


def workspace_names(v: BackwardVariant) -> list[str]:
    return ["dq_accum", "dpsum", "lse_log2"] + (["dk_accum", "dv_accum"] if v.gqa_accum else [])


def workspace_shapes(v: BackwardVariant, q_shape, k_shape, v_shape, batch: int) -> dict:
    """name -> shape of each float32 workspace, for operands of these static shapes."""
    t = v.tile
    m, n, mult = t.m_block_size, t.n_block_size, t.hdim_multiple_of
    d, dv = round_up(v.head_dim, mult), round_up(v.head_dim_v, mult)
    if v.layout == "dense":
        b, sq, h, _ = q_shape
        sk, hk = k_shape[1], k_shape[2]
        lead_q, lead_k = (b, h), (b, hk)
        sq_pad, sk_pad = round_up(sq, m), round_up(sk, n)
    else:
        h, hk = q_shape[1], k_shape[1]
        lead_q, lead_k = (h,), (hk,)
        # FA4 gives each sequence's rows a tile-aligned start (padded offsets).
        sq_pad = (q_shape[0] + (batch + 1) * m - 1) // m * m
        sk_pad = (k_shape[0] + (batch + 1) * n - 1) // n * n
    shapes = {"dq_accum": lead_q + (sq_pad * d,), "dpsum": lead_q + (sq_pad,),
              "lse_log2": lead_q + (sq_pad,)}
    if v.gqa_accum:
        shapes["dk_accum"] = lead_k + (sk_pad * d,)
        shapes["dv_accum"] = lead_k + (sk_pad * dv,)
    return shapes


def results(v: BackwardVariant) -> list[tuple[str, int]]:
    """(name, rank) of the results, in order: gradients, then workspaces."""
    r = 4 if v.layout == "dense" else 3
    ws = 3 if v.layout == "dense" else 2
    return ([("dq", r), ("dk", r), ("dv", r)] + ([("dsinks", 1)] if v.has_sinks else [])
            + [(name, ws) for name in workspace_names(v)])


def size_dims(v: BackwardVariant) -> list[tuple[int, int]]:
    """(buffer index, axis) of each int32 size argument, in launcher order: every axis of
    every operand, then of every workspace (buffers count operands, then results)."""
    ops = operands(v)
    out = [(i, a) for i, (_, rank) in enumerate(ops) for a in range(rank)]
    res = results(v)
    for j, (name, rank) in enumerate(res):
        if name in workspace_names(v):
            out += [(len(ops) + j, a) for a in range(rank)]
    return out
