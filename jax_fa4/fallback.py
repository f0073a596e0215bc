"""Pure-JAX attention: the path for every call the FA4 kernel does not take.

`reference_attention` computes exactly what the kernel computes (softcap, sinks,
windows, GQA, LSE) with float32 softmax, for platforms without the kernel and for
features `jax.nn.dot_product_attention` lacks.  `dense_fallback` prefers
`jax.nn.dot_product_attention` (cuDNN on GPUs where it can run, else XLA) when
the call is one it can express.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def visible_mask(t: int, s: int, window: tuple[int | None, int | None]) -> jax.Array:
    """(t, s) bool: query i sees key j iff i - left <= j <= i + right (top-left aligned,
    as `jax.nn.dot_product_attention`); None is unbounded."""
    left, right = window
    i = np.arange(t)[:, None]
    j = np.arange(s)[None, :]
    m = np.ones((t, s), bool)
    if left is not None:
        m &= j >= i - left
    if right is not None:
        m &= j <= i + right
    return jnp.asarray(m)


def reference_attention(q, k, v, sinks=None, *, scale, window=(None, None), softcap=None,
                        bias=None, mask=None):
    """Attention with float32 softmax.  q (B,T,N,H), k (B,S,K,H), v (B,S,K,Hv), sinks (N,);
    bias (added to the capped logits) and mask (True = visible) broadcast to (B,N,T,S).

    Returns (out (B,T,N,Hv) in q's dtype, lse (B,N,T) float32).  Rows that see no key
    give zeros and lse = log(exp(sink)) (or -inf without sinks), as the FA4 kernel.
    """
    b, t, n, h = q.shape
    _, s, kh, hv = v.shape
    g = n // kh
    qg = q.reshape(b, t, kh, g, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(scale)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    if bias is not None:
        bias = jnp.broadcast_to(bias, (b, n, t, s)).reshape(b, kh, g, t, s)
        logits = logits + bias.astype(jnp.float32)
    visible = None
    if window != (None, None):
        visible = visible_mask(t, s, window)
    if mask is not None:
        m_ = jnp.broadcast_to(mask, (b, n, t, s)).reshape(b, kh, g, t, s)
        visible = m_ if visible is None else (m_ & visible)
    if visible is not None:
        logits = jnp.where(visible, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1)
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(kh, g)[None, :, :, None]
        m = jnp.maximum(m, sink)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.exp(logits - m[..., None])
    l = jnp.sum(p, axis=-1)
    if sinks is not None:
        l = l + jnp.exp(sink - m)
    has_mass = l > 0
    l_safe = jnp.where(has_mass, l, 1.0)
    o = jnp.einsum("bkgts,bskh->btkgh", p, v.astype(jnp.float32)) / jnp.moveaxis(
        l_safe, -1, 1
    )[..., None]
    lse = jnp.where(has_mass, jnp.log(l_safe) + m, -jnp.inf)
    return o.reshape(b, t, n, hv).astype(q.dtype), lse.reshape(b, n, t)


def jax_nn_can_run(q, k, v, *, softcap, has_sinks) -> bool:
    """Whether `jax.nn.dot_product_attention` expresses the call (no softcap, no sinks,
    one head dim for K and V)."""
    return softcap is None and not has_sinks and k.shape[-1] == v.shape[-1]


def jax_nn_window(window):
    """Our (left, right) with None unbounded -> jax.nn's (is_causal, local_window_size)."""
    left, right = window
    if window == (None, None):
        return False, None
    if left is None and right == 0:
        return True, None
    big = 1 << 30  # jax.nn has no unbounded side; this bound never binds
    return False, (big if left is None else left, big if right is None else right)


def dense_fallback(q, k, v, sinks=None, *, scale, window, softcap, implementation=None):
    """(out, lse (B,N,T) float32) by jax.nn.dot_product_attention when it expresses the
    call, else by `reference_attention`."""
    if jax_nn_can_run(q, k, v, softcap=softcap, has_sinks=sinks is not None):
        is_causal, local = jax_nn_window(window)
        kwargs = dict(scale=scale, is_causal=is_causal, local_window_size=local,
                      return_residual=True)
        if implementation == "cudnn-if-possible":
            try:
                o, res = jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kwargs)
                return o, jnp.swapaxes(res, 1, 2).astype(jnp.float32)
            except Exception:  # cuDNN rejects this shape/dtype/version: use XLA
                implementation = None
        o, res = jax.nn.dot_product_attention(q, k, v, implementation=implementation, **kwargs)
        return o, jnp.swapaxes(res, 1, 2).astype(jnp.float32)
    return reference_attention(q, k, v, sinks, scale=scale, window=window, softcap=softcap)
