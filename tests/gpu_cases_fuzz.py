"""Seeded random calls through the public API for tests/test_gpu_fuzz.py, drawn from the
whole accepted space: every multiple of 8 from 8 to 256 and 512 for head dims (a value
head dim that differs now and then), GQA groups 1-16, dense (with and without jax.nn's
sequence lengths) / varlen / paged, Tq 1-16
and prefill chunks, sequence lengths 0-20k with empty sequences, pages of 8-256 tokens,
causal / windows (one- and two-sided, -1 unbounded) / softcap / sinks / scale, fp16 and
bf16, `num_splits` forced or automatic; a third of the dense and varlen calls also take
gradients.

JAX_FA4_FUZZ_SEED picks the draw (use a new one each session and record it with the
result in docs/RELIABILITY.md); JAX_FA4_FUZZ_N the number of calls; JAX_FA4_FUZZ_SKIP
leaves out calls by id (`skipped`: those an earlier run of the seed passed).  The same module is
the precompile list: `JAX_FA4_FUZZ_SEED=... python -m jax_fa4.precompile --calls
tests/gpu_cases_fuzz.py [--backward]`.  Each call carries its own data knobs (lengths,
page table seed, ...) under keys starting with '_', which precompile ignores.

Also REPROS: the calls of the issue "Correct or refused" that crashed (head dims 160 and
224 on the cp.async page path) or gave wrong output (head dim 96, 192x144 tile).
"""
import os

import numpy as np

SEED = int(os.environ.get("JAX_FA4_FUZZ_SEED", "20261207"))
N = int(os.environ.get("JAX_FA4_FUZZ_N", "320"))
# Work bound per call (query rows x keys x query heads): the float64 reference of the
# largest calls dominates a run (10-16 s each at 3e8, the bound seed 20261207 was drawn
# with); 1e8 keeps 300+ calls within one device call of 10 processes.
MAX_WORK = float(os.environ.get("JAX_FA4_FUZZ_MAX_WORK", "1e8"))

HEAD_DIMS = tuple(range(8, 257, 8)) + (512,)
DTYPES = ("bfloat16", "float16")


def _lengths(rng, n, hi):
    """n sequence lengths in [0, hi]: empty, 1, odd, page-straddling and long ones."""
    pool = [0, 1, 17, 333, 4097, int(rng.integers(2, max(3, hi + 1)))]
    out = rng.choice(pool, size=n) if rng.random() < 0.6 else rng.integers(0, hi + 1, n)
    return [int(min(x, hi)) for x in out]


def _options(rng, hd):
    kw = {}
    m = rng.choice(["none", "causal", "window", "causal_window"], p=[0.3, 0.35, 0.2, 0.15])
    w = lambda: int(rng.choice([-1, 0, 1, 7, 64, 255, int(rng.integers(0, 3000))]))  # noqa: E731
    if m in ("causal", "causal_window"):
        kw["is_causal"] = True
    if m in ("window", "causal_window"):
        left, right = w(), w()
        if m == "causal_window":
            right = 0
        if (left, right) == (-1, -1):
            left = 100
        kw["local_window_size"] = (left, right)
    if rng.random() < 0.3:
        kw["logits_soft_cap"] = float(np.round(rng.uniform(5, 50), 1))
    if rng.random() < 0.3:
        kw["sinks"] = True
    if rng.random() < 0.2:
        kw["scale"] = float(np.round(rng.uniform(0.3, 2.0) / np.sqrt(hd), 5))
    return kw


def _dims(rng):
    hd = int(rng.choice(HEAD_DIMS, p=None))
    hdv = hd
    if hd != 512 and rng.random() < 0.1:
        hdv = int(rng.choice(HEAD_DIMS[:-1]))
    return hd, hdv


