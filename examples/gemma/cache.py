"""The paged KV cache: one page pool per layer (its shape set by the layer's group,
local or global), one page table shared by all layers.

Every layer stores the same tokens, so one page table (B, max_pages) and one length
per sequence serve all of them; only the pools differ: local layers hold
(pages, page_size, 16, 256) K and V pools, global layers (pages, page_size, 4, 512)
K and V pools (V is kept separately although it comes from the K projection: it has
its own norm and no RoPE).  Pools are separate arrays per layer, not one stacked
array: a stacked pool is updated in place just as well, but slicing a layer out of it
copies the layer, and one kernel call would index past int32 for long contexts.

Pages are handed out on the host, before generation, for prompt + new tokens; they
are drawn in a shuffled order so that the pages of a sequence are scattered through
the pool, as in a server whose pool has seen traffic.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .config import GemmaConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
    layers: tuple          # per layer (k_pool, v_pool), each (pages, page_size, kv_heads, head_dim)
    page_table: jax.Array  # int32 (B, max_pages); entries past a sequence's pages: 0
    lengths: jax.Array     # int32 (B,): tokens in each sequence's cache

    @property
    def page_size(self) -> int:
        return self.layers[0][0].shape[1]


def allocate_pages(capacity, page_size: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """Page table for sequences that need `capacity[b]` tokens -> (table (B, max_pages)
    int32, number of pages in the pool)."""
    need = [-(-int(c) // page_size) for c in capacity]
    num_pages = sum(need)
    free = np.random.default_rng(seed).permutation(num_pages)
    table = np.zeros((len(need), max(need)), np.int32)
    start = 0
    for b, n in enumerate(need):
        table[b, :n] = free[start:start + n]
        start += n
    return table, num_pages


def pool_shape(cfg: GemmaConfig, kind: str, num_pages: int, page_size: int):
    return (num_pages, page_size, cfg.kv_heads(kind), cfg.head_dim(kind))


def init_cache(cfg: GemmaConfig, capacity, page_size: int, seed: int = 0) -> PagedKVCache:
    """An empty cache with room for capacity[b] tokens of sequence b, on device."""
    table, num_pages = allocate_pages(capacity, page_size, seed)

    @jax.jit
    def zeros():
        return tuple((jnp.zeros(pool_shape(cfg, kind, num_pages, page_size), cfg.dtype),
                      jnp.zeros(pool_shape(cfg, kind, num_pages, page_size), cfg.dtype))
                     for kind in cfg.layer_kinds)

    return PagedKVCache(layers=zeros(), page_table=jnp.asarray(table),
                        lengths=jnp.zeros((len(capacity),), jnp.int32))


def cache_bytes(cfg: GemmaConfig, capacity, page_size: int) -> int:
    _, num_pages = allocate_pages(capacity, page_size)
    item = jnp.dtype(cfg.dtype).itemsize
    return sum(2 * int(np.prod(pool_shape(cfg, k, num_pages, page_size))) * item
               for k in cfg.layer_kinds)
