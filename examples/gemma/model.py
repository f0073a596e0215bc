"""A Gemma-4-style decoder in plain JAX: parameters (random, generated on device) and
the forward pass of one batch of tokens.

Tokens are flat: x is (T, embed_dim) with a position per token, for a packed prefill
(prompts of different lengths back to back) and for decode (one token per sequence)
alike.  Attention itself, with its KV cache, is the caller's `attend` function
(attention.py): the model computes q, k, v and hands them over.

Per layer (pre/post norms around attention and FFN, then a per-layer scalar):
    h = x + post_attn_norm(attention(pre_attn_norm(x)))
    y = (h + post_ffn_norm(geglu(pre_ffn_norm(h)))) * layer_scalar
Attention: q = RoPE(RMSNorm(x Wq)); local layers k = RoPE(RMSNorm(x Wk)),
v = RMSNorm_noscale(x Wv); global layers take K and V from one projection x Wk
(K: RMSNorm + partial RoPE, V: RMSNorm without scale, no RoPE); softmax scale 1.
RMSNorm scales multiply (x * rsqrt(mean x^2 + eps) * w), they are not 1 + w.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from .config import GemmaConfig

NORMS = ("pre_attn_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm")


def param_shapes(cfg: GemmaConfig, kind: str) -> dict[str, tuple[int, ...]]:
    """Shapes of one layer's parameters ('local' or 'global'), as the model uses them
    (inputs first: x @ w)."""
    d, f, n = cfg.embed_dim, cfg.ffn_dim, cfg.num_heads
    h, kv = cfg.head_dim(kind), cfg.kv_heads(kind)
    shapes = {name: (d,) for name in NORMS}
    shapes.update(q=(d, n, h), k=(d, kv, h), o=(n, h, d), q_norm=(h,), k_norm=(h,),
                  gate=(d, f), up=(d, f), down=(f, d), scalar=())
    if kind == "local":
        shapes["v"] = (d, kv, h)  # global layers: V comes from the K projection
    return shapes


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_layer(cfg: GemmaConfig, kind: str, key):
    shapes, dtype = param_shapes(cfg, kind), jnp.dtype(cfg.dtype)
    fan_in = dict(q=cfg.embed_dim, k=cfg.embed_dim, v=cfg.embed_dim, gate=cfg.embed_dim,
                  up=cfg.embed_dim, o=cfg.num_heads * cfg.head_dim(kind), down=cfg.ffn_dim)
    # One normal draw for all of the layer's matrices, sliced: a single RNG op keeps
    # the init program small (fast to compile) and runs on the device.
    sizes = {name: math.prod(shapes[name]) for name in fan_in if name in shapes}
    flat = jax.random.normal(key, (sum(sizes.values()),), dtype)
    p, start = {}, 0
    for name, size in sizes.items():
        w = flat[start:start + size].reshape(shapes[name])
        p[name] = (w * jnp.asarray(1 / math.sqrt(fan_in[name]), dtype)).astype(dtype)
        start += size
    for name, shape in shapes.items():
        if name in ("q_norm", "k_norm"):
            # Random q and k have |q.k| ~ sqrt(head_dim) after RMSNorm; with softmax
            # scale 1 a d**-0.25 scale on each keeps the logits O(1) (trained models
            # learn such scales), so attention is not one-hot.
            p[name] = jnp.full(shape, shape[0] ** -0.25, dtype)
        elif name not in p:  # the other norms and the layer scalar
            p[name] = jnp.ones(shape, dtype)
    return p


@functools.partial(jax.jit, static_argnums=(0,))
def _init_embed(cfg: GemmaConfig, key):
    e = jax.random.normal(key, (cfg.vocab_size, cfg.embed_dim), cfg.dtype)
    return e * jnp.asarray(1 / math.sqrt(cfg.embed_dim), cfg.dtype)


def init_params(cfg: GemmaConfig, seed: int = 0) -> dict:
    """Random parameters, generated on the default device (one jitted call per layer,
    so host memory and compile time stay small).  Layout:
    {'embed': (vocab, d), 'final_norm': (d,), 'layers': [per-layer dicts, param_shapes]}."""
    key = jax.random.PRNGKey(seed)
    layers = [_init_layer(cfg, kind, jax.random.fold_in(key, i + 1))
              for i, kind in enumerate(cfg.layer_kinds)]
    return dict(embed=_init_embed(cfg, jax.random.fold_in(key, 0)),
                final_norm=jnp.ones((cfg.embed_dim,), cfg.dtype), layers=layers)


def abstract_params(cfg: GemmaConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs (no memory)."""
    return jax.eval_shape(lambda: init_params(cfg))


