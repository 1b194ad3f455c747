#!/usr/bin/env bash
# Device-side driver, one call (bench/NOTES.md sections 2-4, sparse kernel v2 session):
#   bench/run_final_v2.sh OUTDIR BINDIR OLD_INDEX_BINDIR [MINFERENCE_DIR] [SEQ] [REPEAT]
# 1. mprefill-index-bench of BINDIR and OLD_INDEX_BINDIR (same call);
# 2. gpu_sparse_attention_test (every case under kernels v1 and v2), gpu_index_test;
#    if the sparse test fails, everything below runs kernel v1 only (MPREFILL_SPARSE_KERNEL=1);
# 3. mprefill-sparse-bench (clustered, 32K + 128K, v1 and v2 in one process), memcheck;
# 4. attention harness at SEQ (bench/run_attention.sh's steps): mprefill-bench with the
#    default kernel (v2) and with MPREFILL_SPARSE_KERNEL=1 (v1) on the same index files,
#    MInference's Triton kernels on those files, cuDNN SDPA; the joined tables are made
#    afterwards with bench/compare_attention.py.
# Files back (8): log.txt, sparse_clustered.jsonl, index_new.jsonl, index_old.jsonl,
# ours.jsonl, ours_v1.jsonl, minference.jsonl, cudnn.jsonl.
set -u
out=$1; bin=$2; old=$3; mdir=${4:-.carry/minference}; seq=${5:-32768}; rep=${6:-3}
log="$out/log.txt"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv,noheader >> "$log" 2>&1
t0=$(date +%s)
stamp() { echo "# [$(($(date +%s) - t0)) s] $*" | tee -a "$log"; }

stamp "index bench new / old"
timeout 40 "$bin/mprefill-index-bench" > "$out/index_new.jsonl" 2> /tmp/index_new.err
stamp "index new rc=$?"
timeout 40 "$old/mprefill-index-bench" > "$out/index_old.jsonl" 2> /tmp/index_old.err
stamp "index old rc=$?"

stamp "gpu_sparse_attention_test"
timeout 45 "$bin/gpu_sparse_attention_test" > /tmp/sparse_test.log 2>&1
rc=$?
stamp "sparse test rc=$rc"
grep -E "^\[  (PASSED|FAILED) |^\[       OK|FAILED|Failure|Expected|Which is" /tmp/sparse_test.log | head -40 | tee -a "$log"
if [ $rc -ne 0 ]; then
  export MPREFILL_SPARSE_KERNEL=1
  stamp "sparse test failed: kernel v1 only from here"
fi
timeout 30 "$bin/gpu_index_test" > /tmp/index_test.log 2>&1
stamp "index test rc=$?"
grep -E "^\[  (PASSED|FAILED) |FAILED|Failure" /tmp/index_test.log | head -12 | tee -a "$log"

kernels=1,2
[ "${MPREFILL_SPARSE_KERNEL:-}" = 1 ] && kernels=1
stamp "sparse bench (kernels $kernels)"
timeout 70 "$bin/mprefill-sparse-bench" --set clustered --seq 32768,131072 --reps 6 \
  --kernels $kernels > "$out/sparse_clustered.jsonl" 2> /tmp/sparse_bench.err
stamp "sparse bench rc=$?"
cat /tmp/sparse_bench.err >> "$log"
timeout 40 compute-sanitizer --tool memcheck "$bin/gpu_sparse_attention_test" \
  --gtest_filter='*RingSteps*:*AShape*:*BlockSparse*' > /tmp/memcheck.log 2>&1
stamp "memcheck rc=$?"
tail -2 /tmp/memcheck.log >> "$log"

work=/tmp/attn_work
rm -rf "$work"
mkdir -p "$work/ix"
mb="$bin/mprefill-bench"
stamp "harness: index files $seq"
timeout 60 "$mb" attention --index-only --seq "$seq" --pattern vertical_slash \
  --index-set clustered,uniform --mix llama3-8b --dump-indices "$work/ix/" \
  > "$work/ix.jsonl" 2>> "$log" || stamp "index-only failed rc=$?"
stamp "harness: ours (default kernel)"
timeout 60 "$mb" attention --seq "$seq" --pattern dense,vertical_slash \
  --index-set clustered,uniform --mix llama3-8b --json --dump-indices "$work/ix/" \
  --warmup 1 --repeat "$rep" >> "$out/ours.jsonl" 2>> "$log" || stamp "ours vs failed rc=$?"
timeout 40 "$mb" attention --seq "$seq" --pattern block_sparse --json --dump-indices "$work/ix/" \
  --warmup 1 --repeat "$rep" >> "$out/ours.jsonl" 2>> "$log" || stamp "ours bs failed rc=$?"
stamp "harness: ours (kernel v1)"
MPREFILL_SPARSE_KERNEL=1 timeout 60 "$mb" attention --seq "$seq" --pattern dense,vertical_slash \
  --index-set clustered,uniform --mix llama3-8b --json --dump-indices "$work/ix/" \
  --warmup 1 --repeat "$rep" >> "$out/ours_v1.jsonl" 2>> "$log" || stamp "v1 vs failed rc=$?"
MPREFILL_SPARSE_KERNEL=1 timeout 40 "$mb" attention --seq "$seq" --pattern block_sparse --json \
  --dump-indices "$work/ix/" --warmup 1 --repeat "$rep" >> "$out/ours_v1.jsonl" 2>> "$log" ||
  stamp "v1 bs failed rc=$?"
stamp "harness: minference"
timeout 120 python3 bench/minference_baseline.py --from-jsonl "$out/ours.jsonl,$work/ix.jsonl" \
  --minference-dir "$mdir" --warmup 1 --repeat "$rep" >> "$out/minference.jsonl" 2>> "$log" ||
  stamp "minference failed rc=$?"
stamp "harness: cudnn"
timeout 60 python3 bench/cudnn_baseline.py --seq "$seq" --causal 1 --layout both \
  --reps "$rep" --warmup 1 >> "$out/cudnn.jsonl" 2>> "$log" || stamp "cudnn failed rc=$?"
stamp "done"
