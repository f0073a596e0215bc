"""GPU cases for jax.nn's sequence lengths on the dense FA4 path (`attention` with
query_seq_lengths / key_value_seq_lengths), shared by tests/test_gpu_lengths.py and
the precompile step (`python -m jax_fa4.precompile --calls tests/gpu_cases_lengths.py`).

Each way the dispatcher carries lengths (dispatch._dense_lengths) meets head dims
64/96/128/256/512, GQA groups 1-16, both dtypes and lengths 0, 1, 17, 333, 4097 and
past the padded shape (clamped, as jax.nn reads them):
* "kv": key lengths without a window (seqused_k; decode shapes take split-KV);
* "qkv": both lengths without a window (seqused_q and seqused_k);
* "q_causal": query lengths only, causal (unpadded kernel, padded rows zeroed);
* "eq_causal": equal lengths, causal (unpadded kernel under the device-side check);
* "gt_causal": more query than key rows, causal (the check fails: pure JAX).
`sinks=True` stands for random float32 sinks.  `_lq` / `_lk` are the lengths the test feeds (None: argument not given).
"""
import itertools

HEAD_DIMS = (64, 96, 128, 256, 512)
GROUPS = (1, 4, 16, 2)


def _call(mode, dtype, b, t, s, kvh, group, hd, lq, lk):
    n = kvh * group
    c = dict(query=((b, t, n, hd), dtype), key=((b, s, kvh, hd), dtype),
             value=((b, s, kvh, hd), dtype), _mode=mode, _lq=lq, _lk=lk)
    if lq is not None:
        c["query_seq_lengths"] = ((b,), "int32")
    if lk is not None:
        c["key_value_seq_lengths"] = ((b,), "int32")
    if mode.endswith("causal"):
        c["is_causal"] = True
    return c


def _cases():
    cases = []
    groups = itertools.cycle(GROUPS)
    dtypes = itertools.cycle(("bfloat16", "float16"))
    for hd in HEAD_DIMS:
        kvh = 1 if hd == 512 else 2
        g = lambda: 1 if hd == 512 else next(groups)  # noqa: E731
        cases += [
            _call("kv", next(dtypes), 3, 1, 4097, kvh, g(), hd, None, [4097, 0, 17]),  # decode
            dict(_call("kv", next(dtypes), 2, 1, 4097, kvh, g(), hd, None, [3000, 0]),
                 sinks=True),  # split-KV merged in JAX
            _call("kv", next(dtypes), 2, 333, 333, kvh, g(), hd, None, [1, 5000]),
            _call("qkv", next(dtypes), 3, 333, 400, kvh, g(), hd, [333, 17, 0], [400, 1, 333]),
            _call("q_causal", next(dtypes), 2, 333, 333, kvh, g(), hd, [17, 333], None),
            _call("eq_causal", next(dtypes), 3, 333, 333, kvh, g(), hd, [333, 1, 100],
                  [333, 1, 100]),
            _call("gt_causal", next(dtypes), 2, 128, 128, kvh, g(), hd, [128, 64], [32, 64]),
        ]
    return cases


CALLS = _cases()
