"""The FA4 kernel calls of tests/test_jax_nn_parity.py (JAX's own dot_product_attention
tests), for the precompile step: `python -m jax_fa4.precompile --calls
tests/gpu_cases_parity.py --backward`."""


def _c(b, t, s, n, kh, h, dtype="bfloat16", **kw):
    return dict(query=((b, t, n, h), dtype), key=((b, s, kh, h), dtype),
                value=((b, s, kh, h), dtype), **kw)


def _i32(b):
    return ((b,), "int32")


CALLS = (
    # testDotProductAttention: dtype x GQA group (vmap folds into the same calls)
    [_c(2, 128, 128, 4, 4 // g, 32, dt) for dt in ("bfloat16", "float16") for g in (1, 2, 4)]
    + [_c(1, 128, 128, 4, 4 // g, 32, dt) for dt in ("bfloat16", "float16") for g in (1, 2, 4)]
    # testDotProductAttentionMask
    + [_c(2, 128, 128, 4, 4, 32, is_causal=True),
       _c(2, 128, 128, 4, 4, 32, query_seq_lengths=_i32(2), key_value_seq_lengths=_i32(2)),
       _c(2, 128, 128, 4, 4, 32, is_causal=True, query_seq_lengths=_i32(2),
          key_value_seq_lengths=_i32(2)),
       _c(2, 128, 128, 4, 4, 32, is_causal=True, local_window_size=(3, 2))]
    # fused_attention_stablehlo_test.py
    + [_c(4, 1024, 1024, 4, 4, 64, scale=1.0, query_seq_lengths=_i32(4),
          key_value_seq_lengths=_i32(4)),
       _c(4, 1024, 1024, 4, 4, 64, scale=1.0, is_causal=True, local_window_size=(63, 0)),
       _c(2, 64, 64, 2, 2, 256, scale=1.0, is_causal=True),
       # the residual-contract test
       _c(2, 64, 64, 4, 4, 64, is_causal=True)]
)
