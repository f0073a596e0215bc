"""jax_fa4 in a jitted attention block: runs FA4 on an H100/H200, the fallback elsewhere.

    python examples/basic.py
"""
import time

import jax
import jax.numpy as jnp

import jax_fa4


@jax.jit
def attention_block(x, wq, wk, wv, wo):
    b, t, _ = x.shape
    q = (x @ wq).reshape(b, t, 8, 128)  # 8 query heads
    k = (x @ wk).reshape(b, t, 2, 128)  # 2 key/value heads (GQA 4)
    v = (x @ wv).reshape(b, t, 2, 128)
    o = jax_fa4.attention(q, k, v, is_causal=True, logits_soft_cap=50.0)
    return o.reshape(b, t, -1) @ wo


def main():
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    d = 1024
    x = jax.random.normal(ks[0], (2, 1024, d), jnp.bfloat16)
    wq, wo = (jax.random.normal(k, (d, d), jnp.bfloat16) / d**0.5 for k in ks[1:3])
    wk, wv = (jax.random.normal(k, (d, 256), jnp.bfloat16) / d**0.5 for k in ks[3:5])

    q = jax.ShapeDtypeStruct((2, 1024, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1024, 2, 128), jnp.bfloat16)
    why = jax_fa4.explain(q, kv, kv, is_causal=True, logits_soft_cap=50.0)
    print(f"backend: {jax.default_backend()}; attention path: "
          f"{'FA4 SM90 kernel' if why is None else 'fallback (' + why + ')'}")

    y = attention_block(x, wq, wk, wv, wo).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(10):
        y = attention_block(x, wq, wk, wv, wo)
    y.block_until_ready()
    print(f"output {y.shape} {y.dtype}, finite: {bool(jnp.isfinite(y).all())}, "
          f"{(time.perf_counter() - t0) / 10 * 1e3:.2f} ms per call")

    grad = jax.grad(lambda x: attention_block(x, wq, wk, wv, wo).astype(jnp.float32).sum())(x)
    print(f"gradient w.r.t. x: {grad.shape}, finite: {bool(jnp.isfinite(grad).all())}")


if __name__ == "__main__":
    main()
