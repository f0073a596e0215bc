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

from .layout import (dense_lengths_mask, gather_pages, gather_rows, lengths_mask,
                     only_used_keys, unpack_rows, window_visible)


def visible_mask(t: int, s: int, window: tuple[int | None, int | None]) -> jax.Array:
    """(t, s) bool: query i sees key j iff i - left <= j <= i + right (top-left aligned,
    as `jax.nn.dot_product_attention`); None is unbounded."""
    return window_visible(jnp.arange(t)[:, None], jnp.arange(s)[None, :], window)


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
    m = jnp.max(logits, axis=-1, initial=-jnp.inf)  # a call may have no key at all (S = 0)
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


def jax_nn_can_run(head_dim: int, head_dim_v: int, *, softcap, has_sinks) -> bool:
    """Whether `jax.nn.dot_product_attention` expresses the call (no softcap, no sinks,
    one head dim for K and V): static facts, shared by dispatch.route_dense and the
    primitive's lowering off the kernel."""
    return softcap is None and not has_sinks and head_dim == head_dim_v


def jax_nn_window(window):
    """Our (left, right) with None unbounded -> jax.nn's (is_causal, local_window_size)."""
    left, right = window
    if window == (None, None):
        return False, None
    if left is None and right == 0:
        return True, None
    big = 1 << 30  # jax.nn has no unbounded side; this bound never binds
    return False, (big if left is None else left, big if right is None else right)


def dense_fallback(q, k, v, sinks=None, *, scale, window, softcap, platform="cpu",
                   len_q=None, len_k=None):
    """(out, lse (B,N,T) float32) for the primitive on devices without the kernel.

    On CUDA the output comes from jax.nn.dot_product_attention (cuDNN where it accepts
    the call, else XLA) when it expresses the call; the LSE always comes from
    `reference_attention` (jax.nn's residual is rounded to the input dtype and carries
    no gradient), and XLA drops that computation when the LSE is unused.  Elsewhere
    `reference_attention` computes both (it is what jax.nn's XLA path computes, and it
    also runs float16 on CPU, where jax.nn's F16_F16_F32 dot does not lower).
    len_q/len_k (B,): jax.nn's sequence lengths (rows past len_q give zeros).
    """
    lengths = None
    if len_q is not None or len_k is not None:
        lengths = dense_lengths_mask(q.shape[1], k.shape[1], len_q, len_k)
    o_ref, lse = reference_attention(q, k, v, sinks, scale=scale, window=window,
                                     softcap=softcap, mask=lengths)
    if lengths is not None or platform != "cuda" or not jax_nn_can_run(k.shape[-1], v.shape[-1], softcap=softcap,
                                                   has_sinks=sinks is not None):
        return o_ref, lse
    is_causal, local = jax_nn_window(window)
    kwargs = dict(scale=scale, is_causal=is_causal, local_window_size=local)
    try:
        o = jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kwargs)
    except Exception:  # cuDNN rejects this shape/dtype/version: use XLA
        o = jax.nn.dot_product_attention(q, k, v, **kwargs)
    return o, lse


def varlen_fallback(q, k, v, cu_q, cu_k, seqused_q, seqused_k, sinks, *, max_seqlen_q,
                    max_seqlen_k, scale, window, softcap):
    """Packed varlen attention in pure JAX: unpack to (B, max_seqlen, ...), attend with
    per-sequence masks, repack.  Returns (out (total_q, N, Hv), lse (N, total_q)).
    A sequence longer than the static bounds is truncated: its query rows from
    max_seqlen_q on get zeros and lse -inf, its keys from max_seqlen_k on are not seen
    (the kernel computes them all; max_seqlen_* should bound every length)."""
    len_q = cu_q[1:] - cu_q[:-1] if seqused_q is None else seqused_q
    len_k = cu_k[1:] - cu_k[:-1] if seqused_k is None else seqused_k
    qd = gather_rows(q, cu_q[:-1], max_seqlen_q)
    kd, vd = (only_used_keys(gather_rows(x, cu_k[:-1], max_seqlen_k), len_k) for x in (k, v))
    mask = lengths_mask(len_q, len_k, max_seqlen_q, max_seqlen_k, window)
    od, lse_d = reference_attention(qd, kd, vd, sinks, scale=scale, softcap=softcap, mask=mask)
    return unpack_rows(od, lse_d, cu_q, len_q, q.shape[0])


def paged_fallback(q, k_cache, v_cache, page_table, seqused_k, cu_q, seqused_q, sinks, *,
                   max_seqlen_q, scale, window, softcap):
    """Paged attention in pure JAX: gather each sequence's pages, then attend.
    q dense (B, T, N, H) -> (out, lse (B, N, T)); q packed (with cu_q) -> (out packed,
    lse (N, total_q)); packed query rows from max_seqlen_q on are truncated as in
    `varlen_fallback`."""
    kd, vd = (only_used_keys(gather_pages(c, page_table), seqused_k) for c in (k_cache, v_cache))
    if cu_q is None:
        b, t = q.shape[:2]
        len_q = jnp.full((b,), t, jnp.int32) if seqused_q is None else seqused_q
        mask = lengths_mask(len_q, seqused_k, t, kd.shape[1], window)
        o, lse = reference_attention(q, kd, vd, sinks, scale=scale, softcap=softcap, mask=mask)
        if seqused_q is not None:  # rows past a sequence's used length: zeros
            valid = jnp.arange(t)[None, :] < seqused_q[:, None]
            o = jnp.where(valid[:, :, None, None], o, 0).astype(o.dtype)
            lse = jnp.where(valid[:, None, :], lse, -jnp.inf)
        return o, lse
    len_q = cu_q[1:] - cu_q[:-1] if seqused_q is None else seqused_q
    qd = gather_rows(q, cu_q[:-1], max_seqlen_q)
    mask = lengths_mask(len_q, seqused_k, max_seqlen_q, kd.shape[1], window)
    od, lse_d = reference_attention(qd, kd, vd, sinks, scale=scale, softcap=softcap, mask=mask)
    return unpack_rows(od, lse_d, cu_q, len_q, q.shape[0])


def run(kind: str, a: dict, *, scale, window, softcap, max_seqlen_q=None, max_seqlen_k=None,
        platform="cpu"):
    """The pure-JAX computation for an operand dict `a` (kernels/forward_abi.py names) of
    a 'dense', 'varlen' or 'paged' call: (out, lse laid out as the kernel lays it out)."""
    common = dict(scale=scale, window=window, softcap=softcap)
    if kind == "dense":
        return dense_fallback(a["q"], a["k"], a["v"], a.get("sinks"), platform=platform,
                              len_q=a.get("seqused_q"), len_k=a.get("seqused_k"), **common)
    if kind == "varlen":
        return varlen_fallback(
            a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a.get("seqused_q"),
            a.get("seqused_k"), a.get("sinks"), max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, **common)
    return paged_fallback(
        a["q"], a["k"], a["v"], a["page_table"], a["seqused_k"], a.get("cu_seqlens_q"),
        a.get("seqused_q"), a.get("sinks"), max_seqlen_q=max_seqlen_q, **common)
