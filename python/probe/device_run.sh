#!/bin/bash
# The device run behind docs/probe.md (issue 8): train the probe, then the pattern search (CPU) and the accuracy
# table (GPU engine). Run from the repo root. Args: training minutes.
set -o pipefail
R=$(pwd)
G=${PROBE_CARRY:-$R/.carry/probe}  # bin/mprefill-search (CUDA build) and lib/
M=${1:-3.5}
export NCCL_NVLS_ENABLE=0 CUDA_VISIBLE_DEVICES=0
export LD_LIBRARY_PATH=$G/lib:/usr/local/cuda/lib64:$LD_LIBRARY_PATH
if [ -f $G/lib/libprotobuf.so.32.xz ] && [ ! -f $G/lib/libprotobuf.so.32 ]; then xz -dk $G/lib/libprotobuf.so.32.xz; fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
P=/tmp/probe; E=/tmp/probe/eval; mkdir -p $E
PYTHONUNBUFFERED=1 timeout $(python3 -c "print(int($M*60+60))") python3 python/probe/train_probe.py --out $P --minutes $M 2>&1 | tee $OUT/train.log
mkdir -p $OUT/model; cp $P/config.json $P/model.safetensors $P/MODEL_CARD.md $P/train_summary.json $OUT/model/ 2>/dev/null
python3 python/probe/probe_task.py --out $P --lengths 8192,16384,32768 --samples ${SAMPLES:-20}
B=$G/bin/mprefill-search
# Search on the 8K calibration prompt (CPU, all cores), in the background.
( timeout 130 $B --model $P --calib $P/calib_8k.ids --budget-tiles 0.1 --out $E/searched.json \
   --csv $E/searched.csv --heatmaps $E/heatmaps --heatmap-heads 0:0,1:0,2:0,3:0 > $E/search.log 2>&1 ) &
SP=$!
( timeout 130 $B --recall-table --model $P --calib $P/calib_8k.ids --budgets 0.05,0.1,0.2,0.3 \
   --lengths 2048,4096 --table $E/recall.md > $E/recall.log 2>&1 ) &
pol="dense;auto;ashape:128:1920;auto@0.1"
for len in 8k 16k 32k; do
  timeout 60 $B --device cuda --model $P --eval-retrieval $P/eval_$len.jsonl --policies "$pol" --json $E/acc_a_$len.json 2>>$E/eval.err | tee $E/acc_a_$len.md
done
wait; tail -n 2 $E/search.log $E/recall.log
if [ -f $E/searched.json ]; then
  for len in 8k 16k 32k; do
    timeout 45 $B --device cuda --model $P --eval-retrieval $P/eval_$len.jsonl --policies "$E/searched.json;$E/searched.json@0.1" --json $E/acc_b_$len.json 2>>$E/eval.err | tee $E/acc_b_$len.md
  done
fi
tail -5 $E/eval.err
cd $E && tar cJf $OUT/eval.tar.xz . && ls -la $OUT
