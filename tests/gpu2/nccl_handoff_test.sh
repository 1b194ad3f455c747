#!/bin/bash
# Issue 6 GPU acceptance (label gpu2, 2 GPUs): `mprefill run --device cuda` with the
# worker rank on GPU 0 and the decoder receiving on GPU 1 (--decoder-device cuda:1), KV
# handed off over TCP and over NCCL:
#   1. stories15M (bf16 HF conversion, env MPREFILL_STORIES15M_HF), "Once upon a time",
#      7 decode steps: generated ids equal the CPU golden ids (tests/cpu/golden_test.cc).
#   2. a random head_dim-128 model (tests/gpu2/make_random_hf.py; env
#      MPREFILL_NCCLKV_RANDOM_HF or generated here), 32768 tokens: both transports hand off
#      every KV byte (tcp: f32 pages, nccl: bf16 device slices) and the decoder generates
#      the same ids from either; handoff GB/s printed for both.
# usage: nccl_handoff_test.sh BIN_DIR [TOKENIZER]. Exit 77 (skip) without 2 GPUs, without
# MPREFILL_STORIES15M_HF, or without the tokenizer (named on a line "SKIP-MISSING-FILE:
# PATH", launch/check_skips.py). MPREFILL_TEST_OUT=DIR keeps the JSON results.
set -u -o pipefail
BIN=${1:?usage: nccl_handoff_test.sh BIN_DIR [TOKENIZER]}
TOK=${2:-${MPREFILL_TOKENIZER:-}}
HERE=$(cd "$(dirname "$0")" && pwd)
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
if [ -z "$TOK" ] || [ ! -f "$TOK" ]; then
  echo "SKIP: the golden-ids runs need the stories15M tokenizer"
  echo "SKIP-MISSING-FILE: $(realpath -m "${TOK:-tokenizer.bin}")"; exit 77
fi
RND=${MPREFILL_NCCLKV_RANDOM_HF:-}
if [ -z "$RND" ]; then RND=$OUTD/rand-h128; python3 "$HERE/make_random_hf.py" "$RND" || exit 1; fi

fail=0
run() {  # name, then mprefill run arguments
  local name=$1; shift
  local t0=$(date +%s%N)
  timeout 300 "$BIN/mprefill" run --device cuda --decoder-device cuda:1 --json "$@" \
    >"$OUTD/$name.json" 2>"$OUTD/$name.log"
  local rc=$?
  printf '%-14s rc=%d  %d ms  ' "$name" $rc $((($(date +%s%N) - t0) / 1000000))
  python3 - "$OUTD/$name.json" <<'PY'
import json, sys
try:
    j = json.load(open(sys.argv[1]))
except Exception as e:
    print("no JSON result:", e); sys.exit(0)
print("status=%s ids=%s kv_bytes=%s handoff_ms=%.3f handoff_gbps=%.3f prefill_ms=%.1f" % (
    j.get("status"), j.get("generated_ids"), j.get("kv_bytes_handed_off"),
    j.get("handoff_ms", 0), j.get("handoff_gbps", 0), j.get("prefill_ms", 0)))
PY
  if [ $rc -ne 0 ]; then echo "--- $name log:"; tail -20 "$OUTD/$name.log"; fail=1; fi
}
field() { python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1])).get(sys.argv[2])))" "$OUTD/$1.json" "$2" 2>/dev/null; }
check() {  # description, actual, expected
  if [ "$2" = "$3" ]; then echo "ok: $1"; else echo "FAIL: $1: got $2, want $3"; fail=1; fi
}

GOLDEN='[29892, 727, 471, 263, 2217, 7826, 4257, 365]'
for t in tcp nccl; do
  run "stories_$t" --model "$HF" --tokenizer "$TOK" --prompt "Once upon a time" --decode 7 \
    --kv-transport "$t"
  check "stories15M over $t: generated ids = CPU golden ids" "$(field stories_$t generated_ids)" "$GOLDEN"
done
# prompt tokens x 6 layers x 288 (kv dim) x 2 tensors: f32 over tcp, bf16 over nccl.
P=$(field stories_tcp prompt_tokens)
case "$P" in ''|null) P=0 ;; esac
check "stories15M tcp KV bytes" "$(field stories_tcp kv_bytes_handed_off)" $((P * 6 * 288 * 2 * 4))
check "stories15M nccl KV bytes" "$(field stories_nccl kv_bytes_handed_off)" $((P * 6 * 288 * 2 * 2))

N=32768
IDS=$(python3 -c "print(','.join(str(3 + (i * 7919) % 500) for i in range($N)))")
L=$(python3 -c "import json; c=json.load(open('$RND/config.json')); print(c['num_hidden_layers'], c['num_key_value_heads'] * c['head_dim'])")
read -r NL KVD <<<"$L"
for t in tcp nccl; do
  run "random_$t" --model "$RND" --prompt-ids "$IDS" --decode 4 --kv-transport "$t" \
    --max-prompt $((2 * N))
  check "random $N tokens over $t: DONE" "$(field random_$t status)" '"DONE"'
done
check "random tcp KV bytes" "$(field random_tcp kv_bytes_handed_off)" $((N * NL * KVD * 2 * 4))
check "random nccl KV bytes" "$(field random_nccl kv_bytes_handed_off)" $((N * NL * KVD * 2 * 2))
check "random: same ids over tcp and nccl" "$(field random_nccl generated_ids)" "$(field random_tcp generated_ids)"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 >"$OUTD/card.txt"
exit $fail
