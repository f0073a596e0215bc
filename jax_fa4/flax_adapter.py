"""`attention_fn` adapters for Flax: `flax.nnx.MultiHeadAttention(attention_fn=...)` and
`flax.linen.MultiHeadDotProductAttention(attention_fn=...)` call `jax_fa4.attention`.

Needs no flax import: the adapter takes the arguments Flax's modules pass to
`flax.{nnx,linen}.dot_product_attention` (tested: flax 0.12) and maps them:

* layout: Flax's (batch..., T, N, H); any number of leading batch dims (none too) are
  flattened into one for jax_fa4 and restored on the output.  GQA (nnx's
  `num_kv_heads`) passes through.
* causal: a dense `mask` (e.g. `make_causal_mask`) is honoured but makes jax_fa4 fall
  back (the kernel takes no dense masks); masks are not inspected for a causal
  pattern (under jit they are traced values).  Causal attention on the kernel:
  `make_flax_attention(is_causal=True)`, or nnx's `module(x, is_causal=True)`.
* dropout: FA4 has no attention dropout; NotImplementedError when it would apply
  (dropout_rate > 0 and not deterministic).  `dropout_rng` is ignored otherwise.
* dtype: q, k, v are cast to `dtype` (or their promoted dtype), as Flax's
  `dot_product_attention` does; a `promote_dtype` function (nnx's convention:
  `promote_dtype((q, k, v), dtype=dtype)`) replaces that cast.
* precision: ignored.  The kernel's matmuls are bf16/fp16 tensor-core MMAs with
  float32 accumulation and a float32 softmax, whatever `precision` says; Flax's
  own fast path (`jax.nn.dot_product_attention`) ignores it too.
  `force_fp32_for_softmax` (linen) is accepted: the softmax is float32 on every path.
* sow_weights (`module` given): NotImplementedError; FA4 never forms the attention
  weights.  linen's AQT einsums (`qk_attn_weights_einsum`, ...) are refused likewise.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from .api import attention


def _promote(q, k, v, dtype):
    """Flax's promote_dtype: one inexact dtype for q, k, v (`dtype` if given)."""
    if dtype is None:
        dtype = jnp.result_type(q, k, v)
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _flatten_extra(x, lead, name):
    """bias/mask broadcastable to (batch..., N, T, S) -> (prod(batch) or 1, N', T', S')."""
    if x is None:
        return None
    x = jnp.asarray(x)
    nd = len(lead) + 3
    if x.ndim > nd:
        raise ValueError(f"{name} {x.shape} has more dims than (batch..., heads, T, S) "
                         f"with batch {lead}")
    x = x.reshape((1,) * (nd - x.ndim) + x.shape)
    if all(d == 1 for d in x.shape[:len(lead)]):
        return x.reshape((1,) + x.shape[len(lead):])
    x = jnp.broadcast_to(x, lead + x.shape[len(lead):])
    return x.reshape((math.prod(lead),) + x.shape[len(lead):])


@dataclasses.dataclass(frozen=True)
class FlaxAttention:
    """A Flax `attention_fn` running `jax_fa4.attention` (module docstring).

    is_causal, local_window_size, logits_soft_cap, scale, implementation: as in
    `jax_fa4.attention`, applied to every call; the causal flag is or-ed with the
    `is_causal` Flax passes (nnx).  Frozen and compared by value, so modules built
    with equal options share jit caches."""

    is_causal: bool = False
    local_window_size: int | tuple[int, int] | None = None
    logits_soft_cap: float | None = None
    scale: float | None = None
    implementation: str | None = None

    # Parameter names are the contract: linen passes only the keywords this
    # signature names, so every option Flax may set must appear here.
    def __call__(self, query, key, value, bias=None, mask=None, broadcast_dropout=True,
                 dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                 precision=None, module=None, promote_dtype=None, is_causal=False, *,
                 force_fp32_for_softmax=False, qk_attn_weights_einsum=None,
                 attn_weights_value_einsum=None):
        del broadcast_dropout, dropout_rng, precision, force_fp32_for_softmax  # see above
        if dropout_rate > 0.0 and not deterministic:
            raise NotImplementedError(
                f"jax_fa4 has no attention dropout (dropout_rate={dropout_rate}, "
                "deterministic=False): build the attention module with dropout_rate=0.0, "
                "or call it with deterministic=True (e.g. for evaluation), or use "
                "flax's dot_product_attention where attention dropout is needed")
        if module is not None:
            raise NotImplementedError(
                "jax_fa4 never forms the attention weights, so they cannot be sown: "
                "call the module with sow_weights=False, or use flax's "
                "dot_product_attention to inspect the weights")
        if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
            raise NotImplementedError(
                "jax_fa4 runs a fused kernel and cannot use custom (e.g. AQT quantized) "
                "attention einsums")
        if promote_dtype is None:
            query, key, value = _promote(query, key, value, dtype)
        else:
            query, key, value = promote_dtype((query, key, value), dtype=dtype)
        if query.ndim < 3 or key.ndim != query.ndim or value.ndim != query.ndim:
            raise ValueError(f"query, key and value must be (batch..., length, heads, "
                             f"head_dim) of equal rank; got {query.shape}, {key.shape}, "
                             f"{value.shape}")
        lead = query.shape[:-3]
        if key.shape[:-3] != lead or value.shape[:-3] != lead:
            raise ValueError(f"query, key and value batch dims must match; got "
                             f"{query.shape}, {key.shape}, {value.shape}")
        b = math.prod(lead)
        q, k, v = (x.reshape((b,) + x.shape[-3:]) for x in (query, key, value))
        if mask is not None:
            mask = jnp.asarray(mask).astype(jnp.bool_)  # Flax's rule: nonzero = visible
        out = attention(q, k, v, _flatten_extra(bias, lead, "bias"),
                        _flatten_extra(mask, lead, "mask"), scale=self.scale,
                        is_causal=bool(self.is_causal or is_causal),
                        local_window_size=self.local_window_size,
                        logits_soft_cap=self.logits_soft_cap,
                        implementation=self.implementation)
        return out.reshape(lead + out.shape[1:])


def make_flax_attention(*, is_causal=False, local_window_size=None, logits_soft_cap=None,
                        scale=None, implementation=None) -> FlaxAttention:
    """A Flax `attention_fn` with these `jax_fa4.attention` options on every call, e.g.
    `nnx.MultiHeadAttention(..., attention_fn=jax_fa4.make_flax_attention(is_causal=True))`
    for causal self-attention on the FA4 kernel without a dense mask."""
    return FlaxAttention(is_causal, local_window_size, logits_soft_cap, scale, implementation)


flax_attention = FlaxAttention()  # the adapter with no options
