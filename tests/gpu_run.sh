#!/usr/bin/env bash
# On the GPU host (docs/DEVICE.md): build the extension, then run what $1 lists
# (comma-separated: tests, parity, timeline, ncu, ncu_fwd, diag, memcheck,
# guard, bench, varlen, paged, decode, sweep, loop, gemma, backward, bwd_sweep, compare,
# hdim512, single_qk; default
# tests,bench) with precompiled kernels from .device/kernels (or .device/kernels.tar.xz,
# unpacked first: the device takes 64 MiB per call).  Logs and JSON go to $OUT.
set -u
what=",${1:-tests,bench},"
OUT=${OUT:-/tmp/jax_fa4_out}
mkdir -p "$OUT"
RT=$(python3 .device/unpack-runtime.py) || exit 1
# Reinstall unless jax_fa4 (with its extension) already imports from this tree: a warm
# machine may still hold an editable install of another checkout.
here=$(python3 -c "import jax_fa4._ffi, os; print(os.path.dirname(jax_fa4.__file__))" 2>/dev/null)
if [ "$here" != "$PWD/jax_fa4" ]; then
  python3 -m pip uninstall -q -y jax_fa4 >/dev/null 2>&1
  python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 \
    || { tail -40 "$OUT/install.log"; exit 1; }
fi
if [ -f .device/kernels.tar.xz ]; then  # fresh each call: a warm machine may hold an older set
  rm -rf .device/kernels && tar xJf .device/kernels.tar.xz -C .device || exit 1
fi
export JAX_FA4_CUTE_RUNTIME=$RT JAX_FA4_CACHE_DIR=$PWD/.device/kernels JAX_FA4_COMPILE=never
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
rc=0
quiet() { grep --line-buffered -vE "^(WARNING|I0000|E0000|W0000)"; }
if [[ $what == *,tests,* ]]; then
  # No GEMM autotuning for the tests: it costs seconds per new reference shape.
  # Shards, one process each (tests/gpu_shards.py): a CUDA illegal address is reported
  # with its case and the shard goes on in a new process.  GPU_TESTS: pytest selection
  # (default: every gpu test); GPU_TEST_JOBS shards at a time.
  # GPU_TEST_K: a pytest -k expression (may hold spaces).  The driver's own deadline
  # ends it first, so its summary is written (NOT_RUN) and not lost to the outer
  # timeout.  (No comment line may sit inside the continued command below: a comment
  # after a backslash ends the command there, and XLA_FLAGS never reached the tests --
  # tests/test_shell_scripts.py checks every script for it.)
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" \
  timeout ${TEST_TIMEOUT:-3000} python3 -u tests/gpu_shards.py --out "$OUT" \
    --deadline $(( ${TEST_TIMEOUT:-3000} - 20 )) --shard-size ${GPU_SHARD_SIZE:-60} \
    ${GPU_TEST_K:+-k "$GPU_TEST_K"} ${GPU_TESTS:-tests} 2>&1 \
    | tee "$OUT/gpu-tests.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [[ $what == *,parity,* ]]; then
  # JAX's own dot_product_attention tests and the Flax adapter (not gpu-marked: they
  # run on CPU too; here they assert the FA4 path where explain() says it applies)
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" timeout ${PARITY_TIMEOUT:-900} \
    python3 -m pytest -q -rs -p no:cacheprovider tests/test_jax_nn_parity.py \
    tests/test_flax.py 2>&1 | tee "$OUT/parity.log" | tail -25
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [[ $what == *,diag,* ]]; then
  # The issue's paged repros with the pre-fix tiles and today's (docs/DESIGN.md)
  timeout ${DIAG_TIMEOUT:-300} python3 -u tests/diag_cp_async_overrun.py ${DIAG_ARGS:-} 2>&1 \
    | tee "$OUT/diag.log" | grep --line-buffered "^repro"
