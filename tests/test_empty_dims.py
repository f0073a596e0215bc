"""Empty dimensions through the public API, on every function: no query rows (a packed
batch of none), no key rows, a cache of no pages, a page table of no columns, no
batch, and a sequence of no keys with sinks.  Each gives the documented result (rows
that see no key: zeros and lse -inf, or the sink's lse), gradients included, and never
reaches the kernel (cross-lowered for CUDA: no custom call).

Found by the CPU fuzz of the fallback (tests/test_fuzz_fallback.py, seed 11, call
234: a packed query of 0 rows): the pure-JAX path gathered row -1 of an empty array
(TypeError from jnp's gather), and took a max over zero keys with sinks (ValueError).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa4

BF = jnp.bfloat16
I32 = functools.partial(jnp.asarray, dtype=jnp.int32)


def ones(*shape):
    return jnp.asarray(np.random.default_rng(0).standard_normal(shape), BF)


KC = ones(8, 16, 2, 64)
PT = jnp.arange(8, dtype=jnp.int32).reshape(2, 4)
SINKS = jnp.asarray([0.5, -1.0, 2.0, 0.0], jnp.float32)

# name -> (function, args, keyword arguments, sinks given)
CASES = {
    "varlen_no_query_rows": (jax_fa4.varlen_attention,
                             (ones(0, 4, 64), ones(10, 2, 64), ones(10, 2, 64), I32([0, 0]),
                              I32([0, 10])), dict(max_seqlen_q=1, max_seqlen_k=10)),
    "varlen_no_key_rows": (jax_fa4.varlen_attention,
                           (ones(5, 4, 64), ones(0, 2, 64), ones(0, 2, 64), I32([0, 5]),
                            I32([0, 0])), dict(max_seqlen_q=5, max_seqlen_k=1)),
    "varlen_no_key_rows_sinks": (jax_fa4.varlen_attention,
                                 (ones(5, 4, 64), ones(0, 2, 64), ones(0, 2, 64), I32([0, 5]),
                                  I32([0, 0])), dict(max_seqlen_q=5, max_seqlen_k=1,
                                                     sinks=SINKS)),
    "paged_packed_no_query_rows": (jax_fa4.paged_attention,
                                   (ones(0, 4, 64), KC, KC, PT, I32([5, 9])),
                                   dict(cu_seqlens_q=I32([0, 0, 0]), max_seqlen_q=1)),
    "paged_no_pages": (jax_fa4.paged_attention,
                       (ones(2, 1, 4, 64), ones(0, 16, 2, 64), ones(0, 16, 2, 64), PT,
                        I32([5, 9])), dict()),
    "paged_no_table_columns": (jax_fa4.paged_attention,
                               (ones(2, 1, 4, 64), KC, KC, PT[:, :0], I32([3, 9])), dict()),
    "paged_no_table_columns_sinks": (jax_fa4.paged_attention,
                                     (ones(2, 1, 4, 64), KC, KC, PT[:, :0], I32([3, 9])),
                                     dict(sinks=SINKS, is_causal=True)),
    "attention_no_keys": (jax_fa4.attention, (ones(2, 3, 4, 64), ones(2, 0, 2, 64),
                                              ones(2, 0, 2, 64)), dict()),
    "attention_no_keys_sinks": (jax_fa4.attention, (ones(2, 3, 4, 64), ones(2, 0, 2, 64),
                                                    ones(2, 0, 2, 64)), dict(sinks=SINKS)),
    "attention_no_queries": (jax_fa4.attention, (ones(2, 0, 4, 64), ones(2, 7, 2, 64),
                                                 ones(2, 7, 2, 64)), dict()),
    "attention_no_batch": (jax_fa4.attention, (ones(0, 3, 4, 64), ones(0, 3, 2, 64),
                                               ones(0, 3, 2, 64)), dict(is_causal=True)),
}


def _call(name):
    fn, args, kw = CASES[name]
    lse_kw = {"return_lse": True}  # float32 on every function
    return functools.partial(fn, **kw, **lse_kw), args


@pytest.mark.parametrize("name", sorted(CASES))
def test_result(name):
    f, args = _call(name)
    o, lse = jax.jit(f)(*args)
    q, v = args[0], args[2]
    assert o.shape == q.shape[:-1] + (v.shape[-1],) and o.dtype == q.dtype
    assert lse.shape == q.shape[:-1] and lse.dtype == jnp.float32
    o, lse = np.asarray(o, np.float32), np.asarray(lse)
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    assert not o.any(), "every row sees no key: zeros"
    sinks = CASES[name][2].get("sinks")
    want = -np.inf if sinks is None else np.broadcast_to(np.asarray(sinks), lse.shape)
    np.testing.assert_array_equal(lse, want)  # log(exp(sink)) exactly, or -inf


@pytest.mark.parametrize("name", [n for n in sorted(CASES) if not n.startswith("paged")])
def test_gradients(name):
    """Gradients exist, have the inputs' shapes and are finite (zero: nothing is seen)."""
    f, args = _call(name)
    loss = lambda q, k, v: f(q, k, v, *args[3:])[0].astype(jnp.float32).sum()  # noqa: E731
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args[:3])
    for g, x in zip(grads, args[:3]):
        assert g.shape == x.shape
        assert np.isfinite(np.asarray(g, np.float32)).all()
        assert not np.asarray(g, np.float32).any()


@pytest.mark.parametrize("name", sorted(CASES))
def test_never_reaches_the_kernel(name):
    f, args = _call(name)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "jax_fa4_cute_call" not in text
