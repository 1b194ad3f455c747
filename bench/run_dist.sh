#!/usr/bin/env bash
# Distributed GPU prefill bench (issue 4 item 5, target E3 of ../shared/BENCHMARKS.md):
#   bench/run_dist.sh OUTDIR [BINDIR]      (BINDIR: where mprefill-bench is; default build/bin)
# Runs, Llama-3-8B shape, vertical-slash policy of configs/minference with the clustered
# synthetic index set as a fixed plan (E3 runs), or estimated on the ring (--index-set
# estimated: global estimation across the sp ranks, worker/cuda/sp_estimate.h):
#   2 GPUs 128K tp1 x sp2: ring KV skipping off / on (twice each), and estimated indices
#          against 1 GPU estimated (same random weights: same indices up to fp32 ties)
#   1 GPU  512K  (baseline, single-GPU engine)
#   4 GPUs 512K and 1M, tp x sp = 1x4 and 2x2
# One JSON line per run in OUTDIR/dist.jsonl, stderr of each run in OUTDIR/<name>.err,
# a summary in OUTDIR/log.txt. Needs 4 GPUs for the 4-rank runs (skipped with a note
# otherwise). Each run is bounded by `timeout`.
set -u
out=${1:?usage: bench/run_dist.sh OUTDIR [BINDIR]}
bin=${2:-build/bin}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
policy=configs/minference/Llama_3_8B_Instruct_262k_kv_out_v32_fit_o_best_pattern.json
common=(--shape llama3-8b --sparse "$policy" --index-set clustered --json)
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
log="$out/log.txt"
echo "# run_dist $(date -u +%FT%TZ) on $gpus GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" | tee "$log"

run() {  # name timeout_s ranks args...
  local name=$1 limit=$2 np=$3; shift 3
  local rc
  if [ "$np" -gt "$gpus" ]; then
    echo "$name: SKIPPED (needs $np GPUs, $gpus present)" | tee -a "$log"
    return
  fi
  if [ "$np" -eq 1 ]; then
    timeout "$limit" "$bin/mprefill-bench" prefill "$@" >> "$out/dist.jsonl" 2> "$out/$name.err"
  else
    timeout "$limit" mpirun --oversubscribe --bind-to none -np "$np" \
      "$bin/mprefill-bench" prefill "$@" >> "$out/dist.jsonl" 2> "$out/$name.err"
  fi
  rc=$?
  echo "$name: rc=$rc $(grep -h '^# prefill' "$out/$name.err" | tail -1)" | tee -a "$log"
}

est=(--shape llama3-8b --sparse "$policy" --index-set estimated --json)
for rep in 1 2; do
  run kvskip_off_128k_$rep 120 2 --tp 1 --sp 2 --seq 131072 "${common[@]}" --kv-skip off
  run kvskip_on_128k_$rep 120 2 --tp 1 --sp 2 --seq 131072 "${common[@]}" --kv-skip on
done
run est_gpu1_128k 120 1 --seq 131072 "${est[@]}"
run est_tp1sp2_128k 120 2 --tp 1 --sp 2 --seq 131072 "${est[@]}"
run gpu1_512k 300 1 --seq 524288 "${common[@]}"
run tp1sp4_512k 300 4 --tp 1 --sp 4 --seq 524288 "${common[@]}"
run tp1sp4_1m 420 4 --tp 1 --sp 4 --seq 1048576 "${common[@]}"
run tp2sp2_512k 300 4 --tp 2 --sp 2 --seq 524288 "${common[@]}"
run tp2sp2_1m 420 4 --tp 2 --sp 2 --seq 1048576 "${common[@]}"
echo "# done $(date -u +%FT%TZ)" | tee -a "$log"
