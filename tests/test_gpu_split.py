"""Split-KV decode on the GPU: every split count in gpu_cases_split.SPLITS against a
float64 reference and against the unsplit kernel (marker `gpu`).

Each batch holds a long sequence (4097 or 4997 keys: not a page multiple), an empty
one, and ones of 1, 17 and 333 keys, so with 7 or 32 splits many (sequence, split) pairs get no keys; windows
make more.  Outputs are poisoned before every launch (the workspace included).
"""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa4
import jax_fa4.api
from jax_fa4 import varlen

sys.path.insert(0, os.path.dirname(__file__))
from gpu_cases_split import CASES, MAX_TOKENS, SPLITS  # noqa: E402
from test_gpu_forward import _has_sm90, _relerr, _window  # noqa: E402
from test_gpu_paged import _check, _f64, _random, ref_sequence  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _has_sm90(), reason="needs an SM90 (Hopper) GPU"),
              pytest.mark.usefixtures("poisoned_outputs")]

_KW = ("is_causal", "local_window_size", "logits_soft_cap")


def _id(c):
    (b, tq, n, hd), _ = c["q"]
    ps, kh = c["k_cache"][0][1], c["k_cache"][0][2]
    extra = "-".join(f"{k}={v}" for k, v in c.items() if k in _KW)
    return f"d{hd}-ps{ps}-tq{tq}-h{n}/{kh}" + ("-sinks" if c.get("sinks") else "") + (
        f"-{extra}" if extra else "")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_splits_match_reference_and_unsplit(case):
    rng = np.random.default_rng(abs(hash(_id(case))) % 2**32)
    kw = {k: v for k, v in case.items() if k in _KW}
    window, softcap = _window(kw), kw.get("logits_soft_cap")
    q = _random(rng, *case["q"])
    kc, vc = _random(rng, *case["k_cache"]), _random(rng, *case["v_cache"])
    pages, ps = kc.shape[:2]
    b, max_pages = case["page_table"][0]
    table = rng.permutation(pages)[: b * max_pages].reshape(b, max_pages).astype(np.int32)
    used = np.array([rng.choice([4097, MAX_TOKENS - 3]), 0, 1, 17, 333], np.int32)[:b]
    n = q.shape[2]
    sinks = jnp.asarray(rng.standard_normal(n, np.float32)) if case.get("sinks") else None

    qn, kn, vn = _f64(q), _f64(kc), _f64(vc)
    ro, rl = np.zeros(q.shape[:3] + (vc.shape[-1],)), np.full(q.shape[:3], -np.inf)
    for i in range(b):
        toks = np.arange(used[i])
        rows = table[i, toks // ps] * ps + toks % ps
        ro[i], rl[i] = ref_sequence(qn[i], kn.reshape(-1, *kn.shape[2:])[rows],
                                    vn.reshape(-1, *vn.shape[2:])[rows],
                                    None if sinks is None else np.asarray(sinks, np.float64),
                                    1 / np.sqrt(q.shape[-1]), window, softcap)
    outs = {}
    for s in SPLITS:
        f = jax.jit(functools.partial(jax_fa4.paged_attention, implementation="fa4",
                                      return_lse=True, num_splits=s, **kw))
        compiled = f.lower(q, kc, vc, table, used, sinks=sinks).compile()
        assert "jax_fa4_cute_call" in compiled.as_text()
        o, lse = compiled(q, kc, vc, table, used, sinks=sinks)
        _check(o, lse, ro, rl, slice(None))
        outs[s] = _f64(o)
    for s in SPLITS[1:]:
        assert _relerr(outs[s], outs[1]) <= 1e-2, f"splits={s} vs unsplit"


def test_auto_split_is_used_for_decode():
    """paged_attention picks > 1 split for a small decode batch on its own."""
    plan = varlen.kernel_plan(
        "paged_attention", q=jax.ShapeDtypeStruct((1, 1, 32, 128), jnp.bfloat16),
        k_cache=jax.ShapeDtypeStruct((512, 64, 4, 128), jnp.bfloat16),
        v_cache=jax.ShapeDtypeStruct((512, 64, 4, 128), jnp.bfloat16),
        page_table=jax.ShapeDtypeStruct((1, 512), jnp.int32),
        seqused_k=jax.ShapeDtypeStruct((1,), jnp.int32), is_causal=True)
    assert plan.num_splits > 1


@pytest.mark.parametrize("tq,kw,hd", [(1, {}, 128), (3, dict(logits_soft_cap=30.0), 128),
                                      (1, {}, 512)])
def test_attention_short_q_long_k_splits(tq, kw, hd):
    """attention() with a short query and long dense keys takes the split kernel (no
    causal mask: jax.nn's top-left alignment makes T < S causal a fallback)."""
    rng = np.random.default_rng(3)
    b, n, kh = (2, 16, 2) if hd == 128 else (1, 8, 1)
    q = _random(rng, (b, tq, n, hd), jnp.bfloat16)
    k, v = (_random(rng, (b, 9000, kh, hd), jnp.bfloat16) for _ in range(2))
    assert jax_fa4.api.kernel_plan(q, k, v, **kw).num_splits > 1
    f = jax.jit(functools.partial(jax_fa4.attention, implementation="fa4", **kw))
    o = f(q, k, v)
    ref = jax_fa4.attention(q.astype(jnp.float32), k.astype(jnp.float32),
                            v.astype(jnp.float32), implementation="xla", **kw)
    assert not np.isnan(_f64(o)).any()
    assert _relerr(_f64(o), _f64(ref)) <= 1e-2
