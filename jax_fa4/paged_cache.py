"""Writing new tokens into a paged KV cache, inside jit."""
from __future__ import annotations

import jax.numpy as jnp

from .api import _as_array


def update_paged_cache(k_cache, v_cache, k_new, v_new, page_table, positions):
    """Writes k_new/v_new (B, T, K, H) at token positions `positions` (int32 (B, T)) of
    each sequence: token p of sequence b goes to page page_table[b, p // page_size],
    slot p % page_size.  Negative positions (padding), positions past the page
    table and positions whose page index is outside [0, num_pages) are dropped.
    Returns the new (k_cache, v_cache); donate the caches to `jax.jit`
    (donate_argnums) and XLA updates them in place.  Positions must not
    repeat within a call (the scatter assumes unique indices).
    """
    kc, vc, kn, vn = (_as_array(x, n) for x, n in ((k_cache, "k_cache"), (v_cache, "v_cache"),
                                                   (k_new, "k_new"), (v_new, "v_new")))
    pt, pos = _as_array(page_table, "page_table"), _as_array(positions, "positions")
    if kc.ndim != 4 or vc.shape[:3] != kc.shape[:3]:
        raise ValueError(f"k_cache {kc.shape} / v_cache {vc.shape} must be (pages, page_size, "
                         "kv_heads, head_dim) with equal pages, page size and heads")
    if pt.ndim != 2 or pt.dtype != jnp.int32:
        raise ValueError(f"page_table must be int32 (batch, max_pages), got {pt.dtype}{list(pt.shape)}")
    b, mp = pt.shape
    if pos.dtype != jnp.int32 or pos.ndim != 2 or pos.shape[0] != b:
        raise ValueError(f"positions must be int32 (batch={b}, T), got {pos.dtype}{list(pos.shape)}")
    t = pos.shape[1]
    if kn.shape != (b, t) + kc.shape[2:] or vn.shape != (b, t) + vc.shape[2:]:
        raise ValueError(f"k_new/v_new must be (batch, T, kv_heads, head_dim) = "
                         f"{(b, t) + kc.shape[2:]} / {(b, t) + vc.shape[2:]}, got {kn.shape} / "
                         f"{vn.shape}")
    if kn.dtype != kc.dtype or vn.dtype != vc.dtype:
        raise ValueError("k_new/v_new must have the caches' dtype")
    pages, ps = kc.shape[0], kc.shape[1]
    slot_page = jnp.clip(pos // ps, 0, mp - 1)
    page = jnp.take_along_axis(pt, slot_page, axis=1)
    keep = (pos >= 0) & (pos < mp * ps) & (page >= 0) & (page < pages)
    flat = jnp.where(keep, page * ps + pos % ps, pages * ps).reshape(-1)  # OOB: dropped

    def write(cache, new):
        rows = cache.reshape((pages * ps,) + cache.shape[2:])
        rows = rows.at[flat].set(new.reshape((-1,) + new.shape[2:]), mode="drop",
                                 unique_indices=True)
        return rows.reshape(cache.shape)

    return write(kc, kn), write(vc, vn)
