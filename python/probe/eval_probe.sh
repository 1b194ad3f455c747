#!/usr/bin/env bash
# Retrieval accuracy of the probe model through the mprefill engine, per sparse policy,
# with the mask tile density beside each (mprefill-search --eval-retrieval).
#
#   python/probe/eval_probe.sh PROBE_DIR [BUILD_DIR] [SAMPLES]
#
# PROBE_DIR: the output of train_probe.py (config.json, model.safetensors, eval_*.jsonl,
# calib_8k.ids). Steps: (1) pattern search on the 8K calibration prompt -> searched.json
# (+ CSV and heatmaps); (2) per length, accuracy for dense, MInference's default budgets
# (auto: vertical-slash 1000/6096 on every head), the searched config, A-shape only, and
# the default / searched budgets scaled so the estimated masks keep <= 10% of the tiles.
# Results: PROBE_DIR/eval/*.md and *.json.
# Environment: LENGTHS (default "8k 16k 32k") and SEARCH (default 1; 0 skips step 1 when
# searched.json exists), so each length can run as its own command: the engine here is the
# CPU reference (about 30 s per dense 32K prompt of this model on 16 cores, estimated from
# 4.6 GFLOP/s per core measured on the tiny shape at 4K).
set -euo pipefail
probe=${1:?usage: eval_probe.sh PROBE_DIR [BUILD_DIR] [SAMPLES]}
build=${2:-build}
samples=${3:-20}
bin="$build/bin/mprefill-search"
[[ -x "$bin" ]] || { echo "eval_probe.sh: error: $bin not built (ninja -C $build mprefill-search)" >&2; exit 1; }
[[ -f "$probe/config.json" ]] || { echo "eval_probe.sh: error: $probe/config.json not found" >&2; exit 1; }
out="$probe/eval"
mkdir -p "$out"

# Heatmaps of head 0 of every layer.
layers=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['num_hidden_layers'])" "$probe/config.json")
heads=$(seq -s, 0 $((layers - 1)) | sed 's/\([0-9]*\)/\1:0/g')
if [[ "${SEARCH:-1}" == 1 || ! -f "$out/searched.json" ]]; then
"$bin" --model "$probe" --calib "$probe/calib_8k.ids" --budget-tiles 0.1 \
  --out "$out/searched.json" --csv "$out/searched.csv" --heatmaps "$out/heatmaps" \
  --heatmap-heads "$heads"
"$bin" --recall-table --model "$probe" --calib "$probe/calib_8k.ids" \
  --budgets 0.05,0.1,0.2,0.3 --lengths 4096,8192 --table "$out/recall.md"
fi

policies="dense;auto;$out/searched.json;ashape:128:1920;auto@0.1;$out/searched.json@0.1"
for len in ${LENGTHS:-8k 16k 32k}; do
  f="$probe/eval_$len.jsonl"
  [[ -f "$f" ]] || continue
  echo "== $len" >&2
  "$bin" --model "$probe" --eval-retrieval "$f" --limit "$samples" --policies "$policies" \
    --json "$out/accuracy_$len.json" | tee "$out/accuracy_$len.md"
done
