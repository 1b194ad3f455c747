#!/usr/bin/env bash
# Device-side driver: full shape set of BENCHMARKS.md for one build of the dense kernel.
#   bench/run_final.sh OUTDIR BINDIR
# Writes flash.jsonl / cudnn.jsonl (+ .err) and dense.json into OUTDIR; prints the table.
set -u
out=$1; bin=$2/mprefill-flash-bench
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader > "$out/smi.txt" 2>&1
fb() { timeout 200 "$bin" "$@" >> "$out/flash.jsonl" 2>> "$out/flash.err" || echo "bench $* failed rc=$?"; }
cb() { timeout 200 python3 bench/cudnn_baseline.py "$@" >> "$out/cudnn.jsonl" 2>> "$out/cudnn.err" || echo "cudnn $* failed rc=$?"; }
fb --seq 32768,131072 --causal both --reps 10
fb --seq 524288 --heads 4 --kv-heads 1 --causal 1 --reps 5 --warmup 1
fb --seq 1048576 --heads 2 --kv-heads 1 --causal 1 --reps 5 --warmup 1
fb --seq 32768 --dim 64 --causal both --reps 10
fb --seq 32768 --dtype fp16 --causal both --reps 10
cb --seq 32768,131072 --causal both --layout both --reps 10
cb --seq 524288 --heads 4 --kv-heads 1 --causal 1 --reps 5 --warmup 1
cb --seq 1048576 --heads 2 --kv-heads 1 --causal 1 --reps 5 --warmup 1
cb --seq 32768 --dim 64 --causal both --layout both --reps 10
python3 bench/compare_dense.py "$out/flash.jsonl" "$out/cudnn.jsonl" "$out/dense.json"
