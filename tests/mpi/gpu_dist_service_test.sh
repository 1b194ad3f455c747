#!/bin/bash
# Multi-GPU worker groups in the service (label gpu2, 2 GPUs): `mprefill run --device cuda
# --ranks 2` runs CudaBackend over NCCL (one GPU per rank, KV handed off per layer over TCP) and
# must give the same greedy ids as the single-process `mprefill generate --device cuda`:
#   stories15M (bf16 HF conversion, env MPREFILL_STORIES15M_HF), a 250-token prompt
#   (ids 3 + (i * 7919) % 500; 4 blocks, so both sp ranks hold two zigzag chunks; the
#   model's max_position is 256), 6 decode steps, as tp1 x sp2 and tp2 x sp1; plus "Once
#   upon a time" against the CPU golden ids as tp2 (5 tokens: too short for sp 2). The
#   one-rank service run (CudaBackend, tp 1 x sp 1) is checked against generate too, so a difference
#   of the decode paths shows as such.
# usage: gpu_dist_service_test.sh BIN_DIR [TOKENIZER]. Exit 77 (skip) without 2 GPUs,
# without MPREFILL_STORIES15M_HF, or (when all else passed) without the tokenizer for the
# golden-ids run, named on a line "SKIP-MISSING-FILE: PATH" (launch/check_skips.py).
# MPREFILL_TEST_OUT=DIR keeps the JSON results.
set -u -o pipefail
BIN=${1:?usage: gpu_dist_service_test.sh BIN_DIR [TOKENIZER]}
TOK=${2:-${MPREFILL_TOKENIZER:-}}
OUTD=${MPREFILL_TEST_OUT:-$(mktemp -d)}
mkdir -p "$OUTD"
export NCCL_NVLS_ENABLE=0
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${ngpu:-0}" -lt 2 ]; then echo "SKIP: needs 2 GPUs, found ${ngpu:-0}"; exit 77; fi
HF=${MPREFILL_STORIES15M_HF:-}
if [ -z "$HF" ]; then
  echo "SKIP: set MPREFILL_STORIES15M_HF to the bf16 HF conversion of stories15M"; exit 77
fi
if [ ! -f "$HF/config.json" ]; then echo "FAIL: MPREFILL_STORIES15M_HF=$HF has no config.json"; exit 1; fi

fail=0
ids_of() { python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1])).get('generated_ids')))" "$1" 2>/dev/null; }
check() {  # description, actual, expected
  if [ "$2" = "$3" ] && [ "$2" != "null" ] && [ -n "$2" ]; then echo "ok: $1 ($2)"
  else echo "FAIL: $1: got '$2', want '$3'"; fail=1; fi
}
step() {  # name, command...
  local name=$1; shift
  local t0=$(date +%s%N)
  timeout 300 "$@" >"$OUTD/$name.json" 2>"$OUTD/$name.log"
  local rc=$?
  echo "$name: rc=$rc $((($(date +%s%N) - t0) / 1000000)) ms"
  if [ $rc -ne 0 ]; then echo "--- $name log:"; tail -20 "$OUTD/$name.log"; fail=1; fi
}

IDS=$(python3 -c "print(','.join(str(3 + (i * 7919) % 500) for i in range(250)))")
step generate "$BIN/mprefill" generate --device cuda --model "$HF" --prompt-ids "$IDS" --decode 6 --json
REF=$(ids_of "$OUTD/generate.json")
# The one-rank service path (CudaBackend on one GPU, same decoder) as a second reference.
step run_1rank "$BIN/mprefill" run --device cuda --ranks 1 --model "$HF" --prompt-ids "$IDS" \
  --decode 6 --json
check "run --ranks 1 = generate --device cuda" "$(ids_of "$OUTD/run_1rank.json")" "$REF"
for tp in 1 2; do
  step "run_tp${tp}" "$BIN/mprefill" run --device cuda --ranks 2 --tp $tp --model "$HF" \
    --prompt-ids "$IDS" --decode 6 --json
  check "run --ranks 2 --tp $tp (tp$tp x sp$((2 / tp))) = generate --device cuda" \
    "$(ids_of "$OUTD/run_tp${tp}.json")" "$REF"
  grep -h "executor" "$OUTD/run_tp${tp}.log" | head -1
done
skipped=0
if [ -z "$TOK" ] || [ ! -f "$TOK" ]; then
  echo "SKIP: the golden-ids run needs the stories15M tokenizer"
  echo "SKIP-MISSING-FILE: $(realpath -m "${TOK:-tokenizer.bin}")"
  skipped=1
else
  GOLDEN='[29892, 727, 471, 263, 2217, 7826, 4257, 365]'
  step stories_tp2 "$BIN/mprefill" run --device cuda --ranks 2 --tp 2 --model "$HF" \
    --tokenizer "$TOK" --prompt "Once upon a time" --decode 7 --json
  check "stories15M 'Once upon a time' on 2 GPUs (tp2) = CPU golden ids" \
    "$(ids_of "$OUTD/stories_tp2.json")" "$GOLDEN"
fi
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 >"$OUTD/card.txt"
[ $fail = 0 ] && [ $skipped = 1 ] && exit 77
exit $fail
