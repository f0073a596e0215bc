"""On the GPU: a split plan's decode output against the default plan's (validated by the
GPU suite) and a float64 reference (tests/reference.py), over bench_decode.py's kernels (their objects are
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from bench_decode import HEADS, KV_HEADS, PAGE, _planned  # noqa: E402
from reference import sequence64  # noqa: E402

LENS = (0, 1, 17, 333, 4097, 16384)


def _reference(q, kc, vc, table, used):
    """tests/reference.py's float64 attention per sequence: causal, FA's bottom-right
    alignment (query t of Tq sees keys <= n - Tq + t); an empty sequence gives zeros."""
    q, kc, vc = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, kc, vc))
    b, tq, h, d = q.shape
    out = np.zeros((b, tq, h, vc.shape[-1]))
    for i in range(b):
        n = int(used[i])
        if n:
            pages = np.asarray(table[i])[: -(-n // PAGE)]
            k = kc[pages].reshape(-1, KV_HEADS, d)[:n]
            v = vc[pages].reshape(-1, KV_HEADS, vc.shape[-1])[:n]
            out[i] = sequence64(q[i], k, v, offset=n - tq, window=(None, 0),
                                scale=d ** -0.5, softcap=None, sinks=None)[0]
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("plan")
    p.add_argument("--base", default=split.DEFAULT_PLAN)
    p.add_argument("--hdims", default="128,256,512")
    a = p.parse_args()
    fn = functools.partial(jax_fa4.paged_attention, is_causal=True, implementation="fa4")
    runs = {name: jax.jit(_planned(name, fn)) for name in (a.base, a.plan)}
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
                    used = jnp.asarray(lens, jnp.int32)
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


if __name__ == "__main__":
    sys.exit(main())