fi
if [[ $what == *,memcheck,* ]]; then
  # compute-sanitizer over paged/split cases on both page paths; the platform allocator
  # gives each buffer its own allocation, so memcheck sees every operand's bounds.
  XLA_PYTHON_CLIENT_ALLOCATOR=platform XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" \
    timeout ${MEMCHECK_TIMEOUT:-900} compute-sanitizer --tool memcheck --print-limit 50 \
    --error-exitcode 9 python3 -u tests/gpu_cases_memcheck.py 2>&1 | tee "$OUT/memcheck.log" \
    | grep --line-buffered -E "^(ok|WRONG|memcheck|=========)" | tail -60
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [[ $what == *,guard,* ]]; then
  timeout ${BENCH_TIMEOUT:-3000} python3 -u benchmarks/bench_guard_cost.py \
    --out "$OUT/guard.json" 2>&1 | tee "$OUT/guard.log" | quiet
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [[ $what == *,sweep,* ]]; then
  # SWEEP_MATCH: only the tiles whose description holds one of these (comma-separated)
  timeout ${BENCH_TIMEOUT:-3000} python3 -u benchmarks/bench_forward.py --tile-sweep \
    ${SWEEP_MATCH:+--sweep-match "$SWEEP_MATCH"} ${SWEEP_REPS:+--reps $SWEEP_REPS} \
    --out "$OUT/tile_sweep.json" 2>&1 | tee "$OUT/tile_sweep.log" | quiet
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [[ $what == *,varlen,* ]]; then
  # issue 20's mixed-length packed batches: jax_fa4.varlen_attention vs cuDNN/XLA padded
  timeout ${BENCH_TIMEOUT:-3000} python3 -u benchmarks/bench_varlen.py \
    --out "$OUT/varlen.json" 2>&1 | tee "$OUT/varlen.log" | quiet
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [[ $what == *,bench,* ]]; then
  timeout ${BENCH_TIMEOUT:-3000} python3 -u benchmarks/bench_forward.py --out "$OUT/forward.json" \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | quiet
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [[ $what == *,paged,* ]]; then
  timeout ${BENCH_TIMEOUT:-3000} python3 -u benchmarks/bench_paged.py --out "$OUT/paged.json" \
    2>&1 | tee "$OUT/paged.log" | quiet
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [[ $what == *,decode,* ]]; then
  timeout ${BENCH_TIMEOUT:-3000} python3 -u benchmarks/bench_decode.py ${DECODE_ARGS:-} --png "$OUT/decode.png" \
    --out "$OUT/decode.json" 2>&1 | tee "$OUT/decode.log" | quiet
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [[ $what == *,timeline,* ]]; then
  # every kernel and gap of one decode call (issue 18's shapes) and of a short forward
  # TIMELINE_SHAPES: ';'-separated timeline.py arguments
  IFS=';' read -ra shapes <<<"${TIMELINE_SHAPES:-decode --b 1 --s 16384;decode --b 8 --s 32768;forward --b 32 --s 1024 --causal}"
  for shape in "${shapes[@]}"; do
    name=$(echo $shape | tr -d ' -')
    timeout ${BENCH_TIMEOUT:-600} python3 -u benchmarks/timeline.py $shape \
      --out "$OUT/timeline_$name.json" 2>&1 | tee -a "$OUT/timeline.log" | quiet | tail -20
  done
fi
if [[ $what == *,ncu,* ]]; then
  # Nsight Compute on one decode call's split and combine kernels (NCU_DECODE: the
  # timeline.py shape), for where the split kernel's fixed cost goes (the fused plan's
  # kernel, JAX_FA4_SPLIT_PLAN=issue18f, is Sm90FusedSplit)
  timeout ${NCU_TIMEOUT:-300} ncu --target-processes all -k "regex:Sm90(Fused)?Split|Combine" \
    --launch-count 2 --section SpeedOfLight --section LaunchStats --section Occupancy \
    --section WarpStateStats --section MemoryWorkloadAnalysis \
    --metrics sm__cycles_active.max,sm__cycles_active.min,sm__cycles_active.avg,dram__bytes_read.sum \
    python3 benchmarks/timeline.py decode ${NCU_DECODE:---b 1 --s 32768} --layers 1 --no-trace \
    >"$OUT/ncu.txt" 2>&1
  grep -E "==PROF==|==ERROR==|Duration|DRAM Throughput|Memory Throughput|sm__cycles_active|Registers|Achieved Occupancy|Block Limit|Grid Size|Shared Memory Config" "$OUT/ncu.txt" | head -60
