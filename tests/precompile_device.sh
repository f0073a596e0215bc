#!/usr/bin/env bash
# Here (CPU host with jax_fa4[compile]): build every kernel object the GPU tests and
# benchmarks need into ${1:-.device/kernels} (docs/DEVICE.md).  Progress on stderr.
set -eu
dir=${1:-.device/kernels}
jobs=${JOBS:-2}
pc() { python -m jax_fa4.precompile --cache-dir "$dir" --jobs "$jobs" "$@"; }
pc_specs() {  # the variants a benchmark's --sweep-specs prints, one --variant each
  python "$1" --sweep-specs | sed 's/^/--variant\n/' | tr '\n' '\0' \
    | xargs -0 python -m jax_fa4.precompile --cache-dir "$dir" --jobs "$jobs"
}
build_calls() {  # every calls file of the GPU tests and the benchmarks
  for calls in tests/gpu_cases.py tests/gpu_cases_paged.py tests/gpu_cases_split.py \
               tests/gpu_cases_multi.py tests/gpu_cases_hdim512.py \
               benchmarks/bench_paged.py benchmarks/bench_decode.py \
               benchmarks/bench_decode_loop.py benchmarks/bench_guard_cost.py \
               examples/gemma/kernel_calls.py; do
    pc --calls "$calls"
  done
  pc --calls tests/gpu_cases_backward.py --backward
  # every reachable kernel class (tests/plan_space.py) and the seeded fuzz calls
  # (JAX_FA4_FUZZ_SEED: the same seed must reach the GPU run); both build the backward
  # kernels of the calls marked grad
  pc --calls tests/gpu_cases_coverage.py --backward
  pc --calls tests/gpu_cases_fuzz.py --backward
  pc --calls tests/gpu_cases_memcheck.py  # compute-sanitizer cases
  pc --calls tests/gpu_cases_memory_safety.py  # out-of-range metadata (guard.py)
  pc --calls tests/gpu_cases_lengths.py --backward  # jax.nn's sequence lengths
  pc --calls tests/gpu_cases_parity.py --backward  # JAX's own attention tests
  # the issue's paged repros with the tiles planned before the cp.async fix (diagnostic)
  python tests/diag_cp_async_overrun.py --precompile "$dir"
  pc --calls benchmarks/bench_backward.py --backward
  pc --calls benchmarks/bench_forward.py  # issue 20's rows (--set issue20)
  pc --calls benchmarks/bench_varlen.py  # issue 20's mixed-length packed batches
  pc --dtype bfloat16 --head-dim 64,128,256 --group 1 --mask none,causal  # bench_forward
  pc_specs benchmarks/bench_forward.py  # its --tile-sweep's alternative tiles
  pc_specs benchmarks/bench_backward.py  # its --tile-sweep's head-dim-256 backward tiles
}
# once per split plan (kernels/split.SPLIT_PLANS): the default and the candidates not yet
# decided on a GPU (split.CANDIDATE_PLANS); later passes find every kernel that does not
# depend on the plan already built.  PLANS: a space-separated list instead ("all": every
# plan, for a run that benchmarks the rejected ones again)
default_plans=$(python -c "from jax_fa4.kernels.split import DEFAULT_PLAN, CANDIDATE_PLANS; print(DEFAULT_PLAN, *CANDIDATE_PLANS)")
[ "${PLANS:-}" = all ] && PLANS=$(python -c "from jax_fa4.kernels.split import SPLIT_PLANS; print(*SPLIT_PLANS)")
for plan in ${PLANS:-$default_plans}; do
  echo "== split plan $plan" >&2
  JAX_FA4_SPLIT_PLAN=$plan build_calls
done
# head dim 512: the non-default designs the GPU test and the benchmark launch directly
# (single-QK too: its GPU matrix runs with JAX_FA4_TEST_HDIM512_DESIGNS=single_qk)
JAX_FA4_TEST_HDIM512_DESIGNS=${JAX_FA4_TEST_HDIM512_DESIGNS:-split_k,split_pv,single_qk} python -c "import sys; sys.path.insert(0, 'tests'); import gpu_cases_hdim512 as g; \
g.precompile_designs('$dir')"
BENCH_HDIM512_DESIGNS=${BENCH_HDIM512_DESIGNS:-split_k,split_pv,single_qk} \
  JAX_FA4_CACHE_DIR="$dir" python benchmarks/bench_hdim512.py --precompile
# The device takes 64 MiB per call: carry the objects as one xz archive (~10x smaller;
# tests/gpu_run.sh unpacks it) instead of the directory.
tar cf - -C "$(dirname "$dir")" "$(basename "$dir")" | xz -T2 -6 >"$dir.tar.xz"
