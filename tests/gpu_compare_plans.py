"""On the GPU: a split plan's decode output against the default plan's (validated by the
GPU suite) and a float32 reference, over bench_decode.py's kernels (their objects are
precompiled for both plans) with odd and empty lengths.  A quick check for a plan whose
whole GPU suite has not run yet; prints one line per case, exits 1 on any mismatch.

  python tests/gpu_compare_plans.py issue18q [--base issue18]
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_fa4
from jax_fa4.kernels import split

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from bench_decode import HEADS, KV_HEADS, PAGE  # noqa: E402

LENS = (0, 1, 17, 333, 4097, 16384)


def _reference(q, kc, vc, table, used):
    """float32 causal decode attention (bottom-right aligned), per sequence."""
    q, kc, vc = (np.asarray(x, np.float32) for x in (q, kc, vc))
    b, tq, h, d = q.shape
    g = h // KV_HEADS
    out = np.zeros((b, tq, h, vc.shape[-1]), np.float32)
    for i in range(b):
        n = int(used[i])
        if n == 0:
            continue
        pages = np.asarray(table[i])[: -(-n // PAGE)]
        k = kc[pages].reshape(-1, KV_HEADS, d)[:n].transpose(1, 2, 0)  # (KV, d, n)
        v = vc[pages].reshape(-1, KV_HEADS, vc.shape[-1])[:n].transpose(1, 0, 2)  # (KV, n, dv)
        # query head j reads KV head j // g; rows (t, j % g) of each KV head
        qg = q[i].reshape(tq, KV_HEADS, g, d).transpose(1, 0, 2, 3).reshape(KV_HEADS, tq * g, d)
        s = (qg @ k) / np.sqrt(d)  # (KV, tq * g, n)
        pos = np.arange(n)[None, :]
        last = np.repeat(n - tq + np.arange(tq), g)[:, None]  # query t sees keys <= n - tq + t
        s = np.where((pos <= last)[None], s, -np.inf)
        m = s.max(-1, keepdims=True)
        p = np.where(np.isfinite(m), np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
        l = p.sum(-1, keepdims=True)
        o = (p / np.where(l > 0, l, 1)) @ v  # (KV, tq * g, dv)
        out[i] = o.reshape(KV_HEADS, tq, g, -1).transpose(1, 0, 2, 3).reshape(tq, h, -1)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("plan")
    p.add_argument("--base", default=split.DEFAULT_PLAN)
    p.add_argument("--hdims", default="128,256,512")
    a = p.parse_args()
    fn = functools.partial(jax_fa4.paged_attention, is_causal=True, implementation="fa4")
    runs = {name: jax.jit(lambda *x, name=name: _planned(name, fn, *x))
            for name in (a.base, a.plan)}
    bad = 0
    rng = np.random.default_rng(20261207)
    for hd in (int(x) for x in a.hdims.split(",")):
        for b in (1, 8):
            for tq in (1, 8):
                cap = 16384
                max_pages = cap // PAGE
                pages = b * max_pages
                kc = jnp.asarray(rng.standard_normal((pages, PAGE, KV_HEADS, hd)), jnp.bfloat16)
                vc = jnp.asarray(rng.standard_normal((pages, PAGE, KV_HEADS, hd)), jnp.bfloat16)
                q = jnp.asarray(rng.standard_normal((b, tq, HEADS, hd)), jnp.bfloat16)
                table = jnp.asarray(rng.permutation(pages).reshape(b, max_pages).astype(np.int32))
                for lens in ([[n] for n in LENS] if b == 1 else [list(rng.choice(LENS, b))]):
                    used = jnp.asarray(np.maximum(np.array(lens), 0), jnp.int32)
                    outs = {n: np.asarray(r(q, kc, vc, table, used), np.float32)
                            for n, r in runs.items()}
                    ref = _reference(q, kc, vc, np.asarray(table), np.asarray(used))
                    o = outs[a.plan]
                    err = np.linalg.norm(o - ref) / max(np.linalg.norm(ref), 1e-30)
                    diff = float(np.abs(o - outs[a.base]).max())
                    ok = np.isfinite(o).all() and err <= 1e-2
                    bad += not ok
                    print(f"{'ok' if ok else 'WRONG'} hdim {hd} b{b} tq{tq} lens {lens}: "
                          f"rel err {err:.2e}, max |{a.plan} - {a.base}| {diff:.2e}", flush=True)
    print(f"{bad} wrong")
    return 1 if bad else 0


def _planned(name, fn, *args):
    with split.use_plan(name):
        return fn(*args)


if __name__ == "__main__":
    sys.exit(main())
