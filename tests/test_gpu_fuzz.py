"""Seeded fuzz through the public API on the GPU (marker `gpu`): the calls of
tests/gpu_cases_fuzz.py (JAX_FA4_FUZZ_SEED, JAX_FA4_FUZZ_N) against a float64 reference,
with every kernel output poisoned (NaN bytes) before each launch.

Each call: jitted `attention` / `varlen_attention` / `paged_attention` with
return_lse=True; no NaN anywhere; ‖out−ref‖/‖ref‖ <= 1e-2 and lse within 1e-3 on
the rows sequences use; rows that see no key are exactly zero; rows outside every
sequence are zero with lse -inf.  A third of the dense and varlen calls also compare
jax.grad against a float32 reference's.  A call the API refuses must refuse at trace
time with ValueError/NotImplementedError naming the argument.  With
JAX_FA4_FUZZ_REPORT=path, each process appends a JSON line (seed, counts per path,
refusals, worst errors, failures) to that file.
"""
import atexit
import collections
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa4

sys.path.insert(0, os.path.dirname(__file__))
import gpu_cases_fuzz  # noqa: E402
from reference import attention_jnp, sequence64  # noqa: E402
from test_gpu_forward import _has_sm90, _relerr, _window  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _has_sm90(), reason="needs an SM90 (Hopper) GPU"),
              pytest.mark.usefixtures("poisoned_outputs")]

CALLS = gpu_cases_fuzz.CALLS
# Each function's query, key and value arguments
OPERANDS = {"attention": ("query", "key", "value"), "varlen_attention": ("q", "k", "v"),
            "paged_attention": ("q", "k_cache", "v_cache")}
_REPORT = {"seed": gpu_cases_fuzz.SEED, "n": len(CALLS), "paths": collections.Counter(),
           "refused": [], "worst": {}, "failed": []}


def _write_report():
    path = os.environ.get("JAX_FA4_FUZZ_REPORT")
    if path and (_REPORT["paths"] or _REPORT["refused"]):  # one JSON line per process
        with open(path, "a") as f:
            f.write(json.dumps(_REPORT, default=str) + "\n")


atexit.register(_write_report)


def _id(c):
    fn = c.get("fn", "attention")[:5]
    q = c.get("query", c.get("q"))
    kv = c.get("value", c.get("v", c.get("v_cache")))
    opts = "-".join(k for k in ("is_causal", "local_window_size", "logits_soft_cap", "sinks",
                                "scale", "num_splits", "grad") if c.get(k))
    return f"{c['_id']}-{fn}-{q[1][:4]}-q{'x'.join(map(str, q[0]))}-dv{kv[0][-1]}-{opts}"


# --------------------------------------------------------------------------- reference

def _f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


# --------------------------------------------------------------------------- inputs

