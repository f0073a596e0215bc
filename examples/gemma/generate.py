"""Prefill and the decode loop, jitted, with the KV cache donated (updated in place).

prefill: all prompts packed into one flat batch of tokens (no padding), K/V written
into the paged cache, the first new token sampled from each prompt's last logits.
decode: a `jax.lax.while_loop` of single-token steps: write the token's K/V at its
position, attend over the cache, sample the next token; it stops after `steps` steps
or when every sequence has produced `eos_id`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import model
from .attention import Batch, fa4_attention, xla_attention
from .cache import PagedKVCache
from .config import GemmaConfig
from .sampler import SamplerConfig, sample


def _attend_fn(layers: list, b: Batch, cfg: GemmaConfig, backend: str, prefill: str,
               implementation):
    """attend_layer(i, kind) for model.forward; layer i's pools in layers[i] are
    replaced by the written ones."""
    def attend_layer(i, kind):
        def attend(q, k, v):
            kp, vp = layers[i]
            if backend == "xla":
                out, kp, vp = xla_attention(q, k, v, kp, vp, b, cfg, kind)
            else:
                out, kp, vp = fa4_attention(q, k, v, kp, vp, b, cfg, kind, prefill,
                                            implementation)
            layers[i] = (kp, vp)
            return out
        return attend
    return attend_layer


def prefill_batch(prompt_lens) -> Batch:
    """Host-built Batch for prompts of these lengths packed back to back (the page
    table is the cache's: prefill fills it in)."""
    lens = np.asarray(prompt_lens, np.int32)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    return Batch(positions=jnp.asarray(np.concatenate([np.arange(n) for n in lens]), jnp.int32),
                 seq_ids=jnp.asarray(np.repeat(np.arange(len(lens)), lens), jnp.int32),
                 cu_seqlens=jnp.asarray(cu), page_table=None,
                 seqused_k=jnp.asarray(lens), phase="prefill", max_len=int(lens.max()))


@functools.partial(jax.jit, static_argnames=("cfg", "backend", "prefill", "implementation",
                                             "sampler"),
                   donate_argnames=("cache",))
def prefill(params, cache: PagedKVCache, tokens, b: Batch, key, forced_first=None, *,
            cfg: GemmaConfig, backend: str = "jax_fa4", prefill: str = "varlen",
            implementation=None, sampler: SamplerConfig = SamplerConfig()):
    """-> (cache with the prompts written, first new token (B,), its logits (B, vocab))."""
    b = dataclasses.replace(b, page_table=cache.page_table)
    layers = list(cache.layers)
    x = model.forward(params, tokens, b.positions, cfg,
                      _attend_fn(layers, b, cfg, backend, prefill, implementation))
    lg = model.logits(params, x[b.cu_seqlens[1:] - 1], cfg)
    first = sample(lg, key, sampler) if forced_first is None else forced_first
    return PagedKVCache(tuple(layers), cache.page_table, b.seqused_k), first, lg


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "backend", "implementation",
                                             "sampler", "eos_id", "record_logits",
                                             "progress_every"),
                   donate_argnames=("cache",))
def decode(params, cache: PagedKVCache, first, key, forced=None, *, cfg: GemmaConfig,
           steps: int, backend: str = "jax_fa4", implementation=None,
           sampler: SamplerConfig = SamplerConfig(), eos_id=None, record_logits=False,
           progress_every: int = 0):
    """`steps` decode steps starting from tokens `first` (B,) -> (cache, tokens
    (B, steps), steps run, logits (steps, B, vocab) float32 if record_logits else None).
    forced (B, steps): feed these tokens instead of sampling (teacher forcing, for
    comparing two implementations step by step)."""
    bsz = first.shape[0]
    out = jnp.zeros((bsz, steps), jnp.int32)
    lg_buf = jnp.zeros((steps, bsz, cfg.vocab_size), jnp.float32) if record_logits else None
    done = jnp.zeros((bsz,), bool) if eos_id is None else first == eos_id

    def body(carry):
        i, cache, tok, done, out, key, lg_buf = carry
        b = Batch(positions=cache.lengths, seq_ids=jnp.arange(bsz, dtype=jnp.int32),
                  cu_seqlens=jnp.arange(bsz + 1, dtype=jnp.int32),
                  page_table=cache.page_table, seqused_k=cache.lengths + 1, phase="decode",
                  max_len=1)
        layers = list(cache.layers)
        x = model.forward(params, tok, b.positions, cfg,
                          _attend_fn(layers, b, cfg, backend, "paged", implementation))
        lg = model.logits(params, x, cfg)
        key, sub = jax.random.split(key)
        nxt = sample(lg, sub, sampler) if forced is None else forced[:, i]
        if eos_id is not None:  # finished sequences keep emitting eos
            nxt = jnp.where(done, eos_id, nxt)
            done = done | (nxt == eos_id)
        out = out.at[:, i].set(nxt)
        if record_logits:
            lg_buf = lg_buf.at[i].set(lg)
        if progress_every:
            jax.lax.cond((i + 1) % progress_every == 0,
                         lambda: jax.debug.callback(_progress, i + 1, steps), lambda: None)
        cache = PagedKVCache(tuple(layers), cache.page_table, cache.lengths + 1)
        return i + 1, cache, nxt, done, out, key, lg_buf

    def cond(carry):
        return (carry[0] < steps) & ~jnp.all(carry[3])

    i, cache, _, _, out, _, lg_buf = jax.lax.while_loop(
        cond, body, (jnp.int32(0), cache, first, done, out, key, lg_buf))
    return cache, out, i, lg_buf


def _progress(i, steps):
    print(f"  decode step {int(i)}/{steps}", flush=True)


def generate(params, cache: PagedKVCache, prompts, cfg: GemmaConfig, *, new_tokens: int,
             backend: str = "jax_fa4", prefill_mode: str = "varlen", implementation=None,
             sampler: SamplerConfig = SamplerConfig(), seed: int = 0, forced=None,
             record_logits: bool = False, eos_id=None):
    """Prompts (list of int token arrays) -> dict(tokens (B, new_tokens), logits
    (new_tokens, B, vocab) if record_logits, cache).  `cache` is donated."""
    lens = [len(p) for p in prompts]
    tokens = jnp.asarray(np.concatenate(prompts), jnp.int32)
    b = prefill_batch(lens)
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    forced = None if forced is None else jnp.asarray(forced, jnp.int32)
    cache, first, lg0 = prefill(params, cache, tokens, b, k1,
                                None if forced is None else forced[:, 0], cfg=cfg,
                                backend=backend, prefill=prefill_mode,
                                implementation=implementation, sampler=sampler)
    cache, rest, _, lgs = decode(params, cache, first, k2,
                                 None if forced is None else forced[:, 1:], cfg=cfg,
                                 steps=new_tokens - 1, backend=backend,
                                 implementation=implementation, sampler=sampler,
                                 eos_id=eos_id, record_logits=record_logits)
    out = dict(tokens=jnp.concatenate([first[:, None], rest], axis=1), cache=cache)
    if record_logits:
        out["logits"] = jnp.concatenate([lg0[None], lgs], axis=0)
    return out
