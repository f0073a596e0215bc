"""Carries out a route (dispatch.Route): the jax_fa4 primitive, jax.nn, or jax_fa4's
pure-JAX attention.  Decides nothing: the path is the route's."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import fallback_backward, fallback_forward, guard, validate
from .autodiff import fa4_call
from .dispatch import Route
from .forward_primitive import FwdParams
from .layout import dense_lengths_mask, packed_rows, rows_can_be_empty, rows_seeing_keys


def _raise_if_error(route: Route) -> None:
    if route.path == "error":
        raise NotImplementedError(route.error)


def dense(route: Route, q, k, v, bias, mask, sinks, q_len, kv_len, *, scale, window,
          softcap, forced: bool, deterministic: bool = False):
    """(out (B,T,N,Hv), lse (B,T,N) float32) of a 4-D `attention` call, under one rule
    on every path: a query row that sees no key (past query_seq_lengths, or every key
    masked, padded or outside the window) gives zeros and lse -inf.  deterministic
    reaches the kernel's backward; the other paths' backwards are XLA's (no atomics)."""
    _raise_if_error(route)
    b, t, n, _ = q.shape
    s = k.shape[1]
    q_len, kv_len = guard.dense_lengths(q_len, kv_len, t, s)
    if route.path == "kernel":
        kernel = lambda: _kernel(route.plan, q, k, v, sinks, q_len, kv_len, scale=scale,  # noqa: E731
                                 window=window, softcap=softcap, forced=forced,
                                 deterministic=deterministic)
        if route.plan.lengths_check:  # causal with key lengths: exact when this holds
            o, lse = jax.lax.cond(
                lengths_fit(q_len, kv_len, window, t, s), kernel,
                lambda: _reference(q, k, v, None, None, sinks, q_len, kv_len, scale=scale,
                                   window=window, softcap=softcap))
        else:
            o, lse = kernel()
    elif route.path == "jax_nn":
        is_causal, local = fallback_forward.jax_nn_window(window)
        o, res = jax.nn.dot_product_attention(
            q, k, v, bias, mask, scale=scale, is_causal=is_causal, local_window_size=local,
            query_seq_lengths=q_len, key_value_seq_lengths=kv_len,
            implementation=route.nn_implementation, return_residual=True)
        lse = res.astype(jnp.float32)
        # jax.nn gives rows that see no key the mean of V (XLA) or zeros (cuDNN); its
        # lengths are jax.nn's own, so the rows to clear are exactly those.  (Rows past
        # query_seq_lengths are cleared below, on every path.)
        if mask is not None or kv_len is not None or rows_can_be_empty(t, s, window):
            o, lse = _zero_rows(o, lse, rows_seeing_keys(b, t, s, n, window, kv_len, mask))
    else:
        o, lse = _reference(q, k, v, bias, mask, sinks, q_len, kv_len, scale=scale,
                            window=window, softcap=softcap)
    return _zero_padded_rows(o, lse, q_len)


def _zero_padded_rows(o, lse, q_len):
    """Query rows past query_seq_lengths: zeros and lse -inf, sinks or not, on every
    path (the kernel computed or skipped them; the reference gave them the sink's lse;
    jax.nn's rows there are zeros with a finite residual)."""
    if q_len is None:
        return o, lse
    b, t, n = lse.shape
    valid = jnp.arange(t)[None, :] < q_len[:, None]
    return _zero_rows(o, lse, jnp.broadcast_to(valid[:, :, None], (b, t, n)))


def _kernel(plan, q, k, v, sinks, q_len, kv_len, *, scale, window, softcap, forced,
            deterministic):
    """The primitive, lengths (clamped by guard.dense_lengths) as seqused operands."""
    args = dict(q=q, k=k, v=v)
    if plan.variant.has_seqused_q:
        args["seqused_q"] = q_len
    if plan.variant.has_seqused_k:
        args["seqused_k"] = kv_len
    if sinks is not None:
        args["sinks"] = sinks
    o, lse = fa4_call(args, FwdParams("dense", plan, scale, window, softcap, forced=forced,
                                      deterministic=deterministic))
    return o, jnp.swapaxes(lse, 1, 2)


def lengths_fit(q_len, kv_len, window, t: int, s: int):
    """Device-side (lengths clamped): no valid query row's window (right bound <= 0, top-left) reaches a
    key past its sequence's key length, so the unpadded kernel is exact."""
    lq = jnp.full((kv_len.shape[0],), t) if q_len is None else q_len
    return jnp.all(jnp.minimum(lq + window[1], s) <= kv_len)


def _reference(q, k, v, bias, mask, sinks, q_len, kv_len, *, scale, window, softcap):
    """jax_fa4's pure-JAX attention; its rows that see no key already give zeros."""
    if q_len is not None or kv_len is not None:
        lengths = dense_lengths_mask(q.shape[1], k.shape[1], q_len, kv_len)
        mask = lengths if mask is None else (mask & lengths)
    if bias is None and mask is None and not validate.traced(scale):
        # the memory-frugal pure-JAX backward
        o, lse = fallback_backward.reference_attention(q, k, v, sinks, scale, window, softcap)
    else:
        o, lse = fallback_forward.reference_attention(q, k, v, sinks, scale=scale,
                                                      window=window, softcap=softcap,
                                                      bias=bias, mask=mask)
    return o, jnp.swapaxes(lse, 1, 2)


def _zero_rows(o, lse, rows):
    """rows (B, T, N) bool: where False, out 0 and lse -inf."""
    return (jnp.where(rows[..., None], o, 0).astype(o.dtype),
            jnp.where(rows, lse, -jnp.inf))


def varlen(route: Route, kind: str, args: dict, *, scale, window, softcap, max_seqlen_q,
           max_seqlen_k, forced: bool, deterministic: bool = False):
    """(out, lse as the kernel lays it out) of a 'varlen' or 'paged' call, both paths
    from the same operands with their metadata clamped in bounds (guard.py)."""
    _raise_if_error(route)
    args = guard.clamped_operands(kind, args)
    if route.path == "kernel":
        params = FwdParams(kind, route.plan, scale, window, softcap, forced=forced,
                           max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                           deterministic=deterministic)
        o, lse = fa4_call(args, params)
        if "cu_seqlens_q" in args:  # the kernel leaves rows outside every sequence unwritten
            cu_q = args["cu_seqlens_q"]
            len_q = args.get("seqused_q", cu_q[1:] - cu_q[:-1])
            _, _, used = packed_rows(cu_q, len_q, o.shape[0])
            o = jnp.where(used[:, None, None], o, 0).astype(o.dtype)
            lse = jnp.where(used[None, :], lse, -jnp.inf)
        return o, lse
    return fallback_forward.run(kind, args, scale=scale, window=window, softcap=softcap,
                        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
