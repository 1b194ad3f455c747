#!/usr/bin/env bash
# The main job, end to end: setup (install + build mprefill), then one prefill + decode.
# Until the prefill service exists this runs `mprefill generate` on the stories15M test
# model (../shared/models/stories15M, or MPREFILL_SHARED_DIR/models/stories15M).
#
#   launch/demo.sh [--prompt TEXT] [--decode N] [--device cpu|cuda] [setup options...]
set -euo pipefail
LOG_TAG=demo
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PROMPT="Once upon a time"
DECODE=32
DEVICE=cpu
SETUP_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --prompt) PROMPT="$2"; shift ;;
    --decode) DECODE="$2"; shift ;;
    --device) DEVICE="$2"; shift ;;
    --build-dir) SETUP_ARGS+=("$1" "$2"); BUILD_DIR="$(realpath -m "$2")"; shift ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) SETUP_ARGS+=("$1") ;;
  esac
  shift
done

"$ROOT/launch/setup.sh" --target mprefill "${SETUP_ARGS[@]}"

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
log "command: ${BIN#$ROOT/} generate $(printf '%q ' "${MODEL_ARGS[@]}")--decode $DECODE --device $DEVICE"
stats=$(mktemp)
trap 'rm -f "$stats"' EXIT
rc=0
text=$("$BIN" generate "${MODEL_ARGS[@]}" --decode "$DECODE" --device "$DEVICE" 2>"$stats") || rc=$?
echo "----"
[ -n "$text" ] && printf '%s\n' "$text"
echo "----"
cat "$stats"
[ $rc = 0 ] || die "mprefill generate failed (exit $rc)"
log "above: the prompt and its continuation; then prompt tokens, time to first token (ttft),"
if [ "$DEVICE" = cpu ]; then
  log "decode time and tokens/s (CPU engine, ${MPREFILL_THREADS:-$(jobs_n)} threads)"
else
  log "decode time and tokens/s ($DEVICE engine)"
fi
