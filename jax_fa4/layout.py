"""Row and page layouts of the pure-JAX paths: packed rows <-> padded (B, T) rows,
pages -> per-sequence keys, per-sequence visibility, and the one window rule every
pure-JAX mask uses (forward and backward)."""
from __future__ import annotations

import jax.numpy as jnp


def window_visible(q_pos, k_pos, window):
    """Query at key position q_pos sees key k_pos iff q_pos - left <= k_pos <=
    q_pos + right (broadcasting arrays; None = unbounded)."""
    left, right = window
    vis = jnp.ones(jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(k_pos)), bool)
    if left is not None:
        vis &= k_pos >= q_pos - left
    if right is not None:
        vis &= k_pos <= q_pos + right
    return vis


def lengths_mask(len_q, len_k, tq: int, tk: int, window):
    """(B, 1, tq, tk) visibility for per-sequence lengths, windows bottom-right aligned
    (FA's convention: query t of a sequence sits at key position len_k - len_q + t)."""
    t = jnp.arange(tq)[None, :, None]
    s = jnp.arange(tk)[None, None, :]
    lq, lk = len_q[:, None, None], len_k[:, None, None]
    vis = (t < lq) & (s < lk) & window_visible(t + lk - lq, s, window)
    return vis[:, None]


def only_used_keys(x, len_k):
    """(B, S, K, H) gathered keys or values -> rows at positions >= len_k[b] zeroed.
    Rows no sequence may see (freed pages, padding, rows past seqused_k) can hold
    anything, NaN included; masking their logits to -inf is not enough, since the
    softmax weight 0 times a NaN value is NaN."""
    keep = jnp.arange(x.shape[1])[None, :] < len_k[:, None]
    return jnp.where(keep[:, :, None, None], x, jnp.zeros((), x.dtype))


def gather_rows(x, starts, width: int):
    """Packed (total, ...) -> (B, width, ...) rows starts[b] + i (clamped; masked later).
    With no rows at all (total 0: an empty packed batch), zeros: every such row is
    outside every sequence and masked."""
    if x.shape[0] == 0:
        return jnp.zeros((starts.shape[0], width, *x.shape[1:]), x.dtype)
    idx = jnp.clip(starts[:, None] + jnp.arange(width)[None, :], 0, x.shape[0] - 1)
    return x[idx]


def packed_rows(cu_q, len_q, total: int):
    """For packed rows 0..total-1: (sequence index, position in it, used?)."""
    r = jnp.arange(total)
    b = jnp.clip(jnp.searchsorted(cu_q, r, side="right") - 1, 0, cu_q.shape[0] - 2)
    t = r - cu_q[b]
    return b, t, (t >= 0) & (t < len_q[b])


def unpack_rows(od, lse_d, cu_q, len_q, total: int):
    """(B, T, N, Hv), (B, N, T) -> packed (total, N, Hv), (N, total); rows outside every
    sequence's used length get zeros and lse -inf, and so do rows at positions >= T
    (a sequence longer than max_seqlen_q is truncated, never given another row's
    result)."""
    b, t, valid = packed_rows(cu_q, len_q, total)
    valid &= t < od.shape[1]
    t = jnp.clip(t, 0, od.shape[1] - 1)
    o = jnp.where(valid[:, None, None], od[b, t], 0).astype(od.dtype)
    lse = jnp.where(valid[None, :], lse_d[b, :, t].T, -jnp.inf)
    return o, lse


def gather_pages(cache, page_table):
    """(pages, page_size, K, H) cache, (B, max_pages) table -> (B, max_pages*page_size, K, H).
    Page indices must be in range (guard.py clips them before this runs)."""
    b, mp = page_table.shape
    if cache.shape[0] == 0:  # a cache of no pages: no key exists (guard.py sets seqused_k 0)
        return jnp.zeros((b, mp * cache.shape[1], *cache.shape[2:]), cache.dtype)
    x = cache[page_table]
    return x.reshape(b, mp * cache.shape[1], *cache.shape[2:])


def dense_lengths_mask(t: int, s: int, q_len, kv_len):
    """(B, 1, t, s) visibility of jax.nn's sequence lengths (top-left, as jax.nn:
    query row i < q_len[b], key j < kv_len[b]); None = every row / key."""
    vis = jnp.ones((1, t, s), bool)
    if q_len is not None:
        vis = vis & (jnp.arange(t)[None, :, None] < q_len[:, None, None])
    if kv_len is not None:
        vis = vis & (jnp.arange(s)[None, None, :] < kv_len[:, None, None])
    return vis[:, None]


def rows_can_be_empty(t: int, s: int, window) -> bool:
    """Whether, without masks or lengths, some query row of a (t, s) top-left window
    sees no key (static: the first and last rows are the extremes)."""
    left, right = window
    for row in {0, t - 1} if t else ():
        lo = 0 if left is None else max(row - left, 0)
        hi = s - 1 if right is None else min(row + right, s - 1)
        if lo > hi:
            return True
    return False


def rows_seeing_keys(b: int, t: int, s: int, n: int, window, kv_len=None, mask=None):
    """(B, T, N) bool: query row sees at least one key under the top-left `window`,
    jax.nn's key_value_seq_lengths and a bool `mask` broadcastable to (B, N, T, S)."""
    vis = window_visible(jnp.arange(t)[:, None], jnp.arange(s)[None, :], window)[None, None]
    vis = vis & dense_lengths_mask(t, s, None, kv_len)
    if mask is not None:
        vis = vis & mask
    return jnp.moveaxis(jnp.broadcast_to(jnp.any(vis, axis=-1), (b, n, t)), 1, 2)
