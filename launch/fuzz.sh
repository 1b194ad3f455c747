#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan, -DMPREFILL_FUZZ=ON, a build
# directory of their own) and runs each for a fixed time on a seed corpus made by the
# real encoders (fuzz_seed_gen). Fails on any crash, sanitizer report or invariant
# violation; the reproducer is left in the artifacts folder.
#
#   launch/fuzz.sh [--seconds N] [--build-dir DIR] [--target NAME]... [--jobs J]
#
#   --seconds N     run time of each target (default 60; >= 600 for a long campaign)
#   --build-dir DIR the clang build (default: BUILD_DIR-fuzz, i.e. build-fuzz)
#   --target NAME   frame_fuzz | safetensors_fuzz | sparse_config_fuzz (repeatable; default all)
#   --jobs J        targets run at once (default 2: CI has 2 cores)
# The corpus grows in DIR/corpus/NAME across runs; DIR/fuzz-logs/NAME.log has libFuzzer's
# output. Prints one line per target: "NAME: E execs (R/s), C corpus inputs, ok".
set -euo pipefail
LOG_TAG=fuzz
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SECONDS_EACH=60
FUZZ_BUILD=""
TARGETS=()
PAR=2
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_EACH="$2"; shift ;;
    --build-dir) FUZZ_BUILD="$(realpath -m "$2")"; shift ;;
    --target) TARGETS+=("$2"); shift ;;
    --jobs) PAR="$2"; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see launch/fuzz.sh --help)" ;;
  esac
  shift
done
[[ "$SECONDS_EACH" =~ ^[0-9]+$ ]] && [ "$SECONDS_EACH" -ge 1 ] || die "--seconds expects a positive integer"
[[ "$PAR" =~ ^[0-9]+$ ]] && [ "$PAR" -ge 1 ] || die "--jobs expects a positive integer"
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(frame_fuzz safetensors_fuzz sparse_config_fuzz)
for t in "${TARGETS[@]}"; do
  case "$t" in frame_fuzz|safetensors_fuzz|sparse_config_fuzz) ;; *) die "unknown target '$t'" ;; esac
done
[ -n "$FUZZ_BUILD" ] || FUZZ_BUILD="${BUILD_DIR}-fuzz"

CLANGXX="${MPREFILL_CLANGXX:-$(command -v clang++ || true)}"
CLANG="${MPREFILL_CLANG:-$(command -v clang || true)}"
[ -n "$CLANGXX" ] && [ -n "$CLANG" ] ||
  die "clang/clang++ not found (Debian: clang libclang-rt-14-dev; launch/setup.sh installs them)"

T0=$(now_s)
# ---- build (incremental after the first run)
if [ ! -f "$FUZZ_BUILD/build.ninja" ]; then
  mkdir -p "$FUZZ_BUILD"
  log "configuring $FUZZ_BUILD (clang, MPREFILL_FUZZ=ON)"
  cmake -S "$ROOT" -B "$FUZZ_BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_COMPILER="$CLANG" -DCMAKE_CXX_COMPILER="$CLANGXX" -DMPREFILL_CUDA=OFF \
    -DMPREFILL_BUILD_TESTS=OFF -DMPREFILL_FUZZ=ON >"$FUZZ_BUILD/configure.log" 2>&1 ||
    { cat "$FUZZ_BUILD/configure.log"; die "configure failed (log above)"; }
fi
log "building ${TARGETS[*]} fuzz_seed_gen"
ninja -C "$FUZZ_BUILD" -j "$(jobs_n)" "${TARGETS[@]}" fuzz_seed_gen >"$FUZZ_BUILD/fuzz-build.log" 2>&1 ||
  { tail -n 60 "$FUZZ_BUILD/fuzz-build.log"; die "build failed (see $FUZZ_BUILD/fuzz-build.log)"; }
T_BUILD=$(elapsed "$T0")

# ---- seeds from the real encoders
SEEDS="$FUZZ_BUILD/seeds"
rm -rf "$SEEDS"
"$FUZZ_BUILD/bin/fuzz_seed_gen" "$SEEDS/frame_fuzz" "$SEEDS/safetensors_fuzz"
# The sparse configs: the committed MInference files and the README's inline examples.
mkdir -p "$SEEDS/sparse_config_fuzz"
cp "$ROOT"/configs/minference/*.json "$SEEDS/sparse_config_fuzz/"
printf '[{"0": ["vertical_and_slash", 1000, 6096, 0.5]}]' >"$SEEDS/sparse_config_fuzz/vs.json"
printf '[{"0": ["block_sparse", 100, 0, 0.5], "1": ["a_shape", 64, 1024, 0.1]}]' \
  >"$SEEDS/sparse_config_fuzz/mixed.json"
LOGS="$FUZZ_BUILD/fuzz-logs"
ART="$FUZZ_BUILD/artifacts"
mkdir -p "$LOGS" "$ART"

# ---- campaigns
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
# One thread: parallel_for would start threads for every tensor read (10x fewer execs).
export MPREFILL_THREADS=1
run_one() {  # $1 target
  local t=$1 corpus="$FUZZ_BUILD/corpus/$1"
  mkdir -p "$corpus" "$ART/$t"
  # -max_len: frames up to 64 KiB and headers with many tensors; -rss_limit_mb: a
  # frame length prefix must never make the parser allocate the announced size upfront.
  "$FUZZ_BUILD/bin/$t" "$corpus" "$SEEDS/$t" -max_total_time="$SECONDS_EACH" \
    -max_len=65536 -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 \
    -artifact_prefix="$ART/$t/" >"$LOGS/$t.log" 2>&1
}
pids=() status=0
declare -A PID_OF
for t in "${TARGETS[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$PAR" ]; do sleep 1; done
  log "running $t for $SECONDS_EACH s"
  run_one "$t" &
  PID_OF[$t]=$!
done
for t in "${TARGETS[@]}"; do
  rc=0
  wait "${PID_OF[$t]}" || rc=$?
  execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$LOGS/$t.log" | grep -oE '[0-9]+$' || echo 0)
  rate=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$LOGS/$t.log" | grep -oE '[0-9]+$' || echo 0)
  inputs=$(find "$FUZZ_BUILD/corpus/$t" -type f | wc -l)
  if [ $rc = 0 ] && ! grep -qE 'ERROR: (AddressSanitizer|libFuzzer)|runtime error:|invariant violated' "$LOGS/$t.log"; then
    echo "$t: $execs execs ($rate/s), $inputs corpus inputs, ok"
  else
    echo "$t: FAILED (exit $rc) after $execs execs; log $LOGS/$t.log, reproducer in $ART/$t/"
    grep -E 'ERROR:|runtime error:|invariant violated|SUMMARY' "$LOGS/$t.log" | head -n 20 | sed 's/^/  /'
    status=1
  fi
done
log "wall time $(elapsed "$T0") s (build ${T_BUILD} s, ${SECONDS_EACH} s per target)"
exit $status