def _inputs(c):
    """Arrays for call `c` and the per-sequence reference jobs: a list of
    (out rows, q rows, key rows (into the flat K/V), offset)."""
    rng = np.random.default_rng(c["_seed"])
    arr = lambda spec: jnp.asarray(rng.standard_normal(spec[0], np.float32), spec[1])  # noqa
    fn = c.get("fn", "attention")
    a, jobs = {}, []
    heads = (c.get("query") or c.get("q"))[0][-2]
    sinks = jnp.asarray(rng.standard_normal(heads, np.float32)) if c.get("sinks") else None
    if fn == "attention":
        q, k, v = (arr(c[n]) for n in ("query", "key", "value"))
        a = dict(query=q, key=k, value=v)
        (b, t), sk = q.shape[:2], k.shape[1]
        for name, key in (("query_seq_lengths", "_lq"), ("key_value_seq_lengths", "_lk")):
            if key in c:
                a[name] = np.asarray(c[key], np.int32)
        lq = np.clip(c.get("_lq", [t] * b), 0, t)  # jax.nn's meaning of a length past T/S
        lk = np.clip(c.get("_lk", [sk] * b), 0, sk)
        for i in range(b):  # rows past lq[i]: zeros and lse -inf (the reference's start)
            rows = (i, slice(0, lq[i]))
            jobs.append((rows, rows, i * sk + np.arange(lk[i]), 0))
    elif fn == "varlen_attention":
        q, k, v = arr(c["q"]), arr(c["k"]), arr(c["v"])
        lq, lk = c["_lq"], c["_lk"]
        cu_q = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
        cu_k = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
        a = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        used = lk
        if "_used_k" in c:
            used = c["_used_k"]
            a["seqused_k"] = np.asarray(used, np.int32)
        for i in range(len(lq)):
            rows = slice(cu_q[i], cu_q[i] + lq[i])
            jobs.append((rows, (rows,), cu_k[i] + np.arange(used[i]), used[i] - lq[i]))
    else:
        q, kc, vc = arr(c["q"]), arr(c["k_cache"]), arr(c["v_cache"])
        pages, ps = kc.shape[:2]
        b, max_pages = c["page_table"][0]
        table = rng.permutation(pages)[: b * max_pages].reshape(b, max_pages).astype(np.int32)
        used = np.asarray(c["_used_k"], np.int32)
        a = dict(q=q, k_cache=kc, v_cache=vc, page_table=table, seqused_k=used)
        if "cu_seqlens_q" in c:
            lq = c["_lq"]
            cu_q = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
            a["cu_seqlens_q"] = cu_q
        for i in range(b):
            toks = np.arange(used[i])
            krows = table[i, toks // ps] * ps + toks % ps
            if "cu_seqlens_q" in c:
                rows = slice(cu_q[i], cu_q[i] + lq[i])
                jobs.append((rows, (rows,), krows, int(used[i]) - lq[i]))
            else:
                jobs.append((np.s_[i], (i, slice(None)), krows, int(used[i]) - q.shape[1]))
    return a, sinks, jobs


def _kwargs(c):
    kw = {k: c[k] for k in ("is_causal", "local_window_size", "logits_soft_cap", "scale",
                            "num_splits", "max_seqlen_q", "max_seqlen_k") if k in c}
    return kw


def _reference(c, a, sinks, jobs, out_shape, lse_shape):
    fn = c.get("fn", "attention")
    q, k, v = (_f64(a[n]) for n in OPERANDS[fn])
    kf, vf = k.reshape(-1, *k.shape[-2:]), v.reshape(-1, *v.shape[-2:])
    scale = c.get("scale", 1 / np.sqrt(q.shape[-1]))
    s64 = None if sinks is None else np.asarray(sinks, np.float64)
    ro, rl = np.zeros(out_shape), np.full(lse_shape, -np.inf)
    for out_rows, q_rows, krows, offset in jobs:
        o, lse = sequence64(q[q_rows], kf[krows], vf[krows], offset=offset,
                              window=_window(c), scale=scale,
                              softcap=c.get("logits_soft_cap"), sinks=s64)
        ro[out_rows], rl[out_rows] = o, lse
    return ro, rl


# --------------------------------------------------------------------------- the test

def _api(c):
    return getattr(jax_fa4, c.get("fn", "attention"))


@pytest.mark.parametrize("case", CALLS, ids=[_id(c) for c in CALLS])
def test_fuzz_call(case):
    a, sinks, jobs = _inputs(case)
    kw = _kwargs(case)
    f = jax.jit(functools.partial(_api(case), return_lse=True, sinks=sinks, **kw))
    try:
        compiled = f.lower(**a).compile()
    except (ValueError, NotImplementedError) as e:  # refused at trace time: say why
        _REPORT["refused"].append((case["_id"], str(e)[:200]))
        assert str(e), "a refusal must give a reason"
        return
    path = "fa4" if "jax_fa4_cute_call" in compiled.as_text() else "fallback"
    _REPORT["paths"][f"{case.get('fn', 'attention')}:{path}"] += 1
    o, lse = compiled(**a)
    o64, lse64 = _f64(o), np.asarray(lse, np.float64)
    try:
        assert not np.isnan(o64).any(), "NaN in the output (unwritten poisoned rows?)"
        assert not np.isnan(lse64).any(), "NaN in the LSE"
        ro, rl = _reference(case, a, sinks, jobs, o64.shape, lse64.shape)
        err = _relerr(o64, ro) if np.linalg.norm(ro) > 0 else float(np.abs(o64).max(initial=0))
        _REPORT["worst"][path] = max(_REPORT["worst"].get(path, 0.0), err)
        assert err <= 1e-2, f"{path}: output rel. error {err:.3e}"
        fin = np.isfinite(rl)
        np.testing.assert_array_equal(np.isfinite(lse64), fin, err_msg=f"{path}: lse finiteness")
        if fin.any():
            lerr = _relerr(lse64[fin], rl[fin])
            assert lerr <= 1e-3, f"{path}: lse rel. error {lerr:.3e}"
        dead = ~fin
        if dead.any():  # rows with no visible key (and no sink): exact zeros
            assert not np.abs(np.moveaxis(o64, -1, 0)[:, dead]).any(), \
                f"{path}: rows that see no key are not zero"
        if case.get("grad"):
            _check_grads(case, a, sinks, jobs, kw)
    except AssertionError:
        _REPORT["failed"].append(case["_id"])
        raise


def _check_grads(c, a, sinks, jobs, kw):
    fn = c.get("fn", "attention")
    names = OPERANDS[fn]
    q, k, v = (a[n] for n in names)
    rest = {n: x for n, x in a.items() if n not in names}
    rng = np.random.default_rng(c["_seed"] + 1)
    out_shape = q.shape[:-1] + (v.shape[-1],)
    w_o = jnp.asarray(rng.standard_normal(out_shape, np.float32))
    w_l = jnp.asarray(rng.standard_normal(q.shape[:-1], np.float32))

    def loss_of(o, lse):
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(lse * w_l)

    def fa(q, k, v, s):
        o, lse = _api(c)(**dict(zip(names, (q, k, v))), **rest, sinks=s, return_lse=True,
                         **kw)
        return loss_of(o, lse)

    scale = c.get("scale", 1 / np.sqrt(q.shape[-1]))

    def ref(q, k, v, s):
        o = jnp.zeros(out_shape, jnp.float32)
        lse = jnp.full(q.shape[:-1], -jnp.inf)
        kf, vf = k.reshape(-1, *k.shape[-2:]), v.reshape(-1, *v.shape[-2:])
        for out_rows, q_rows, krows, offset in jobs:
            qi = q[q_rows]
            if qi.shape[0] == 0:
                continue
            oi, li = attention_jnp(qi[None], kf[krows][None], vf[krows][None], s,
                                   offset=offset, window=_window(c), scale=scale,
                                   softcap=c.get("logits_soft_cap"))
            oi, li = oi[0], li[0]
            o, lse = o.at[out_rows].set(oi), lse.at[out_rows].set(li)
        return loss_of(o, lse)

    argnums = (0, 1, 2, 3) if sinks is not None else (0, 1, 2)
    got = jax.jit(jax.grad(fa, argnums=argnums))(q, k, v, sinks)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.jit(jax.grad(ref, argnums=argnums))(*f32, sinks)
    for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got, want):
        g = np.asarray(jnp.asarray(g, jnp.float32))
        assert not np.isnan(g).any(), f"NaN in {name}"
        err = _relerr(g, np.asarray(w))
        assert err <= 2e-2, f"{name} rel. error {err:.2e}"
