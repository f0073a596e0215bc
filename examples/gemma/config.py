"""Gemma-style model configuration: the published Gemma-4 31B shapes and smaller
presets with the same structure (5 sliding-window layers : 1 global layer)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Architecture of a Gemma-4-style decoder (defaults: the 31B model).

    Layer i is global when (i + 1) % (local_per_global + 1) == 0, else local
    (sliding window).  Local and global layers have different attention shapes, so
    they keep separate KV caches (cache.py)."""

    num_layers: int = 60
    local_per_global: int = 5          # 5 sliding-window layers, then 1 global layer
    embed_dim: int = 5376
    ffn_dim: int = 21504               # GeGLU hidden size
    vocab_size: int = 262144
    num_heads: int = 32                # query heads, local and global layers
    # Local (sliding-window) attention.
    local_head_dim: int = 256
    local_kv_heads: int = 16
    window: int = 1024                 # a query sees itself and the 1023 tokens before it
    local_rope_theta: float = 10_000.0
    # Global attention: one K=V projection, partial RoPE.
    global_head_dim: int = 512
    global_kv_heads: int = 4
    global_rope_theta: float = 1_000_000.0
    global_rope_fraction: float = 0.25  # share of frequency pairs rotated (the first ones)
    attn_scale: float = 1.0            # softmax scale; q/k RMSNorm replaces 1/sqrt(d)
    final_softcap: float = 30.0        # logits -> c * tanh(logits / c)
    norm_eps: float = 1e-6
    dtype: str = "bfloat16"

    def is_global(self, layer: int) -> bool:
        return (layer + 1) % (self.local_per_global + 1) == 0

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        return tuple("global" if self.is_global(i) else "local" for i in range(self.num_layers))

    def head_dim(self, kind: str) -> int:
        return self.global_head_dim if kind == "global" else self.local_head_dim

    def kv_heads(self, kind: str) -> int:
        return self.global_kv_heads if kind == "global" else self.local_kv_heads

    def attention_window(self, kind: str) -> tuple[int, int] | None:
        """(left, right) for jax_fa4's local_window_size: query at position p sees keys
        p - left .. p + right (with causal, right is 0).  Global layers: None."""
        return (self.window - 1, 0) if kind == "local" else None

    def num_params(self) -> int:
        d, f = self.embed_dim, self.ffn_dim
        n = self.vocab_size * d + d  # tied embedding, final norm
        for kind in self.layer_kinds:
            h, kv = self.head_dim(kind), self.kv_heads(kind)
            kv_proj = (1 if kind == "global" else 2) * d * kv * h  # global: K = V
            n += 2 * d * self.num_heads * h + kv_proj + 3 * d * f + 4 * d + 2 * h + 1
        return n


PRESETS = {
    # Gemma-4 31B (random weights; ~62 GB in bf16: needs more than one 80 GB card
    # once the KV cache is added).
    "31b": GemmaConfig(),
    # 12 layers of the 31B shapes (2 groups of 5 local + 1 global): fits one H100 in bf16
    # with batch 8, 8k-token prompts and 256 new tokens.
    "mid": GemmaConfig(num_layers=12),
    # Same structure, tiny sizes: runs on a CPU in seconds.  One period of the 5:1
    # pattern (6 layers: compile time grows with the unrolled layers); head dims keep
    # the 1:2 local:global ratio; the window (16) is shorter than the prompts.
    "tiny": GemmaConfig(num_layers=6, embed_dim=128, ffn_dim=256, vocab_size=512, num_heads=4,
                        local_head_dim=32, local_kv_heads=2, window=16, global_head_dim=64,
                        global_kv_heads=1),
}

# The CLI's default generation per preset: (prompt lengths, new tokens per sequence).
DEFAULT_RUNS = {
    "tiny": ([40, 17, 64, 5], 32),
    "mid": ([8192, 7168, 6144, 5120, 4096, 3072, 2048, 1024], 256),
    "31b": ([8192, 7168, 6144, 5120, 4096, 3072, 2048, 1024], 256),
}
