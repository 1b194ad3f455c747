#!/usr/bin/env bash
# Device-side driver for one comparison run (used through the device `run` tool):
#   bench/run_dense.sh OUTDIR SEQS VARIANT_DIR...
# Each VARIANT_DIR holds mprefill-flash-bench; timings of every variant and of cuDNN SDPA
# (token-major views and contiguous head-major) land in OUTDIR as JSON lines, and a
# comparison table per variant is printed last.
set -u
out=$1; seqs=$2; shift 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader > "$out/smi.txt" 2>&1
for d in "$@"; do
  v=$(basename "$d")
  timeout 200 "$d/mprefill-flash-bench" --seq "$seqs" --causal both --reps 10 > "$out/flash_$v.jsonl" 2> "$out/flash_$v.err" || echo "bench $v failed rc=$?"
done
timeout 240 python3 bench/cudnn_baseline.py --seq "$seqs" --causal both --layout both --reps 10 > "$out/cudnn.jsonl" 2> "$out/cudnn.err" || echo "cudnn failed rc=$?"
for d in "$@"; do
  v=$(basename "$d")
  echo "== $v"
  python3 bench/compare_dense.py "$out/flash_$v.jsonl" "$out/cudnn.jsonl" "$out/dense_$v.json"
done
grep -h '"layout"' "$out/cudnn.jsonl" | python3 -c '
import json,sys
for l in sys.stdin:
    r=json.loads(l); print("cudnn", r["seq"], r["causal"], r["layout"], r["ms"], r["tflops"])'
