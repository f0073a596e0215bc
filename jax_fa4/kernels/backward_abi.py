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
Results: dq, dk, dv (like q, k, v), dsinks (h,) float32 with sinks, then the
workspaces FA4's kernels pass between each other (XLA allocates them as extra
results of the custom call; the launcher zeroes what needs zeroing), float32:
    dq_accum         (b, h, s_q_pad * d_pad)       | (h, total_q_pad * d_pad)
    dpsum, lse_log2  (b, h, s_q_pad)               | (h, total_q_pad)
    dk_accum         (b, h_k, s_k_pad * d_pad)     | (h_k, total_k_pad * d_pad)   GQA only
    dv_accum         (b, h_k, s_k_pad * dv_pad)    | (h_k, total_k_pad * dv_pad)  GQA only
then, for a deterministic variant only, int32 semaphores (as FA4's interface
allocates them; one counter per tile, zeroed by the launcher before the main kernel):
    dq_semaphore     (b, h, s_q_blocks, 1)
    dk/dv_semaphore  (b, h_k, s_k_blocks, 2)                                      GQA only
s_pad rounds up to the tile (m for q, n for k); packed totals get one extra tile per
sequence (FA4's padded per-sequence offsets); d_pad rounds to tile.hdim_multiple_of.
s_blocks = s_pad / tile; packed calls count blocks of the whole packed total (each
sequence's blocks index from 0, and no sequence is longer than the total).
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
    return (["dq_accum", "dpsum", "lse_log2"] + (["dk_accum", "dv_accum"] if v.gqa_accum else [])
            + list(v.semaphores))


def workspace_dtype(name: str) -> str:
    """A workspace's element type (numpy name): the semaphores count, the rest sum."""
    return "int32" if name.endswith("_semaphore") else "float32"


def _rank(v: BackwardVariant, name: str) -> int:
    """A workspace's rank: semaphores are 4-D in both layouts, as FA4 indexes them."""
    if name.endswith("_semaphore"):
        return 4
    return 3 if v.layout == "dense" else 2


def workspace_shapes(v: BackwardVariant, q_shape, k_shape, v_shape, batch: int) -> dict:
    """name -> shape of each workspace, for operands of these static shapes."""
    t = v.tile
    m, n, mult = t.m_block_size, t.n_block_size, t.hdim_multiple_of
    d, dv = round_up(v.head_dim, mult), round_up(v.head_dim_v, mult)
    if v.layout == "dense":
        b, sq, h, _ = q_shape
        sk, hk = k_shape[1], k_shape[2]
        lead_q, lead_k = (b, h), (b, hk)
        sq_pad, sk_pad = round_up(sq, m), round_up(sk, n)
    else:
        b, (sq, h), (sk, hk) = batch, q_shape[:2], k_shape[:2]  # sq, sk: packed totals
        lead_q, lead_k = (h,), (hk,)
        # FA4 gives each sequence's rows a tile-aligned start (padded offsets).
        sq_pad = (sq + (batch + 1) * m - 1) // m * m
        sk_pad = (sk + (batch + 1) * n - 1) // n * n
    shapes = {"dq_accum": lead_q + (sq_pad * d,), "dpsum": lead_q + (sq_pad,),
              "lse_log2": lead_q + (sq_pad,)}
    if v.gqa_accum:
        shapes["dk_accum"] = lead_k + (sk_pad * d,)
        shapes["dv_accum"] = lead_k + (sk_pad * dv,)
    if "dq_semaphore" in v.semaphores:
        shapes["dq_semaphore"] = (b, h, round_up(sq, m) // m, 1)
    if "dk_semaphore" in v.semaphores:
        shapes["dk_semaphore"] = shapes["dv_semaphore"] = (b, hk, round_up(sk, n) // n, 2)
    return shapes


def results(v: BackwardVariant) -> list[tuple[str, int]]:
    """(name, rank) of the results, in order: gradients, then workspaces."""
    r = 4 if v.layout == "dense" else 3
    return ([("dq", r), ("dk", r), ("dv", r)] + ([("dsinks", 1)] if v.has_sinks else [])
            + [(name, _rank(v, name)) for name in workspace_names(v)])


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