def rms_norm(x, scale, eps):
    """RMSNorm over the last axis in float32; `scale` multiplies (None: no scale)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)


def rope(x, positions, theta: float, fraction: float = 1.0):
    """Rotary embedding of x (T, heads, H) at `positions` (T,), rotate-half layout
    (pairs i and i + H/2).  Only the first `fraction` of the H/2 frequency pairs
    rotate (the rest get frequency 0, i.e. pass through)."""
    h = x.shape[-1]
    half = h // 2
    rotated = int(half * fraction)
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2 / h)
    inv_freq = jnp.where(jnp.arange(half) < rotated, inv_freq, 0.0)
    ang = positions.astype(jnp.float32)[:, None, None] * inv_freq  # (T, 1, half)
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def qkv(p, x, positions, cfg: GemmaConfig, kind: str):
    """q (T, N, H), k and v (T, K, H) for one layer, normed and rotated."""
    eps = cfg.norm_eps
    theta, frac = ((cfg.global_rope_theta, cfg.global_rope_fraction) if kind == "global"
                   else (cfg.local_rope_theta, 1.0))
    q = rope(rms_norm(jnp.einsum("td,dnh->tnh", x, p["q"]), p["q_norm"], eps), positions,
             theta, frac)
    k_raw = jnp.einsum("td,dkh->tkh", x, p["k"])
    v_raw = k_raw if kind == "global" else jnp.einsum("td,dkh->tkh", x, p["v"])
    k = rope(rms_norm(k_raw, p["k_norm"], eps), positions, theta, frac)
    v = rms_norm(v_raw, None, eps)
    return q, k, v


def layer(p, x, positions, cfg: GemmaConfig, kind: str, attend):
    """One decoder layer.  attend(q, k, v) -> (T, N, H) attention output (it also
    writes k and v to the layer's cache)."""
    eps = cfg.norm_eps
    q, k, v = qkv(p, rms_norm(x, p["pre_attn_norm"], eps), positions, cfg, kind)
    o = jnp.einsum("tnh,nhd->td", attend(q, k, v), p["o"])
    h = x + rms_norm(o, p["post_attn_norm"], eps)
    y = rms_norm(h, p["pre_ffn_norm"], eps)
    y = jax.nn.gelu(y @ p["gate"], approximate=True) * (y @ p["up"])
    h = h + rms_norm(y @ p["down"], p["post_ffn_norm"], eps)
    return h * p["scalar"]


def embed(params, tokens, cfg: GemmaConfig):
    """Token embeddings scaled by sqrt(embed_dim) (rounded to the model dtype, as Gemma)."""
    return params["embed"][tokens] * jnp.asarray(math.sqrt(cfg.embed_dim), cfg.dtype)


def logits(params, x, cfg: GemmaConfig):
    """(rows, d) final hidden states -> float32 logits with the tied embedding and the
    final softcap."""
    x = rms_norm(x, params["final_norm"], cfg.norm_eps)
    lg = jnp.einsum("td,vd->tv", x, params["embed"], preferred_element_type=jnp.float32)
    c = cfg.final_softcap
    return c * jnp.tanh(lg / c)


def forward(params, tokens, positions, cfg: GemmaConfig, attend_layer):
    """Hidden states (T, d) after all layers.  attend_layer(i, kind) -> attend function
    for layer i (it closes over that layer's cache)."""
    x = embed(params, tokens, cfg)
    for i, kind in enumerate(cfg.layer_kinds):
        x = layer(params["layers"][i], x, positions, cfg, kind, attend_layer(i, kind))
    return x
