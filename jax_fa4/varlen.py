"""Public entry points for inference layouts: packed variable-length batches
(`varlen_attention`) and a paged KV cache (`paged_attention`).

FlashAttention conventions throughout: sequences are packed along the first axis and
delimited by `cu_seqlens` (int32, (B+1,)); `seqused_*` (int32, (B,)) give how many
rows of each sequence are used; causal masks and windows are bottom-right aligned per
sequence (query i of a sequence with Tq queries and Tk keys sees keys up to
Tk - Tq + i, shifted by the window).  Lengths are traced int32 arrays; `max_seqlen_*`
are static Python ints (they size the fallback's padded buffers).

Bad metadata never reads out of bounds: `guard.clamped_operands` clamps page indices,
lengths and offsets on the device before the kernel and the fallback see them
(docs/PAGED.md, "Bad input: what each gets").  paged.py holds `paged_attention`; this
module `varlen_attention` and the plan/explain helpers of both.
"""
from __future__ import annotations

import numpy as np

from . import execute, validate
from .api import explain_route
from .dispatch import Unsupported, VarlenCall, route_varlen
from .paged import paged_call


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q, max_seqlen_k,
                     seqused_q=None, seqused_k=None, scale=None, is_causal=False,
                     local_window_size=None, logits_soft_cap=None, sinks=None,
                     implementation=None, return_residual=False, return_lse=False,
                     num_splits=None, deterministic=False):
    """Attention over a packed batch of sequences of different lengths.

    q (total_q, N, H), k (total_k, K, H), v (total_k, K, Hv); sequence b owns rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] of q (of which the first seqused_q[b] are used,
    if given), likewise for keys.  max_seqlen_q/k must bound every sequence's length:
    the kernel computes every row regardless, but the pure-JAX path pads to them and
    truncates a longer sequence (its query rows from max_seqlen_q on come back zero
    with lse -inf; keys from max_seqlen_k on are not seen).  Bad offsets never read
    out of bounds: cu_seqlens are made non-decreasing and clipped to the rows, seqused
    to its sequence's rows (docs/PAGED.md, "Bad input: what each gets").
    Returns out (total_q, N, Hv) (rows outside every used range are zero) and, with
    return_residual (or return_lse: the same here) lse float32 (total_q, N),
    differentiable.  implementation: None, 'fa4' or 'xla'
    (jax_fa4's pure-JAX path).  num_splits: split-KV slices (see paged_attention); packed
    queries run unsplit, so only None or 1 are accepted here.  deterministic: gradients
    with the same bits on every run (see `jax_fa4.attention`).
    """
    deterministic = validate.flag(deterministic, "deterministic")
    call, args, vals = varlen_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                seqused_q, seqused_k, scale, is_causal, local_window_size,
                                logits_soft_cap, sinks, implementation, num_splits)
    o, lse = execute.varlen(route_varlen(call, implementation), "varlen", args,
                            scale=vals["scale"], window=vals["window"], softcap=vals["softcap"],
                            max_seqlen_q=vals["max_q"], max_seqlen_k=vals["max_k"],
                            forced=implementation == "fa4", deterministic=deterministic)
    return (o, lse.T) if return_residual or return_lse else o


def varlen_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q,
                seqused_k, scale, is_causal, local_window_size, logits_soft_cap, sinks,
                implementation, num_splits=None):
    """Validates a varlen call -> (VarlenCall, kernel operands, validated values)."""
    a = validate.varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             seqused_q, seqused_k, scale, is_causal, local_window_size,
                             logits_soft_cap, sinks, implementation, num_splits)
    q, k, v = a["q"], a["k"], a["v"]
    args = dict(q=q, k=k, v=v, cu_seqlens_q=a["cu_q"], cu_seqlens_k=a["cu_k"],
                seqused_q=a["seqused_q"], seqused_k=a["seqused_k"], sinks=a["sinks"])
    args = {n: x for n, x in args.items() if x is not None}
    call = VarlenCall(
        dtype=np.dtype(q.dtype).name, q_layout="packed", kv_layout="packed", batch=a["batch"],
        total_q=q.shape[0], heads_q=q.shape[1], heads_k=k.shape[1], head_dim=q.shape[2],
        head_dim_v=v.shape[2], kv_rows=k.shape[0], window=a["window"], softcap=a["softcap"],
        has_sinks=a["sinks"] is not None, has_seqused_q=a["seqused_q"] is not None,
        has_seqused_k=a["seqused_k"] is not None, num_splits=a["num_splits"])
    return call, args, a


def _call_of(fn: str, kwargs: dict) -> VarlenCall:
    kw = dict(scale=None, is_causal=False, local_window_size=None, logits_soft_cap=None,
              sinks=None, implementation=None)
    if fn == "varlen_attention":
        kw.update(seqused_q=None, seqused_k=None)
        kw.update(kwargs)
        return varlen_call(**kw)[0]
    if fn == "paged_attention":
        kw.update(cu_seqlens_q=None, max_seqlen_q=None)
        kw.update(kwargs)
        return paged_call(**kw)[0]
    raise ValueError(f"fn must be 'varlen_attention' or 'paged_attention', got {fn!r}")


def kernel_plan(fn: str, **kwargs):
    """The kernel plan `varlen_attention` / `paged_attention` (fn) would use with these
    arguments (arrays or ShapeDtypeStructs) on an SM90 GPU; raises dispatch.Unsupported
    if it would fall back.  Needs no GPU and no compiler (used by precompile)."""
    route = route_varlen(_call_of(fn, kwargs))
    if route.path != "kernel":
        raise Unsupported(route.reason)
    return route.plan


def explain_call(fn: str, *, platform=None, backward=False, **kwargs):
    """Why `varlen_attention` / `paged_attention` (fn) with these arguments (arrays or
    ShapeDtypeStructs) would not run the FA4 kernel, or None if it would.  platform:
    where it would run; default: JAX's default backend.  backward=True: why its
    gradient would not run FA4's backward kernel (see `jax_fa4.explain`)."""
    return explain_route(route_varlen(_call_of(fn, kwargs)), platform=platform,
                         backward=backward)
