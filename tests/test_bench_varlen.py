"""benchmarks/bench_varlen.py's batches reach the FA4 kernel (not the fallback) and its
jax_fa4 program lowers to the custom call (CPU: cross-lowering)."""
import os
import sys

import jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import bench_varlen  # noqa: E402
from jax_fa4.precompile import plan_call  # noqa: E402


def test_every_row_plans_the_kernel():
    assert len(bench_varlen.CALLS) == len(bench_varlen.ROWS) == 4
    for call, row in zip(bench_varlen.CALLS, bench_varlen.ROWS):
        v = plan_call(call).kernel_variant  # raises Unsupported on a fallback
        assert v.q_layout == "packed" and v.head_dim == bench_varlen.HDIM
        assert len(set(row["lens"])) > 1, "a mixed batch"


def test_jax_fa4_program_lowers_to_the_custom_call():
    row = dict(lens=(17, 333, 100), causal=True, label="t")
    f, args = bench_varlen.programs(row)["jax_fa4"]
    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in args]
    text = f.trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
    assert "jax_fa4" in text


def test_padded_peer_sees_the_same_sequences():
    """The peers' padded batch holds the packed tokens: jax.nn's XLA attention on it
    equals jax_fa4's pure-JAX varlen path on the packed batch, sequence by sequence."""
    import jax.numpy as jnp
    import numpy as np

    import jax_fa4

    lens = (17, 40, 5)
    row = dict(lens=lens, causal=True, label="t")
    progs = bench_varlen.programs(row)
    f_xla, padded = progs["xla"]
    _, packed = progs["jax_fa4"]
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
    want = jax_fa4.varlen_attention(*packed, cu, cu, max_seqlen_q=max(lens),
                                    max_seqlen_k=max(lens), is_causal=True,
                                    implementation="xla")
    got = f_xla(*padded)
    for i, s in enumerate(lens):
        a = np.asarray(got[i, :s], np.float32)
        b = np.asarray(want[int(cu[i]):int(cu[i]) + s], np.float32)
        np.testing.assert_allclose(a, b, atol=2e-2, rtol=2e-2)


def test_a_row_is_timed_with_real_tokens_flops():
    """bench_row through bench_forward.time_program on CPU (the XLA peer): a positive
    TFLOP/s over the real tokens' work, no error recorded."""
    row = dict(lens=(17, 40, 5), causal=True, label="t")
    r = bench_varlen.bench_row(row, 2, ["xla"])
    assert r["tflops"]["xla"] > 0 and "errors" not in r
    assert r["tokens"] == 62 and r["lens"] == [17, 40, 5]
