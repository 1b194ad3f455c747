#!/usr/bin/env bash
# Device-side driver of the attention comparison (one device call; BENCHMARKS.md K1-K3):
#   bench/run_attention.sh OUTDIR BINDIR [MINFERENCE_DIR] [SEQS] [REPEAT] [LONG_SEQS]
# BINDIR holds mprefill-bench; MINFERENCE_DIR a copy of MInference's minference/ops kernel
# files (git-ignored, e.g. .carry/minference). SEQS default 32768,131072 (32 q / 8 kv
# heads); LONG_SEQS (e.g. 524288,1048576: 4 / 2 heads, clustered only) optional.
#  1. mprefill-bench attention: own dense, vertical-slash over the Llama-3-8B budget mix
#     (5 classes, all heads per class, `clustered` and `uniform`), block-sparse top-100
#     (pooled estimate), dumping every index file (MPIX) to a scratch folder;
#  2. minference_baseline.py: MInference's Triton kernels on the same index files;
#  3. cudnn_baseline.py: cuDNN SDPA dense causal on the same shapes;
#  4. compare_attention.py: the joined table (printed last) and summary.json.
# At most 8 files come back from OUTDIR: smi.txt, ours.jsonl, minference.jsonl,
# cudnn.jsonl, summary.json, table.txt, log.txt.
set -u
out=$1
bin=$2/mprefill-bench
mdir=${3:-.carry/minference}
seqs=${4:-32768,131072}
rep=${5:-5}
long=${6:-}
work=/tmp/attn_work
rm -rf "$work"
mkdir -p "$work/ix"
export PYTHONUNBUFFERED=1
log="$out/log.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv,noheader > "$out/smi.txt" 2>&1
t0=$(date +%s)
stamp() { echo "# [$(($(date +%s) - t0)) s] $*" | tee -a "$log"; }

# Index files first (CPU only, deterministic seeds: the GPU runs below rebuild the same
# selections), so that MInference runs on them even if a kernel of ours fails.
stamp "index files: $seqs $long"
timeout 120 "$bin" attention --index-only --seq "$seqs" --pattern vertical_slash \
  --index-set clustered,uniform --mix llama3-8b --dump-indices "$work/ix/" \
  > "$work/ix.jsonl" 2>> "$log" || stamp "index-only failed rc=$?"
if [ -n "$long" ]; then
  timeout 120 "$bin" attention --index-only --seq "$long" --pattern vertical_slash \
    --index-set clustered --mix llama3-8b --dump-indices "$work/ix/" \
    >> "$work/ix.jsonl" 2>> "$log" || stamp "index-only long failed rc=$?"
fi
stamp "ours: $seqs dense + vertical_slash"
timeout 200 "$bin" attention --seq "$seqs" --pattern dense,vertical_slash \
  --index-set clustered,uniform --mix llama3-8b --json --dump-indices "$work/ix/" \
  --warmup 1 --repeat "$rep" >> "$out/ours.jsonl" 2>> "$log" || stamp "mprefill-bench vs failed rc=$?"
stamp "ours: $seqs block_sparse"
timeout 120 "$bin" attention --seq "$seqs" --pattern block_sparse --json --dump-indices "$work/ix/" \
  --warmup 1 --repeat "$rep" >> "$out/ours.jsonl" 2>> "$log" || stamp "mprefill-bench bs failed rc=$?"
if [ -n "$long" ]; then
  stamp "ours: $long (clustered)"
  timeout 150 "$bin" attention --seq "$long" --pattern dense,vertical_slash \
    --index-set clustered --mix llama3-8b --json --dump-indices "$work/ix/" \
    --warmup 1 --repeat 3 >> "$out/ours.jsonl" 2>> "$log" || stamp "mprefill-bench long failed rc=$?"
fi
grep '^#' "$out/ours.jsonl" | tail -40

stamp "minference"
timeout 300 python3 bench/minference_baseline.py --from-jsonl "$out/ours.jsonl,$work/ix.jsonl" \
  --minference-dir "$mdir" --warmup 1 --repeat "$rep" >> "$out/minference.jsonl" 2>> "$log" ||
  stamp "minference_baseline failed rc=$?"

stamp "cudnn"
timeout 120 python3 bench/cudnn_baseline.py --seq "$seqs" --causal 1 --layout both \
  --reps "$rep" --warmup 1 >> "$out/cudnn.jsonl" 2>> "$log" || stamp "cudnn failed rc=$?"
if [ -n "$long" ]; then
  for n in ${long//,/ }; do
    h=4
    [ "$n" -gt 524288 ] && h=2
    timeout 60 python3 bench/cudnn_baseline.py --seq "$n" --heads $h --kv-heads 1 --causal 1 \
      --layout token --reps 3 --warmup 1 >> "$out/cudnn.jsonl" 2>> "$log" || stamp "cudnn $n failed rc=$?"
  done
fi
stamp "done"
tail -5 "$log"
python3 bench/compare_attention.py "$out/ours.jsonl" "$out/minference.jsonl" "$out/cudnn.jsonl" \
  "$out/summary.json" | tee "$out/table.txt"
