"""Carries out a route (dispatch.Route): the jax_fa4 primitive, jax.nn, or jax_fa4's
pure-JAX attention.  Decides nothing: the path is the route's."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import fallback_backward, fallback_forward, guard
from .autodiff import fa4_call
from .dispatch import Route
from .forward_primitive import FwdParams
from .layout import packed_rows


def _raise_if_error(route: Route) -> None:
    if route.path == "error":
        raise NotImplementedError(route.error)


def dense(route: Route, q, k, v, bias, mask, sinks, *, scale, window, softcap,
          return_residual: bool, forced: bool):
    """(out (B,T,N,Hv), lse (B,T,N) float32 or None) of a 4-D `attention` call."""
    _raise_if_error(route)
    if route.path == "kernel":
        params = FwdParams("dense", route.plan, scale, window, softcap, forced=forced)
        args = dict(q=q, k=k, v=v) if sinks is None else dict(q=q, k=k, v=v, sinks=sinks)
        o, lse = fa4_call(args, params)
        return o, jnp.swapaxes(lse, 1, 2)
    if route.path == "jax_nn":
        is_causal, local = fallback_forward.jax_nn_window(window)
        out = jax.nn.dot_product_attention(
            q, k, v, bias, mask, scale=scale, is_causal=is_causal, local_window_size=local,
            implementation=route.nn_implementation, return_residual=return_residual)
        if not return_residual:
            return out, None
        o, res = out
        return o, res.astype(jnp.float32)
    if bias is None and mask is None:  # gradient: the memory-frugal pure-JAX backward
        o, lse = fallback_backward.reference_attention(q, k, v, sinks, scale, window, softcap)
    else:
        o, lse = fallback_forward.reference_attention(q, k, v, sinks, scale=scale,
                                                      window=window, softcap=softcap,
                                                      bias=bias, mask=mask)
    return o, jnp.swapaxes(lse, 1, 2)


def varlen(route: Route, kind: str, args: dict, *, scale, window, softcap, max_seqlen_q,
           max_seqlen_k, forced: bool):
    """(out, lse as the kernel lays it out) of a 'varlen' or 'paged' call, both paths
    from the same operands with their metadata clamped in bounds (guard.py)."""
    _raise_if_error(route)
    args = guard.clamped_operands(kind, args)
    if route.path == "kernel":
        params = FwdParams(kind, route.plan, scale, window, softcap, forced=forced,
                           max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
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
