#!/usr/bin/env bash
# On the GPU host (docs/DEVICE.md): build the extension, run the GPU tests and/or the
# benchmark with precompiled kernels from .device/kernels; logs go to $OUT.
#   tests/gpu_run.sh tests|bench|all
set -u
what=${1:-all}
OUT=${OUT:-/tmp/jax_fa4_out}
mkdir -p "$OUT"
RT=$(python3 .device/unpack-runtime.py) || exit 1
if ! python3 -c "import jax_fa4._ffi" 2>/dev/null; then
  python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 \
    || { tail -40 "$OUT/install.log"; exit 1; }
fi
export JAX_FA4_CUTE_RUNTIME=$RT JAX_FA4_CACHE_DIR=$PWD/.device/kernels JAX_FA4_COMPILE=never
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  # No GEMM autotuning for the tests: it costs seconds per new reference shape.
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" \
  timeout ${TEST_TIMEOUT:-3000} python3 -u -m pytest -m gpu -q -rs --durations=15 ${PYTEST_ARGS:-} tests 2>&1 | tee "$OUT/gpu-tests.log" | grep -E "^(FAILED|ERROR)|passed|failed"; rc=${PIPESTATUS[0]}
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout ${BENCH_TIMEOUT:-3000} python3 -u benchmarks/bench_forward.py --out "$OUT/forward.json" ${BENCH_ARGS:-} \
    2>&1 | tee "$OUT/bench.log" | grep -vE "^(WARNING|I0000|E0000)"; [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
exit $rc
