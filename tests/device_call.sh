#!/usr/bin/env bash
# One device call: run tests/gpu_run.sh steps, each into its own folder under $OUT/r,
# and pack them into $OUT/results.tgz after every step (the device returns few files).
# Usage: tests/device_call.sh "NAME|ENV=..^ENV=..|STEPS" ...   (ENV: ^-separated assignments)
set -u
R=$OUT/r; mkdir -p "$R"
for spec in "$@"; do
  IFS='|' read -r name envs steps <<<"$spec"
  mkdir -p "$R/$name"; t0=$(date +%s); IFS='^' read -ra envv <<<"$envs"
  env "${envv[@]}" OUT="$R/$name" bash tests/gpu_run.sh "$steps" >"$R/$name/console.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 ))s" | tee -a "$R/summary.txt"
  tail -5 "$R/$name/console.log"
  tar czf "$OUT/results.tgz" -C "$R" .
done
