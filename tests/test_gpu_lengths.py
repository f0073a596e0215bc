"""jax.nn's sequence lengths on the FA4 path (tests/gpu_cases_lengths.py): every case
against a float64 reference on fresh random inputs, outputs poisoned before the run
(an unwritten element shows as NaN), no NaN, ‖out−ref‖/‖ref‖ <= 1e-2, rows that see no
key exactly zero, and the custom call present."""
from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa4

sys.path.insert(0, os.path.dirname(__file__))
from gpu_cases_lengths import CALLS  # noqa: E402
from reference import attention64  # noqa: E402
from test_gpu_forward import _has_sm90, _relerr  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _has_sm90(), reason="needs an SM90 (Hopper) GPU"),
              pytest.mark.usefixtures("poisoned_outputs")]


def _id(c):
    (b, t, n, hd), dt = c["query"]
    return f"{c['_mode']}-{dt[:4]}-b{b}-q{t}-k{c['key'][0][1]}-h{n}/{c['key'][0][2]}-d{hd}"


@pytest.mark.parametrize("case", CALLS, ids=[_id(c) for c in CALLS])
def test_lengths_match_reference(case):
    rng = np.random.default_rng(abs(hash(_id(case))) % 2**32)
    (b, t, n, hd), dt = case["query"]
    s, kvh = case["key"][0][1], case["key"][0][2]
    q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32), dt) for shape in
               ((b, t, n, hd), (b, s, kvh, hd), (b, s, kvh, hd)))
    lq = None if case["_lq"] is None else jnp.asarray(case["_lq"], jnp.int32)
    lk = None if case["_lk"] is None else jnp.asarray(case["_lk"], jnp.int32)
    causal = bool(case.get("is_causal"))
    sinks = (jnp.asarray(rng.standard_normal(n), jnp.float32) if case.get("sinks") else None)
    kw = dict(is_causal=causal, query_seq_lengths=lq, key_value_seq_lengths=lk, sinks=sinks)
    assert jax_fa4.explain(q, k, v, **kw) is None
    f = jax.jit(lambda q, k, v, lq, lk: jax_fa4.attention(
        q, k, v, is_causal=causal, query_seq_lengths=lq, key_value_seq_lengths=lk,
        sinks=sinks, return_lse=True))
    assert "jax_fa4_cute_call" in f.lower(q, k, v, lq, lk).compile().as_text()
    o, lse = (np.asarray(x.astype(jnp.float32)) for x in f(q, k, v, lq, lk))
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    lq_np = np.full(b, t) if lq is None else np.clip(case["_lq"], 0, t)
    lk_np = np.full(b, s) if lk is None else np.clip(case["_lk"], 0, s)
    mask = ((np.arange(t)[None, :, None] < lq_np[:, None, None])
            & (np.arange(s)[None, None, :] < lk_np[:, None, None]))[:, None]
    ro, rlse = attention64(q.astype(jnp.float32), k.astype(jnp.float32),
                           v.astype(jnp.float32), sinks, scale=1 / np.sqrt(hd),
                           window=(None, 0) if causal else (None, None), mask=mask)
    dead = np.isneginf(rlse)
    ro = np.where(dead[..., None], 0.0, ro)
    assert np.all(o[dead] == 0), "a row that sees no key is not zero"
    assert np.all(o[lq_np[:, None] <= np.arange(t)[None, :]] == 0), "a padded row is not zero"
    assert np.all(np.isneginf(lse[dead]))
    assert _relerr(o, ro) <= 1e-2, f"output rel. error {_relerr(o, ro):.2e}"
    if (~dead).any():
        assert _relerr(lse[~dead], rlse[~dead]) <= 1e-3


def test_lengths_gradient_on_gpu():
    """Gradients with lengths (causal, equal lengths: the FA4 backward; no window:
    the pure-JAX backward) against jax.nn's."""
    rng = np.random.default_rng(5)
    q, k, v, g = (jnp.asarray(rng.standard_normal((2, 256, 4, 128), np.float32), jnp.bfloat16)
                  for _ in range(4))
    lens = jnp.asarray([256, 100], jnp.int32)
    for causal in (True, False):
        kw = dict(is_causal=causal, query_seq_lengths=lens, key_value_seq_lengths=lens)
        outs = []
        for fn in (jax_fa4.attention, jax.nn.dot_product_attention):
            out, vjp = jax.vjp(functools.partial(fn, **kw), q, k, v)
            outs.append((out,) + vjp(g))
        for a, b_ in zip(*outs):
            assert _relerr(a.astype(jnp.float32), b_.astype(jnp.float32)) <= 2e-2
