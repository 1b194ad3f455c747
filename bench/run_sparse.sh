#!/usr/bin/env bash
# Device-side driver for the sparse attention kernels (kernels/cuda/sparse):
#   bench/run_sparse.sh OUTDIR BINDIR [test|bench|both] [extra bench args]
# Runs gpu_sparse_attention_test (+ memcheck on the small cases) and
# mprefill-sparse-bench (32K, 128K, clustered; own dense in the same process).
set -u
out=$1; bin=$2; what=${3:-both}; shift 3 || true
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader > "$out/smi.txt" 2>&1
if [ "$what" != bench ]; then
  timeout 120 "$bin/gpu_sparse_attention_test" > "$out/test.log" 2>&1; echo "test rc=$?"
  grep -E "^\[  (PASSED|FAILED) |FAILED|Failure|error" "$out/test.log" | head -30
  timeout 80 compute-sanitizer --tool memcheck "$bin/gpu_sparse_attention_test" \
    --gtest_filter='*RingSteps*:*AShape*:*Strided*' > "$out/memcheck.log" 2>&1
  echo "memcheck rc=$?"; tail -3 "$out/memcheck.log"
fi
if [ "$what" != test ]; then
  for set in clustered uniform; do
    timeout 150 "$bin/mprefill-sparse-bench" --set $set "$@" > "$out/sparse_bench_$set.jsonl" 2> "$out/sparse_bench_$set.err"
    echo "bench $set rc=$?"; cat "$out/sparse_bench_$set.err"
  done
fi
