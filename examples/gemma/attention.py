"""Attention over the paged KV cache, two ways with the same math:

* `jax_fa4`: `jax_fa4.update_paged_cache` writes the new K/V, then
  prefill: `jax_fa4.varlen_attention` on the packed new K/V (or, with
  prefill='paged', `jax_fa4.paged_attention` with packed queries against the cache);
  decode: `jax_fa4.paged_attention` with one query per sequence.
  On an H100/H200 these run FA4 kernels; elsewhere jax_fa4's pure-JAX fallback.
* `xla`: the reference a JAX user would write without jax_fa4: the same cache write,
  then gather each sequence's pages into a dense (B, S, K, H) tensor and compute a
  masked float32 softmax with jnp (query blocks mapped with lax.map to bound memory).

Masks: causal, and for local layers a sliding window of cfg.window tokens (a query at
position p sees keys p - window + 1 .. p), i.e. local_window_size=(window - 1, 0) in
jax_fa4's convention (bottom-right aligned per sequence for varlen/paged calls).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import jax_fa4

from .config import GemmaConfig

BACKENDS = ("jax_fa4", "xla")
PREFILL_MODES = ("varlen", "paged")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Batch:
    """Where the T flat tokens of one forward pass belong.

    prefill: tokens of sequence b are rows cu_seqlens[b]:cu_seqlens[b+1]; decode: row b
    is sequence b's next token (cu_seqlens = 0..B).  Rows with position -1 are padding
    (nothing written, nothing attended)."""

    positions: jax.Array   # int32 (T,) position of each token in its sequence
    seq_ids: jax.Array     # int32 (T,) sequence of each token
    cu_seqlens: jax.Array  # int32 (B+1,)
    page_table: jax.Array  # int32 (B, max_pages)
    seqused_k: jax.Array   # int32 (B,) tokens per sequence in the cache after this pass
    phase: str = dataclasses.field(metadata=dict(static=True))    # 'prefill' | 'decode'
    max_len: int = dataclasses.field(metadata=dict(static=True))  # longest query run


def write_cache(k_pool, v_pool, k, v, b: Batch):
    """Writes the pass's k/v (T, K, H) into the pools.  Each token is passed as its own
    one-token row (its sequence's page-table row, its position), so packed prefill
    rows and decode rows go through the same `update_paged_cache` call."""
    return jax_fa4.update_paged_cache(k_pool, v_pool, k[:, None], v[:, None],
                                      b.page_table[b.seq_ids], b.positions[:, None])


def fa4_attention(q, k, v, k_pool, v_pool, b: Batch, cfg: GemmaConfig, kind: str,
                  prefill: str = "varlen", implementation=None):
    """jax_fa4 attention of one layer -> (out (T, N, H), k_pool, v_pool)."""
    k_pool, v_pool = write_cache(k_pool, v_pool, k, v, b)
    common = dict(scale=cfg.attn_scale, is_causal=True,
                  local_window_size=cfg.attention_window(kind), implementation=implementation)
    if b.phase == "decode":
        out = jax_fa4.paged_attention(q[:, None], k_pool, v_pool, b.page_table, b.seqused_k,
                                      **common)[:, 0]
    elif prefill == "varlen":  # a fresh prompt: its own k/v are all the keys it needs
        out = jax_fa4.varlen_attention(q, k, v, b.cu_seqlens, b.cu_seqlens,
                                       max_seqlen_q=b.max_len, max_seqlen_k=b.max_len, **common)
    else:  # queries against the cache (also right for chunked prefill after a prefix)
        out = jax_fa4.paged_attention(q, k_pool, v_pool, b.page_table, b.seqused_k,
                                      cu_seqlens_q=b.cu_seqlens, max_seqlen_q=b.max_len,
                                      **common)
    return out, k_pool, v_pool


def xla_attention(q, k, v, k_pool, v_pool, b: Batch, cfg: GemmaConfig, kind: str,
                  block_bytes: int = 1 << 30):
    """Plain-JAX attention of one layer on the gathered cache -> (out, k_pool, v_pool)."""
    k_pool, v_pool = write_cache(k_pool, v_pool, k, v, b)
    bsz, max_pages = b.page_table.shape
    ps, kh, hd = k_pool.shape[1:]
    s = max_pages * ps
    kd = k_pool[b.page_table].reshape(bsz, s, kh, hd)  # every sequence's pages, in order
    vd = v_pool[b.page_table].reshape(bsz, s, kh, hd)

    # Queries to (B, Tq, N, H) with their positions (-1: no query).
    tq = b.max_len
    rows = b.cu_seqlens[:-1, None] + jnp.arange(tq)[None, :]
    has_q = rows < b.cu_seqlens[1:, None]
    rows = jnp.clip(rows, 0, q.shape[0] - 1)
    qd = q[rows]
    qpos = jnp.where(has_q, b.positions[rows], -1)

    left = cfg.window - 1 if kind == "local" else None
    n = q.shape[1]
    blk = max(1, min(tq, block_bytes // (bsz * n * s * 4)))
    nblk = -(-tq // blk)
    pad = nblk * blk - tq
    qd = jnp.pad(qd, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qpos = jnp.pad(qpos, ((0, 0), (0, pad)), constant_values=-1)
    key_pos = jnp.arange(s)[None, None, :]

    def block(args):
        qb, pb = args  # (B, blk, N, H), (B, blk)
        qg = qb.reshape(bsz, blk, kh, n // kh, hd)
        lg = jnp.einsum("btkgh,bskh->bkgts", qg, kd, preferred_element_type=jnp.float32)
        lg = lg * cfg.attn_scale
        vis = (key_pos < b.seqused_k[:, None, None]) & (key_pos <= pb[:, :, None])
        if left is not None:
            vis &= key_pos >= pb[:, :, None] - left
        vis = vis[:, None, None]  # (B, 1, 1, blk, S)
        lg = jnp.where(vis, lg, -jnp.inf)
        m = jnp.max(lg, axis=-1, keepdims=True)
        p = jnp.exp(lg - jnp.where(jnp.isfinite(m), m, 0.0))
        l = jnp.sum(p, axis=-1, keepdims=True)
        p = p / jnp.where(l > 0, l, 1.0)
        # P in the cache dtype, float32 accumulation (as flash attention kernels do;
        # also avoids a float32 copy of the gathered V).
        o = jnp.einsum("bkgts,bskh->btkgh", p.astype(vd.dtype), vd,
                       preferred_element_type=jnp.float32)
        return o.reshape(bsz, blk, n, hd).astype(q.dtype)

    split = lambda x: jnp.moveaxis(x.reshape((bsz, nblk, blk) + x.shape[2:]), 1, 0)
    od = jax.lax.map(block, (split(qd), split(qpos)))  # (nblk, B, blk, N, H)
    od = jnp.moveaxis(od, 0, 1).reshape(bsz, nblk * blk, n, hd)
    # Back to flat rows.
    t = jnp.clip(jnp.arange(q.shape[0]) - b.cu_seqlens[b.seq_ids], 0, nblk * blk - 1)
    out = od[b.seq_ids, t]
    return jnp.where((b.positions >= 0)[:, None, None], out, 0).astype(q.dtype), k_pool, v_pool
