#!/usr/bin/env bash
# The main job, end to end: setup (install + build), then the prefill service on one
# prompt: `mprefill run` starts a coordinator, a worker group (mpirun -np RANKS
# mprefill-worker, tensor x sequence parallel), and a decoder; submits the prompt; the
# workers prefill it with sparse attention and hand the KV cache of every layer to the
# decoder over TCP, which continues the generation; everything is shut down at the end.
# Model: stories15M (../shared/models/stories15M, or MPREFILL_SHARED_DIR/models/stories15M),
# else a small random model.
#
#   launch/demo.sh [--prompt TEXT] [--decode N] [--ranks R] [--tp T] [--device cpu|cuda]
#                  [setup options...]
set -euo pipefail
LOG_TAG=demo
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PROMPT="Once upon a time"
DECODE=32
DEVICE=cpu
RANKS=2
TP=1
SETUP_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --prompt) PROMPT="$2"; shift ;;
    --decode) DECODE="$2"; shift ;;
    --device) DEVICE="$2"; shift ;;
    --ranks) RANKS="$2"; shift ;;
    --tp) TP="$2"; shift ;;
    --build-dir) SETUP_ARGS+=("$1" "$2"); BUILD_DIR="$(realpath -m "$2")"; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) SETUP_ARGS+=("$1") ;;
  esac
  shift
done

"$ROOT/launch/setup.sh" --target mprefill --target mprefill-worker --target mprefill-decoder \
  "${SETUP_ARGS[@]}"

BIN="$BUILD_DIR/bin/mprefill"
[ -x "$BIN" ] || die "$BIN was not built"
SHARED="${MPREFILL_SHARED_DIR:-$ROOT/../shared}"
MODEL_DIR="$(realpath -m "$SHARED/models/stories15M")"

if [ -f "$MODEL_DIR/stories15M.bin" ] && [ -f "$MODEL_DIR/tokenizer.bin" ]; then
  MODEL_ARGS=(--model "$MODEL_DIR/stories15M.bin" --tokenizer "$MODEL_DIR/tokenizer.bin"
    --prompt "$PROMPT")
  what="stories15M (llama2.c checkpoint, fp32) from $MODEL_DIR"
  prompt_desc="\"$PROMPT\""
elif "$BIN" generate --help 2>&1 | grep -q 'random:'; then
  MODEL_ARGS=(--model random:tiny --prompt-ids 1,15,27,301,42,7)  # tiny: vocab 512
  what="a randomly initialised 'tiny' model (no stories15M found under $SHARED); ids in and out"
  prompt_desc="ids 1,15,27,301,42,7"
else
  log "no model to run: $MODEL_DIR/stories15M.bin is missing (set MPREFILL_SHARED_DIR to the"
  log "folder holding models/stories15M) and this build of mprefill has no random models"
  exit 1
fi

log "model: $what"
log "prompt: $prompt_desc  decode: $DECODE tokens, greedy, device: $DEVICE"
log "service: coordinator + $RANKS worker ranks (tp $TP x sp $((RANKS / TP))) + 1 decoder, KV over TCP"
RUN_ARGS=(run --ranks "$RANKS" --tp "$TP" --device "$DEVICE" "${MODEL_ARGS[@]}" --decode "$DECODE")
log "command: ${BIN#$ROOT/} $(printf '%q ' "${RUN_ARGS[@]}")"
stats=$(mktemp)
trap 'rm -f "$stats"' EXIT
rc=0
text=$("$BIN" "${RUN_ARGS[@]}" 2>"$stats") || rc=$?
echo "----"
[ -n "$text" ] && printf '%s\n' "$text"
echo "----"
cat "$stats"
[ $rc = 0 ] || die "mprefill run failed (exit $rc)"
log "above: the prompt and the continuation the decoder generated from the handed-off KV;"
log "then the job line: time to first token (queue + prefill), KV bytes handed off, decode"
log "(same ids as single-process 'mprefill generate': tests/service/service_e2e_test.cc)"
