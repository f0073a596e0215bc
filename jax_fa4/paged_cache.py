"""Writing new tokens into a paged KV cache, inside jit."""
from __future__ import annotations

import jax.numpy as jnp

from . import validate


def update_paged_cache(k_cache, v_cache, k_new, v_new, page_table, positions):
    """Writes k_new/v_new (B, T, K, H) at token positions `positions` (int32 (B, T)) of
    each sequence: token p of sequence b goes to page page_table[b, p // page_size],
    slot p % page_size.  Negative positions (padding), positions past the page
    table and positions whose page index is outside [0, num_pages) are dropped.
    Returns the new (k_cache, v_cache); donate the caches to `jax.jit`
    (donate_argnums) and XLA updates them in place.  Positions must not
    repeat within a call (the scatter assumes unique indices).
    """
    kc, vc, kn, vn, pt, pos = validate.cache_update_args(k_cache, v_cache, k_new, v_new,
                                                         page_table, positions)
    mp = pt.shape[1]
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
