#!/usr/bin/env bash
# Runs setup (install + build), then the test suites through ctest.
#
#   launch/test.sh [--gpu] [--no-sanitize] [--sanitize] [setup options...]
#
#   (default)  CPU suite: ctest -LE 'gpu|sanitize', 2 at a time. GPU tests are not run
#              here: on a machine without a GPU one GPU test binary is run to show that
#              they skip. Then the sanitizer stage (always, CI or not): the target
#              `sanitize` (ASan + UBSan and TSan variants of the service code, -O1, in
#              the same build directory, reusing its other objects) and ctest -L sanitize
#              (tests/hardening/CMakeLists.txt): about 10 min on 2 cores.
#   --no-sanitize  skip the sanitizer stage (quick local runs; CI keeps it).
#   --gpu      GPU suite: ctest -L '^gpu$' (one GPU), one at a time, with MPREFILL_REQUIRE_GPU=1; fails
#              when no GPU is visible or any GPU test is skipped. No sanitizer stage.
#   --sanitize also launch/sanitize.sh asan --quick and tsan: everything instrumented,
#              own build dirs (slow: ~15 min build each on 2 cores).
# Other options go to launch/setup.sh (e.g. --ci, --offline, --build-dir DIR).
# Prints the wall time, then one closing line "tests: N passed, N failed, N skipped".
# A skipped test counts as skipped, never passed (every entry has SKIP_RETURN_CODE 77,
# tests/exit_status.h). A test that skipped for a missing input it names
# ("SKIP-MISSING-FILE: PATH") although PATH exists counts as failed (launch/check_skips.py).
set -euo pipefail
LOG_TAG=test
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

GPU=0
SANITIZE=0
SAN_STAGE=1
SETUP_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --gpu) GPU=1 ;;
    --sanitize) SANITIZE=1 ;;
    --no-sanitize) SAN_STAGE=0 ;;
    --build-dir) SETUP_ARGS+=("$1" "$2"); BUILD_DIR="$(realpath -m "$2")"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) SETUP_ARGS+=("$1") ;;
  esac
  shift
done

T0=$(now_s)
"$ROOT/launch/setup.sh" "${SETUP_ARGS[@]}"
T_SETUP=$(elapsed "$T0")

LOG_DIR="$BUILD_DIR/test-logs"
mkdir -p "$LOG_DIR"
PASSED=0 FAILED=0 SKIPPED=0

source "$ROOT/launch/run_ctest.sh"  # run_ctest LOG_NAME CTEST_ARGS...: adds to the counters

status=0
if [ $GPU = 1 ]; then
  have_gpu || log "warning: nvidia-smi lists no GPU; the GPU tests will fail"
  log "GPU suite: ctest -L ^gpu$ (MPREFILL_REQUIRE_GPU=1)"
  MPREFILL_REQUIRE_GPU=1 run_ctest gpu -L '^gpu$' || status=1  # not gpu2 (2 GPUs: DEVICE.md)
  if [ "$SKIPPED" -gt 0 ]; then
    log "error: $SKIPPED GPU test(s) skipped; every GPU test must run with --gpu"
    status=1
  fi
else
  gpu_bins=$(compgen -G "$BUILD_DIR/bin/gpu_*_test" || true)
  if [ -z "$gpu_bins" ]; then
    log "GPU tests: not built (no CUDA compiler, or MPREFILL_CUDA=OFF)"
  elif have_gpu; then
    log "GPU tests: a GPU is present; run launch/test.sh --gpu to run them (not run now)"
  else
    probe="$BUILD_DIR/bin/gpu_layer_ops_test"
    [ -x "$probe" ] || probe=$(head -n1 <<<"$gpu_bins")
    log "GPU tests: no GPU on this machine, so they skip; shown with $(basename "$probe"):"
    prc=0
    "$probe" --gtest_brief=1 >"$LOG_DIR/gpu-skip.log" 2>&1 || prc=$?
    { grep -m1 -E 'no CUDA device' "$LOG_DIR/gpu-skip.log" || true
      grep -E '^\[ +(PASSED|SKIPPED|FAILED) +\]' "$LOG_DIR/gpu-skip.log" || true; } | sed 's/^/  /'
    if [ $prc != 0 ] && [ $prc != 77 ]; then  # 77: its tests skipped (tests/exit_status.h)
      log "error: $(basename "$probe") failed without a GPU (exit $prc, see $LOG_DIR/gpu-skip.log)"
      status=1
    fi
  fi
  log "CPU suite: ctest -LE 'gpu|sanitize' -j2"
  run_ctest cpu -LE 'gpu|sanitize' -j2 || status=1

  # ---- sanitizer stage (issue 7): instrumented service binaries, then ctest -L sanitize
  if [ $SAN_STAGE = 1 ]; then
    if ! cmake --build "$BUILD_DIR" --target help 2>/dev/null | grep -qE '(^|[ :])sanitize(:|$| )'; then
      log "error: no target 'sanitize' in $BUILD_DIR (proto/ not configured?)"
      FAILED=$((FAILED + 1))
      status=1
    else
      T_SAN=$(now_s)
      log "sanitizer stage: building ASan+UBSan and TSan variants (target sanitize, -O1)"
      if ! cmake --build "$BUILD_DIR" --target sanitize -j "$(jobs_n)" >"$LOG_DIR/sanitize-build.log" 2>&1; then
        tail -n 40 "$LOG_DIR/sanitize-build.log"
        log "error: sanitizer build failed (see $LOG_DIR/sanitize-build.log)"
        FAILED=$((FAILED + 1))
        status=1
      else
        T_SAN_BUILD=$(elapsed "$T_SAN")
        T_SAN_TESTS=$(now_s)
        skipped_before=$SKIPPED
        log "sanitizer stage: ctest -L sanitize -j2 (reports under $BUILD_DIR/san-logs)"
        run_ctest sanitize -L sanitize -j2 || status=1
        if [ "$SKIPPED" -gt "$skipped_before" ]; then
          log "error: sanitizer tests skipped although the variants were built"
          status=1
        fi
        log "sanitizer stage: build ${T_SAN_BUILD} s, tests $(elapsed "$T_SAN_TESTS") s, total $(elapsed "$T_SAN") s"
      fi
    fi
  fi
fi

# ---- full sanitizer builds (issue 7): opt-in, everything instrumented
if [ $SANITIZE = 1 ]; then
  for mode in asan tsan; do
    args=("$mode")
    [ $mode = asan ] && args+=(--quick)
    log "sanitizers: launch/sanitize.sh ${args[*]}"
    if "$ROOT/launch/sanitize.sh" "${args[@]}"; then PASSED=$((PASSED + 1)); else FAILED=$((FAILED + 1)); status=1; fi
  done
fi

T_TESTS=$(awk -v a="$(elapsed "$T0")" -v b="$T_SETUP" 'BEGIN { printf "%.1f", a - b }')
log "wall time $(elapsed "$T0") s (setup + build ${T_SETUP} s, tests ${T_TESTS} s)"
echo "tests: $PASSED passed, $FAILED failed, $SKIPPED skipped"
exit $status
