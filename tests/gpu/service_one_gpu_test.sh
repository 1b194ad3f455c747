#!/usr/bin/env bash
# One-GPU service path (label gpu): `mprefill run --device cuda --ranks 1` starts a
# coordinator, a one-rank worker group whose executor is the CUDA backend of
# engine/executor.h (make_executor), and a CPU decoder; the KV goes over TCP from host
# staging. The ids must equal `generate --device cuda` and, for the golden prompt, the
# stories15M golden ids of ../shared/models/stories15M/README.md.
#   service_one_gpu_test.sh BIN_DIR SOURCE_DIR
# Model: MPREFILL_STORIES15M_HF, else SOURCE_DIR/.carry/gpuengine/stories15M-bf16 (the bf16
# HF conversion launch/DEVICE.md carries). Exit 77 (skip) without a GPU or the model.
set -u -o pipefail
BIN=${1:?usage: service_one_gpu_test.sh BIN_DIR SOURCE_DIR}
SRC=${2:?usage: service_one_gpu_test.sh BIN_DIR SOURCE_DIR}
OUTD=$(mktemp -d)
trap 'rm -rf "$OUTD"' EXIT
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${ngpu:-0}" -lt 1 ]; then
  if [ "${MPREFILL_REQUIRE_GPU:-0}" = 1 ]; then echo "FAIL: no GPU visible"; exit 1; fi
  echo "SKIP: no GPU visible"; exit 77
fi
HF=${MPREFILL_STORIES15M_HF:-$SRC/.carry/gpuengine/stories15M-bf16}
if [ ! -f "$HF/config.json" ]; then
  echo "SKIP: no bf16 HF conversion of stories15M (set MPREFILL_STORIES15M_HF)"
  echo "SKIP-MISSING-FILE: $(realpath -m "$HF/config.json")"
  exit 77
fi

fail=0
ids_of() { python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1])).get('generated_ids')))" "$1" 2>/dev/null; }
check() {  # description, actual, expected
  if [ "$2" = "$3" ] && [ "$2" != "null" ] && [ -n "$2" ]; then echo "ok: $1 ($2)"
  else echo "FAIL: $1: got '$2', want '$3'"; fail=1; fi
}
step() {  # name, command...
  local name=$1; shift
  timeout 300 "$@" >"$OUTD/$name.json" 2>"$OUTD/$name.log"
  local rc=$?
  echo "$name: rc=$rc"
  if [ $rc -ne 0 ]; then echo "--- $name log:"; tail -20 "$OUTD/$name.log"; fail=1; fi
}

GOLDEN='[29892, 727, 471, 263, 2217, 7826, 4257, 365]'
step run_golden "$BIN/mprefill" run --device cuda --ranks 1 --model "$HF" \
  --prompt-ids 1,9038,2501,263,931 --decode 7 --json
check "run --device cuda --ranks 1, 'Once upon a time' ids = golden" \
  "$(ids_of "$OUTD/run_golden.json")" "$GOLDEN"
grep -h "executor" "$OUTD/run_golden.log" | head -1

IDS=$(python3 -c "print(','.join(str(3 + (i * 7919) % 500) for i in range(250)))")
step generate "$BIN/mprefill" generate --device cuda --model "$HF" --prompt-ids "$IDS" --decode 6 --json
step run_250 "$BIN/mprefill" run --device cuda --ranks 1 --model "$HF" --prompt-ids "$IDS" \
  --decode 6 --json
check "run --device cuda --ranks 1 = generate --device cuda (250 tokens)" \
  "$(ids_of "$OUTD/run_250.json")" "$(ids_of "$OUTD/generate.json")"
exit $fail
