#!/usr/bin/env bash
# Device-side driver, sparse kernel v2 / index v2 session (bench/NOTES.md sections 2-3):
#   bench/run_kernel_v2.sh OUTDIR BINDIR [OLD_INDEX_BINDIR] [SEQS]
# 1. gpu_sparse_attention_test (every case under sparse kernels v1 and v2) and
#    gpu_index_test, then memcheck on the ring / A-shape cases;
# 2. mprefill-sparse-bench, clustered, v1 and v2 in the same process (own dense too);
# 3. mprefill-index-bench of BINDIR and, when given, of OLD_INDEX_BINDIR (same call).
# Files back (<= 8): smi.txt, log.txt, sparse_clustered.jsonl, index_new.jsonl,
# index_old.jsonl, ncu.txt.
set -u
out=$1; bin=$2; old=${3:-}; seqs=${4:-32768,131072}
log="$out/log.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv,noheader > "$out/smi.txt" 2>&1
t0=$(date +%s)
stamp() { echo "# [$(($(date +%s) - t0)) s] $*" | tee -a "$log"; }

stamp "gpu_sparse_attention_test"
timeout 150 "$bin/gpu_sparse_attention_test" > /tmp/sparse_test.log 2>&1
stamp "sparse test rc=$?"
grep -E "^\[  (PASSED|FAILED) |^\[       OK|FAILED|Failure|error|Expected|Which is|max\|" /tmp/sparse_test.log | head -60 | tee -a "$log"
stamp "gpu_index_test"
timeout 60 "$bin/gpu_index_test" > /tmp/index_test.log 2>&1
stamp "index test rc=$?"
grep -E "^\[  (PASSED|FAILED) |FAILED|Failure" /tmp/index_test.log | head -20 | tee -a "$log"
stamp "sparse bench"
timeout 200 "$bin/mprefill-sparse-bench" --set clustered --seq "$seqs" --reps 8 \
  > "$out/sparse_clustered.jsonl" 2> /tmp/sparse_bench.err
stamp "sparse bench rc=$?"
cat /tmp/sparse_bench.err | tee -a "$log"
stamp "index bench (new)"
timeout 60 "$bin/mprefill-index-bench" > "$out/index_new.jsonl" 2> /tmp/index_new.err
stamp "index bench new rc=$?"
tail -12 /tmp/index_new.err | tee -a "$log"
if [ -n "$old" ]; then
  timeout 60 "$old/mprefill-index-bench" > "$out/index_old.jsonl" 2> /tmp/index_old.err
  stamp "index bench old rc=$?"
  tail -12 /tmp/index_old.err | tee -a "$log"
fi
stamp "memcheck (ring, A-shape, block-sparse; v1 and v2)"
timeout 120 compute-sanitizer --tool memcheck "$bin/gpu_sparse_attention_test" \
  --gtest_filter='*RingSteps*:*AShape*:*BlockSparse*' > /tmp/memcheck.log 2>&1
stamp "memcheck rc=$?"
tail -4 /tmp/memcheck.log | tee -a "$log"
stamp "ncu: v1 and v2 on the (30, 800) class, 32K"
for kv in 1 2; do
  timeout 90 ncu --kernel-name regex:'sparse_fwd' --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
    --metrics lts__t_bytes.sum.per_second,l1tex__m_xbar2l1tex_read_bytes.sum.per_second \
    "$bin/mprefill-sparse-bench" --seq 32768 --reps 1 --warmup 0 --kernels $kv > /tmp/ncu$kv.txt 2>&1
  echo "ncu v$kv rc=$?" >> "$out/ncu.txt"
  grep -vE "^==PROF==|^\{" /tmp/ncu$kv.txt | grep -E "sparse_fwd|Throughput|Duration|lts__|xbar|Stall|Warp Cycles|Issued|Eligible|Active Warps|No Eligible|One or More" >> "$out/ncu.txt"
done
tail -40 "$out/ncu.txt"
stamp "done"