fi
if [[ $what == *,ncu_fwd,* ]]; then
  # Nsight Compute (--set full) on one forward kernel per NCU_FORWARD spec (';'-separated
  # timeline.py forward arguments): by default the head-dim-512 designs against FA4's
  # own hdim-128 and -256 kernels, for the shared-memory traffic model in docs/PERF.md;
  # with `--impl cudnn` in a spec, cuDNN's kernel (issue 20's short rows: what cuDNN's
  # short-sequence kernel does differently).  The metric list of this ncu (shared
  # memory, tensor pipes) goes to ncu_metrics.txt.
  ncu --query-metrics 2>/dev/null | grep -iE "shared|gmma|tensor|data_bank" >"$OUT/ncu_metrics.txt"
  IFS=';' read -ra specs <<<"${NCU_FORWARD:---b 2 --s 8192 --heads 32 --kv-heads 4 --hdim 512 --design split_k;--b 2 --s 8192 --heads 32 --kv-heads 4 --hdim 512 --design single_qk;--b 2 --s 8192 --heads 32 --kv-heads 4 --hdim 512 --design split_pv;--b 4 --s 8192 --heads 16 --hdim 128;--b 4 --s 4096 --heads 8 --hdim 256}"
  for spec in "${specs[@]}"; do
    name=$(echo $spec | tr -d ' -')
    timeout ${NCU_TIMEOUT:-300} ncu --target-processes all -k "regex:flash_fwd|sdpa|fprop|fmha" \
      --launch-count 1 \
      --set full python3 benchmarks/timeline.py forward $spec --no-trace \
      >"$OUT/ncu_fwd_$name.txt" 2>&1
    echo "== $spec"
    grep -E "==PROF== Profiling|==ERROR==|Duration|SM Frequency|Compute \(SM\) Throughput|Memory Throughput|Shared|Tensor|Registers Per|Grid Size|Block Size|Waves Per SM|L2 Hit Rate" \
      "$OUT/ncu_fwd_$name.txt" | head -30
  done
fi
if [[ $what == *,compare,* ]]; then
  # a not-yet-validated split plan's decode output against the default plan's and a
  # float32 reference (COMPARE_PLAN, e.g. issue18q)
  timeout ${TEST_TIMEOUT:-600} python3 -u tests/gpu_compare_plans.py ${COMPARE_PLAN:-issue18q} \
    2>&1 | tee "$OUT/compare.log" | quiet
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [[ $what == *,backward,* ]]; then
  # forward + backward vs cuDNN, and the deterministic backward (BACKWARD_ARGS, e.g. --quick)
  timeout ${BENCH_TIMEOUT:-3000} python3 -u benchmarks/bench_backward.py --out "$OUT/backward.json" --png "$OUT/backward.png" \
    ${BACKWARD_ARGS:-} 2>&1 | tee "$OUT/backward.log" | quiet
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [[ $what == *,bwd_sweep,* ]]; then
  # head-dim-256 backward tiles (bench_backward.SWEEP_TILES) on issue 20's d256 rows
  timeout ${BENCH_TIMEOUT:-3000} python3 -u benchmarks/bench_backward.py --tile-sweep \
    --reps ${BWD_SWEEP_REPS:-10} --out "$OUT/backward_sweep.json" 2>&1 \
    | tee "$OUT/backward_sweep.log" | quiet
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [[ $what == *,hdim512,* ]]; then
  timeout ${BENCH_TIMEOUT:-3000} python3 -u benchmarks/bench_hdim512.py --reps 10 \
    --out "$OUT/hdim512.json" 2>&1 | tee "$OUT/hdim512.log" | quiet
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [[ $what == *,single_qk,* ]]; then
  # The single-QK head-dim-512 design, launched directly next to split-K (whose output
  # it must match); on its own and time-boxed: a design not yet validated here.
  BENCH_HDIM512_DESIGNS=split_k,single_qk timeout ${SINGLE_QK_TIMEOUT:-150} python3 -u \
    benchmarks/bench_hdim512.py --reps 5 --backends jax_fa4 \
    --out "$OUT/hdim512_single_qk.json" 2>&1 | tee "$OUT/hdim512_single_qk.log" | quiet
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [[ $what == *,loop,* ]]; then
  timeout ${BENCH_TIMEOUT:-3000} python3 -u benchmarks/bench_decode_loop.py \
    --out "$OUT/decode_loop.json" 2>&1 | tee "$OUT/decode_loop.log" | quiet
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [[ $what == *,gemma,* ]]; then
  # The Gemma example, mid preset (12 layers of the 31B shapes): jax_fa4, then the plain-XLA
  # attention (its prefill takes about a minute, so no warm-up run: one-time costs vanish).
  # GEMMA_RUNS: jax_fa4, xla, jax_fa4_issue17 and jax_fa4_issue18 (split calls planned
  # by that kernels/split.SPLIT_PLANS entry)
  for run in ${GEMMA_RUNS:-jax_fa4 xla}; do
    att=${run%_issue1[78]*}; warm=1; [ $att = xla ] && warm=0
    plan=${JAX_FA4_SPLIT_PLAN:-issue18}; [ $run != $att ] && plan=${run#jax_fa4_}
    JAX_FA4_SPLIT_PLAN=$plan timeout ${BENCH_TIMEOUT:-3000} python3 -u -m examples.gemma \
      --preset mid --attention $att --warmup $warm --progress-every 0 \
      --json "$OUT/gemma_mid_$run.json" ${GEMMA_ARGS:-} 2>&1 | tee "$OUT/gemma_$run.log" | quiet
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  done
fi
exit $rc
