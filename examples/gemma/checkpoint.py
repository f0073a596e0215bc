"""Loading a real checkpoint's parameters into the model's parameter tree.

No weights can be downloaded here, so the example runs with random weights; users who
have a Gemma-4-style checkpoint read its tensors (e.g. with
`safetensors.numpy.load_file` per shard, merged into one dict) and call
`params_from_checkpoint(cfg, tensors)`.

Expected names and shapes (Hugging Face naming and PyTorch `Linear` layout, i.e.
(out_features, in_features)); d = embed_dim, f = ffn_dim, N = num_heads and per
layer H = head_dim(kind), K = kv_heads(kind):

    {prefix}embed_tokens.weight                              (vocab, d)  (tied output)
    {prefix}norm.weight                                      (d,)        final norm
    {prefix}layers.{i}.input_layernorm.weight                (d,)        pre-attention
    {prefix}layers.{i}.post_attention_layernorm.weight       (d,)
    {prefix}layers.{i}.pre_feedforward_layernorm.weight      (d,)
    {prefix}layers.{i}.post_feedforward_layernorm.weight     (d,)
    {prefix}layers.{i}.self_attn.q_proj.weight               (N*H, d)
    {prefix}layers.{i}.self_attn.k_proj.weight               (K*H, d)    global: K and V
    {prefix}layers.{i}.self_attn.v_proj.weight               (K*H, d)    local layers only
    {prefix}layers.{i}.self_attn.o_proj.weight               (d, N*H)
    {prefix}layers.{i}.self_attn.q_norm.weight               (H,)
    {prefix}layers.{i}.self_attn.k_norm.weight               (H,)
    {prefix}layers.{i}.mlp.gate_proj.weight                  (f, d)
    {prefix}layers.{i}.mlp.up_proj.weight                    (f, d)
    {prefix}layers.{i}.mlp.down_proj.weight                  (d, f)
    {prefix}layers.{i}.layer_scalar                          (1,) or ()

Layer i is global when (i + 1) % 6 == 0 (config.GemmaConfig.is_global).  Norm weights
are used as multipliers; a checkpoint that stores Gemma-3-style offsets (multiplier
1 + w) loads with `norm_offset=1.0`.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .config import GemmaConfig
from .model import NORMS, param_shapes

DEFAULT_PREFIX = "model.language_model."
_NORM_NAMES = dict(pre_attn_norm="input_layernorm", post_attn_norm="post_attention_layernorm",
                   pre_ffn_norm="pre_feedforward_layernorm",
                   post_ffn_norm="post_feedforward_layernorm")
_LINEAR_NAMES = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                     o="self_attn.o_proj", gate="mlp.gate_proj", up="mlp.up_proj",
                     down="mlp.down_proj")


def checkpoint_shapes(cfg: GemmaConfig, prefix: str = DEFAULT_PREFIX) -> dict[str, tuple]:
    """Every expected checkpoint name -> shape (layer_scalar listed as (1,))."""
    d = cfg.embed_dim
    out = {f"{prefix}embed_tokens.weight": (cfg.vocab_size, d), f"{prefix}norm.weight": (d,)}
    for i, kind in enumerate(cfg.layer_kinds):
        for ours, theirs in _layer_names(i, kind, prefix).items():
            shape = param_shapes(cfg, kind)[ours]
            if ours in _LINEAR_NAMES:
                shape = _torch_shape(ours, shape)
            out[theirs] = shape if shape else (1,)
    return out


def _layer_names(i: int, kind: str, prefix: str) -> dict[str, str]:
    base = f"{prefix}layers.{i}."
    names = {ours: f"{base}{theirs}.weight" for ours, theirs in _NORM_NAMES.items()}
    names.update({ours: f"{base}{theirs}.weight" for ours, theirs in _LINEAR_NAMES.items()
                  if not (ours == "v" and kind == "global")})
    names.update(q_norm=f"{base}self_attn.q_norm.weight", k_norm=f"{base}self_attn.k_norm.weight",
                 scalar=f"{base}layer_scalar")
    return names


def _torch_shape(name: str, shape: tuple) -> tuple:
    """Our (in..., out...) shape -> PyTorch Linear's (out, in)."""
    if name == "o":  # ours (N, H, d)
        return (shape[2], shape[0] * shape[1])
    if name in ("q", "k", "v"):  # ours (d, heads, H)
        return (shape[1] * shape[2], shape[0])
    return (shape[1], shape[0])  # gate, up, down: (in, out)


def params_from_checkpoint(cfg: GemmaConfig, tensors, *, prefix: str = DEFAULT_PREFIX,
                           norm_offset: float = 0.0) -> dict:
    """A checkpoint's tensors (a mapping name -> array, names as in this module's
    docstring) -> the model's parameter tree (model.init_params' layout), in cfg.dtype.
    Raises ValueError naming a missing tensor or one of the wrong shape."""
    expected = checkpoint_shapes(cfg, prefix)

    def get(name):
        if name not in tensors:
            raise ValueError(f"checkpoint has no tensor {name!r} (expected shape "
                             f"{expected[name]})")
        w = np.asarray(tensors[name], np.float32)
        want = expected[name]
        if w.shape != want and not (want == (1,) and w.shape == ()):
            raise ValueError(f"checkpoint tensor {name!r} has shape {w.shape}, expected {want}")
        return w

    dt = cfg.dtype
    params = dict(embed=jnp.asarray(get(f"{prefix}embed_tokens.weight"), dt),
                  final_norm=jnp.asarray(get(f"{prefix}norm.weight") + norm_offset, dt),
                  layers=[])
    for i, kind in enumerate(cfg.layer_kinds):
        shapes = param_shapes(cfg, kind)
        layer = {}
        for ours, theirs in _layer_names(i, kind, prefix).items():
            w = get(theirs)
            if ours in _LINEAR_NAMES:
                w = w.T  # PyTorch Linear (out, in) -> ours (in, out), reshaped below
            elif ours in NORMS or ours in ("q_norm", "k_norm"):
                w = w + norm_offset
            layer[ours] = jnp.asarray(w.reshape(shapes[ours]), dt)
        params["layers"].append(layer)
    return params


def params_to_checkpoint(cfg: GemmaConfig, params, *, prefix: str = DEFAULT_PREFIX) -> dict:
    """The inverse of params_from_checkpoint (numpy float32 arrays): for saving random
    weights in the documented layout, and for testing the loader."""
    out = {f"{prefix}embed_tokens.weight": np.asarray(params["embed"], np.float32),
           f"{prefix}norm.weight": np.asarray(params["final_norm"], np.float32)}
    for i, kind in enumerate(cfg.layer_kinds):
        for ours, theirs in _layer_names(i, kind, prefix).items():
            w = np.asarray(params["layers"][i][ours], np.float32)
            if ours in _LINEAR_NAMES:
                shape = param_shapes(cfg, kind)[ours]
                w = w.reshape(-1, w.shape[-1]) if ours == "o" else w.reshape(shape[0], -1)
                w = w.T
            out[theirs] = w.reshape(1) if ours == "scalar" else w
    return out
