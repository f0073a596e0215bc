"""Pure-JAX attention backward for the calls FA4's SM90 backward does not take (head
dim 512, paged KV, non-CUDA platforms), memory-frugal: a `lax.scan` over key chunks
recomputes each chunk's probabilities from the saved LSE (as flash attention's
backward does), so no (T, S) matrix is ever held; at most (T, chunk) per head.

Given saved out O and lse (natural log, sink included), dO and dLSE:
    D   = rowsum(dO * O) - dLSE
    P   = exp(S - lse)                     S: scaled (soft-capped) logits
    dV  = P^T dO,  dP = dO V^T,  dS = P * (dP - D) (* softcap derivative) * scale
    dQ  = dS K,    dK = dS^T Q,  dsinks = -sum_rows exp(sink - lse) * D
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import fallback_forward
from .layout import gather_pages, gather_rows, only_used_keys, window_visible

# Scores held per chunk step (elements, all heads): bounds the scan's working set.
_CHUNK_ELEMENTS = 1 << 25


def _chunk_size(rows: int, s: int) -> int:
    c = 16
    while c < 1024 and c * 2 * rows <= _CHUNK_ELEMENTS and c < s:
        c *= 2
    return c


def dense_backward(q, k, v, o, do, lse, dlse, sinks=None, *, scale, softcap=None,
                   len_q=None, len_k=None, window=(None, None), bottom_right=False,
                   chunk=None):
    """Gradients (dq, dk, dv, dsinks or None) of attention in the (B,T,N,H) layout.

    lse, dlse: (B, N, T) float32.  Visibility: query t sees key s iff t < len_q[b],
    s < len_k[b] (lengths (B,) or None = all) and s lies in `window` (left, right) around
    t's position: t itself (top-left, jax.nn), or t + len_k - len_q (bottom-right, FA).
    Arithmetic in float32 (float64 for float64 inputs); gradients in the inputs' dtypes.
    """
    b, t, n, h = q.shape
    s, kh, hv = k.shape[1], k.shape[2], v.shape[-1]
    g = n // kh
    f = jnp.promote_types(q.dtype, jnp.float32)
    c = chunk or _chunk_size(b * n * t, s)
    n_chunks = -(-s // c)
    pad = n_chunks * c - s

    tq = jnp.arange(t)[None, :, None]  # (1, T, 1)
    lq = jnp.full((b,), t) if len_q is None else len_q
    lk = jnp.full((b,), s) if len_k is None else len_k
    lq, lk = lq[:, None, None], lk[:, None, None]
    # Rows past a sequence's length hold whatever the kernel left there (its out and
    # lse are unwritten): keep them out of every product.
    row_ok = (tq[..., 0] < lq[..., 0])[:, None, None, :]  # (B, 1, 1, T)

    qg = q.astype(f).reshape(b, t, kh, g, h)
    dog = do.astype(f).reshape(b, t, kh, g, hv)
    delta = jnp.sum(do.astype(f) * o.astype(f), axis=-1)  # (B, T, N)
    delta = jnp.moveaxis(delta, 1, 2).reshape(b, kh, g, t) - dlse.astype(f).reshape(b, kh, g, t)
    delta = jnp.where(row_ok, delta, 0)
    lse_g = lse.astype(f).reshape(b, kh, g, t)
    # A row that sees nothing (lse = -inf) has P = 0: exp(S - inf).
    lse_g = jnp.where(jnp.isneginf(lse_g) | ~row_ok, jnp.inf, lse_g)
    pos = tq + (lk - lq if bottom_right else 0)

    def visible(s0):
        sk = s0 + jnp.arange(c)[None, None, :]  # (1, 1, C)
        vis = (tq < lq) & (sk < lk) & (sk < s) & window_visible(pos, sk, window)
        return vis[:, None, None]  # (B, 1, 1, T, C)

    kc = jnp.pad(k.astype(f), ((0, 0), (0, pad), (0, 0), (0, 0)))
    vc = jnp.pad(v.astype(f), ((0, 0), (0, pad), (0, 0), (0, 0)))
    kc = jnp.moveaxis(kc.reshape(b, n_chunks, c, kh, h), 1, 0)
    vc = jnp.moveaxis(vc.reshape(b, n_chunks, c, kh, hv), 1, 0)

    def step(dq, xs):
        i, kb, vb = xs
        logits = jnp.einsum("btkgh,bckh->bkgtc", qg, kb) * scale
        if softcap is not None:
            th = jnp.tanh(logits / softcap)
            logits = softcap * th
        p = jnp.where(visible(i * c), jnp.exp(logits - lse_g[..., None]), 0)
        dv = jnp.einsum("bkgtc,btkgh->bckh", p, dog)
        dp = jnp.einsum("btkgh,bckh->bkgtc", dog, vb)
        ds = p * (dp - delta[..., None])
        if softcap is not None:
            ds = ds * (1 - th * th)
        ds = ds * scale
        dq = dq + jnp.einsum("bkgtc,bckh->btkgh", ds, kb)
        dk = jnp.einsum("bkgtc,btkgh->bckh", ds, qg)
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros_like(qg), (jnp.arange(n_chunks), kc, vc))
    dk = jnp.moveaxis(dk, 0, 1).reshape(b, n_chunks * c, kh, h)[:, :s]
    dv = jnp.moveaxis(dv, 0, 1).reshape(b, n_chunks * c, kh, hv)[:, :s]
    dsinks = None
    if sinks is not None:
        p_sink = jnp.exp(sinks.astype(f).reshape(kh, g)[None, :, :, None] - lse_g)
        dsinks = -jnp.sum(p_sink * delta, axis=(0, 3)).reshape(n)
        dsinks = dsinks.astype(sinks.dtype)
    return (dq.reshape(b, t, n, h).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            dsinks)


def _scatter_back(f, x, cotangent):
    """Transpose of the linear gather `f` at x: adds the padded cotangent back to rows."""
    _, vjp = jax.vjp(f, x)
    return vjp(cotangent)[0]


def varlen_backward(a: dict, o, lse, do, dlse, *, scale, window, softcap, max_seqlen_q,
                    max_seqlen_k):
    """Gradients for a packed (varlen) call: rows gathered into (B, max_seqlen) blocks,
    dense_backward with per-sequence lengths (bottom-right windows), scattered back.
    a: forward_abi operand names; o (total_q, N, Hv), lse/dlse (N, total_q)."""
    cu_q, cu_k = a["cu_seqlens_q"], a["cu_seqlens_k"]
    len_q = a.get("seqused_q", cu_q[1:] - cu_q[:-1])
    len_k = a.get("seqused_k", cu_k[1:] - cu_k[:-1])
    gq = lambda x: gather_rows(x, cu_q[:-1], max_seqlen_q)  # noqa: E731
    # Keys past a sequence's length are zeroed (rows no sequence sees may hold NaN).
    gk = lambda x: only_used_keys(gather_rows(x, cu_k[:-1], max_seqlen_k), len_k)  # noqa: E731
    gs = lambda x: jnp.moveaxis(gq(x.T), 2, 1)  # (N, total) -> (B, N, T)  # noqa: E731
    dq, dk, dv, dsinks = dense_backward(
        gq(a["q"]), gk(a["k"]), gk(a["v"]), gq(o), gq(do), gs(lse), gs(dlse), a.get("sinks"),
        scale=scale, softcap=softcap, len_q=len_q, len_k=len_k, window=window,
        bottom_right=True)
    # Padding rows of a block alias other sequences' rows (clamped gather): the length
    # masks zeroed their gradients, so the scatter adds nothing wrong.
    return dict(q=_scatter_back(gq, a["q"], dq), k=_scatter_back(gk, a["k"], dk),
                v=_scatter_back(gk, a["v"], dv), sinks=dsinks)


def paged_backward(a: dict, o, lse, do, dlse, *, scale, window, softcap, max_seqlen_q):
    """Gradients for a paged call (pages gathered per sequence, then dense_backward).
    q dense (B, T, N, H) with lse (B, N, T), or packed with cu_seqlens_q."""
    pt, used_k = a["page_table"], a["seqused_k"]
    gp = lambda cache: only_used_keys(gather_pages(cache, pt), used_k)  # noqa: E731
    kd, vd = gp(a["k"]), gp(a["v"])
    common = dict(scale=scale, softcap=softcap, len_k=used_k, window=window, bottom_right=True)
    if "cu_seqlens_q" not in a:
        bq, t = a["q"].shape[:2]
        len_q = a.get("seqused_q", jnp.full((bq,), t, jnp.int32))
        dq, dk, dv, dsinks = dense_backward(a["q"], kd, vd, o, do, lse, dlse, a.get("sinks"),
                                            len_q=len_q, **common)
    else:
        cu_q = a["cu_seqlens_q"]
        len_q = a.get("seqused_q", cu_q[1:] - cu_q[:-1])
        gq = lambda x: gather_rows(x, cu_q[:-1], max_seqlen_q)  # noqa: E731
        gs = lambda x: jnp.moveaxis(gq(x.T), 2, 1)  # noqa: E731
        dqd, dk, dv, dsinks = dense_backward(gq(a["q"]), kd, vd, gq(o), gq(do), gs(lse),
                                             gs(dlse), a.get("sinks"), len_q=len_q, **common)
        dq = _scatter_back(gq, a["q"], dqd)
    return dict(q=dq, k=_scatter_back(gp, a["k"], dk), v=_scatter_back(gp, a["v"], dv),
                sinks=dsinks)


def run(kind: str, a: dict, o, lse, do, dlse, *, scale, window, softcap, max_seqlen_q=None,
        max_seqlen_k=None) -> dict:
    """Gradients (operand name -> array; sinks None without sinks) of a 'dense', 'varlen'
    or 'paged' call; o/lse/do/dlse laid out as the kernel lays out out and lse."""
    if kind == "dense":
        dq, dk, dv, dsinks = dense_backward(a["q"], a["k"], a["v"], o, do, lse, dlse,
                                            a.get("sinks"), scale=scale, softcap=softcap,
                                            window=window, len_q=a.get("seqused_q"),
                                            len_k=a.get("seqused_k"))
        return dict(q=dq, k=dk, v=dv, sinks=dsinks)
    if kind == "varlen":
        return varlen_backward(a, o, lse, do, dlse, scale=scale, window=window, softcap=softcap,
                               max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    return paged_backward(a, o, lse, do, dlse, scale=scale, window=window, softcap=softcap,
                          max_seqlen_q=max_seqlen_q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def reference_attention(q, k, v, sinks, scale, window, softcap):
    """fallback_forward.reference_attention (dense, top-left windows, no bias/mask) whose
    gradient is dense_backward's: the residuals are q, k, v, out and lse, never the
    (T, S) probabilities autodiff of the forward would keep."""
    return fallback_forward.reference_attention(q, k, v, sinks, scale=scale, window=window,
                                        softcap=softcap)


def _ref_fwd(q, k, v, sinks, scale, window, softcap):
    o, lse = reference_attention(q, k, v, sinks, scale, window, softcap)
    return (o, lse), (q, k, v, sinks, o, lse)


def _ref_bwd(scale, window, softcap, res, cts):
    q, k, v, sinks, o, lse = res
    do, dlse = cts
    dq, dk, dv, dsinks = dense_backward(q, k, v, o, do.astype(o.dtype), lse, dlse, sinks,
                                        scale=scale, softcap=softcap, window=window)
    return dq, dk, dv, dsinks


reference_attention.defvjp(_ref_fwd, _ref_bwd)