def _dense(rng, dtype, hd, hdv, kvh, group):
    b = int(rng.integers(1, 4))
    if rng.random() < 0.4:  # decode-like: short q against long keys
        sq, sk = int(rng.integers(1, 17)), int(rng.integers(1, 20001))
    else:
        sq = int(rng.choice([1, 17, 128, 333, int(rng.integers(2, 2049))]))
        sk = sq if rng.random() < 0.6 else int(rng.choice([17, 333, int(rng.integers(1, 4098))]))
    n = kvh * group
    while b * sq * sk * n > MAX_WORK:
        sk = max(1, sk // 2)
    return dict(query=((b, sq, n, hd), dtype), key=((b, sk, kvh, hd), dtype),
                value=((b, sk, kvh, hdv), dtype))


def _varlen(rng, dtype, hd, hdv, kvh, group):
    b = int(rng.integers(1, 7))
    lq, lk = _lengths(rng, b, 2048), _lengths(rng, b, 4097)
    if rng.random() < 0.5:  # self-attention chunks: equal lengths
        lk = list(lq)
    n = kvh * group
    while sum(q * k for q, k in zip(lq, lk)) * n > MAX_WORK:
        lk = [k // 2 for k in lk]
    pad_q, pad_k = int(rng.integers(0, 9)), int(rng.integers(0, 9))
    c = dict(fn="varlen_attention", q=((sum(lq) + pad_q, n, hd), dtype),
             k=((sum(lk) + pad_k, kvh, hd), dtype), v=((sum(lk) + pad_k, kvh, hdv), dtype),
             cu_seqlens_q=((b + 1,), "int32"), cu_seqlens_k=((b + 1,), "int32"),
             max_seqlen_q=max(1, max(lq)) + int(rng.integers(0, 3)),
             max_seqlen_k=max(1, max(lk)) + int(rng.integers(0, 3)), _lq=lq, _lk=lk)
    if rng.random() < 0.25:
        c["seqused_k"] = ((b,), "int32")
        c["_used_k"] = [int(k * rng.uniform(0.3, 1.0)) for k in lk]
    return c


def _paged(rng, dtype, hd, hdv, kvh, group):
    b = int(rng.integers(1, 9))
    ps = int(rng.choice([16, 64, 128, 256, 80, 96, 112, 144, int(rng.integers(1, 33)) * 8]))
    used = _lengths(rng, b, 20000)
    n = kvh * group
    packed = rng.random() < 0.3
    tq = int(rng.integers(1, 17)) if rng.random() < 0.8 else int(rng.integers(17, 301))
    while b * tq * max(used + [1]) * n > MAX_WORK:
        used = [u // 2 for u in used]
    max_pages = max(1, -(-max(used + [1]) // ps) + int(rng.integers(0, 3)))
    pages = b * max_pages + int(rng.integers(1, 8))
    c = dict(fn="paged_attention", k_cache=((pages, ps, kvh, hd), dtype),
             v_cache=((pages, ps, kvh, hdv), dtype), page_table=((b, max_pages), "int32"),
             seqused_k=((b,), "int32"), _used_k=used)
    if packed:
        lq = [int(x) for x in rng.integers(0, tq + 1, b)]
        c.update(q=((sum(lq) + int(rng.integers(0, 5)), n, hd), dtype),
                 cu_seqlens_q=((b + 1,), "int32"), max_seqlen_q=max(1, max(lq)), _lq=lq)
    else:
        c["q"] = ((b, tq, n, hd), dtype)
        r = rng.random()
        if r < 0.3:
            c["num_splits"] = 1
        elif r < 0.6:
            c["num_splits"] = int(rng.choice([2, 3, 7, 16, 32, 64]))
    return c


def draw(rng, i):
    dtype = str(rng.choice(DTYPES))
    hd, hdv = _dims(rng)
    group = int(rng.integers(1, 17))
    kvh = int(rng.choice([1, 2]))
    kind = rng.choice(["dense", "varlen", "paged"], p=[0.35, 0.2, 0.45])
    c = {"dense": _dense, "varlen": _varlen, "paged": _paged}[kind](rng, dtype, hd, hdv, kvh,
                                                                     group)
    c.update(_options(rng, hd))
    if kind == "dense" and "local_window_size" in c:  # attention: ints are literal (jax.nn)
        c["local_window_size"] = tuple(None if w == -1 else w for w in c["local_window_size"])
    if kind == "dense" and rng.random() < 0.3:  # jax.nn's sequence lengths (some past T/S)
        (b, t), s = c["query"][0][:2], c["key"][0][1]
        if rng.random() < 0.6:
            c["query_seq_lengths"], c["_lq"] = ((b,), "int32"), _lengths(rng, b, t + 1)
        if rng.random() < 0.8:
            c["key_value_seq_lengths"], c["_lk"] = ((b,), "int32"), _lengths(rng, b, s + 1)
    c["_seed"] = int(rng.integers(0, 2**31))
    c["_id"] = i
    c["grad"] = bool(kind != "paged" and rng.random() < 1 / 3)
    return c


def calls(seed=SEED, n=N):
    rng = np.random.default_rng(seed)
    return [draw(rng, i) for i in range(n)]


def _repros():
    r = []
    # 1. cp.async pages, head dim 224 (tile_n 80): illegal address.
    r.append(dict(fn="paged_attention", q=((2, 200, 6, 224), "float16"),
                  k_cache=((87, 8, 2, 224), "float16"), v_cache=((87, 8, 2, 224), "float16"),
                  page_table=((2, 38), "int32"), seqused_k=((2,), "int32"),
                  logits_soft_cap=15.0, sinks=True, _used_k=[300, 78]))
    # 2. packed q, head dim 160 (tile_n 112): illegal address.
    r.append(dict(fn="paged_attention", q=((600, 2, 160), "bfloat16"),
                  cu_seqlens_q=((4,), "int32"), max_seqlen_q=200,
                  k_cache=((13, 128, 1, 160), "bfloat16"), v_cache=((13, 128, 1, 160), "bfloat16"),
                  page_table=((3, 4), "int32"), seqused_k=((3,), "int32"),
                  _used_k=[278, 48, 300], _lq=[200, 200, 200]))
    # 3. head dim 96 without a mask (192x144 tile): wrong output; Tq 8 and 1, split and not.
    for tq, splits in ((8, None), (8, 1), (1, None), (1, 1)):
        c = dict(fn="paged_attention", q=((2, tq, 2, 96), "bfloat16"),
                 k_cache=((179, 256, 2, 96), "bfloat16"), v_cache=((179, 256, 2, 96), "bfloat16"),
                 page_table=((2, 79), "int32"), seqused_k=((2,), "int32"), _used_k=[1283, 20000])
        if splits:
            c["num_splits"] = splits
        r.append(c)
    for ps in (8, 32):
        r.append(dict(fn="paged_attention", q=((2, 8, 2, 96), "bfloat16"),
                      k_cache=((150, ps, 2, 96), "bfloat16"), v_cache=((150, ps, 2, 96), "bfloat16"),
                      page_table=((2, 70), "int32"), seqused_k=((2,), "int32"),
                      _used_k=[400, 60 * ps]))
    for i, c in enumerate(r):
        c.update(_seed=1000 + i, _id=f"repro{i}", grad=False)
    return r


def skipped(spec: str) -> set:
    """The call ids JAX_FA4_FUZZ_SKIP names: comma-separated ids and ranges ("0-3,34,
    repro"; "repro" is every repro), e.g. the calls of a seed that passed in an earlier
    session (docs/RELIABILITY.md), so a later run spends the device on the rest."""
    out = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part == "repro":
            out |= {c["_id"] for c in REPROS}
        elif "-" in part:
            lo, hi = (int(x) for x in part.split("-"))
            out |= set(range(lo, hi + 1))
        else:
            out.add(part if part.startswith("repro") else int(part))
    return out


REPROS = _repros()
_SKIP = skipped(os.environ.get("JAX_FA4_FUZZ_SKIP", ""))
CALLS = [c for c in REPROS + calls() if c["_id"] not in _SKIP]
