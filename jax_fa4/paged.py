"""`paged_attention`: attention of dense or packed queries against a paged KV cache
(conventions in varlen.py and docs/PAGED.md), and its strict page-table check."""
from __future__ import annotations

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np

from . import execute, validate
from .dispatch import VarlenCall, route_varlen


def paged_attention(q, k_cache, v_cache, page_table, seqused_k, *, cu_seqlens_q=None,
                    max_seqlen_q=None, scale=None, is_causal=False, local_window_size=None,
                    logits_soft_cap=None, sinks=None, implementation=None,
                    return_residual=False, return_lse=False, check_page_indices=False,
                    num_splits=None):
    """Attention of queries against a paged KV cache.

    k_cache (num_pages, page_size, K, H), v_cache (num_pages, page_size, K, Hv);
    page_table int32 (B, max_pages): sequence b's token t lives in page
    page_table[b, t // page_size], slot t % page_size; seqused_k int32 (B,) tokens per
    sequence.  q dense (B, Tq, N, H) (decode Tq = 1, speculative Tq > 1, chunked
    prefill), or packed (total_q, N, H) with cu_seqlens_q (B+1,) and max_seqlen_q.
    Causal is bottom-right aligned: query i of Tq sees keys up to seqused_k - Tq + i.

    Page indices of the used pages should lie in [0, num_pages) and seqused_k in
    [0, max_pages * page_size].  Nothing reads out of bounds when they do not: inside
    the call, on the device, page indices are clipped to [0, num_pages) and seqused_k
    to [0, max_pages * page_size] (packed q: cu_seqlens_q made non-decreasing and
    clipped to the rows), and both the kernel and the pure-JAX path attend over the
    clipped values (docs/PAGED.md, "Bad input: what each gets").
    check_page_indices=True rejects such arguments instead: with a concrete page_table
    and seqused_k (numpy arrays or jax Arrays, outside jit) the call checks them on
    the host and raises ValueError naming the row; with traced ones (under jit) an
    io_callback checks them when the program runs, before the kernel, and the
    ValueError surfaces as a jax runtime error (jax.errors.JaxRuntimeError) whose
    message contains the ValueError's text.
    Returns out like q with Hv, and with return_residual (or return_lse: the same
    here) lse float32 (B, Tq, N) or (total_q, N), differentiable.

    Decode (dense q whose query rows per KV head fit one kernel tile) runs split-KV:
    each sequence's keys are cut into num_splits slices processed by separate thread
    blocks, then merged.  num_splits=None picks the count from batch, KV heads and the
    page table's capacity (kernels/split.py); 1 turns splitting off; an int > 1 forces
    it (dense q only).
    """
    validate.flag(check_page_indices, "check_page_indices")
    call, args, vals = paged_call(q, k_cache, v_cache, page_table, seqused_k, cu_seqlens_q,
                                  max_seqlen_q, scale, is_causal, local_window_size,
                                  logits_soft_cap, sinks, implementation, num_splits)
    if check_page_indices:
        pt, used = args["page_table"], args["seqused_k"]
        geometry = dict(num_pages=args["k"].shape[0], page_size=args["k"].shape[1])
        if isinstance(pt, jax.core.Tracer) or isinstance(used, jax.core.Tracer):
            args["page_table"] = _checked_page_table(pt, used, **geometry)
        else:  # concrete: check now, raise ValueError here
            validate.page_indices(np.asarray(pt), np.asarray(used), **geometry)
    o, lse = execute.varlen(route_varlen(call, implementation), "paged", args,
                            scale=vals["scale"], window=vals["window"], softcap=vals["softcap"],
                            max_seqlen_q=vals["max_q"], max_seqlen_k=None,
                            forced=implementation == "fa4")
    if not (return_residual or return_lse):
        return o
    return o, (lse.T if call.q_layout == "packed" else jnp.swapaxes(lse, 1, 2))


def paged_call(q, k_cache, v_cache, page_table, seqused_k, cu_seqlens_q, max_seqlen_q, scale,
               is_causal, local_window_size, logits_soft_cap, sinks, implementation,
               num_splits=None):
    """Validates a paged call -> (VarlenCall, kernel operands, validated values)."""
    a = validate.paged_args(q, k_cache, v_cache, page_table, seqused_k, cu_seqlens_q,
                            max_seqlen_q, scale, is_causal, local_window_size, logits_soft_cap,
                            sinks, implementation, num_splits)
    q, kc, vc, pt = a["q"], a["k"], a["v"], a["page_table"]
    args = dict(q=q, k=kc, v=vc, cu_seqlens_q=a["cu_q"], seqused_k=a["seqused_k"],
                page_table=pt, sinks=a["sinks"])
    args = {n: x for n, x in args.items() if x is not None}
    call = VarlenCall(
        dtype=np.dtype(q.dtype).name, q_layout="dense" if a["cu_q"] is None else "packed",
        kv_layout="paged", batch=a["batch"], total_q=int(np.prod(q.shape[:-2])),
        heads_q=q.shape[-2], heads_k=kc.shape[2], head_dim=q.shape[-1], head_dim_v=vc.shape[3],
        kv_rows=kc.shape[0] * kc.shape[1], window=a["window"], softcap=a["softcap"],
        has_sinks=a["sinks"] is not None, has_seqused_k=True, page_size=kc.shape[1],
        max_pages=pt.shape[1], num_splits=a["num_splits"])
    return call, args, a


def _checked_page_table(page_table, seqused_k, *, num_pages, page_size):
    """The (traced) page table, after a host-side check of every page the sequences use
    when the program runs; a bad index raises there, before the kernel reads anything
    (as a jax runtime error carrying the ValueError's message)."""
    def check(pt, used):
        pt = np.asarray(pt)
        validate.page_indices(pt, np.asarray(used), num_pages=num_pages, page_size=page_size)
        return pt

    return jax.experimental.io_callback(
        check, jax.ShapeDtypeStruct(page_table.shape, page_table.dtype), page_table, seqused_k,
        ordered=False)
