# run_ctest of launch/test.sh (sourced, not run; tests/selftest/skip_reporting_test.sh
# runs it too). Needs ROOT, BUILD_DIR, LOG_DIR, log() (launch/common.sh) and the counters
# PASSED, FAILED, SKIPPED.
#
# Runs ctest with the given arguments, teeing its output; adds to the counters.
# ctest prints "NN% tests passed, F tests failed out of T" (CMake 4 prints "100% tests
# passed out of T" when none failed) and lists "(Skipped)" tests. Its JUnit report
# (every test's output) goes to check_skips.py: each skip for a file that exists moves
# from skipped to failed.
run_ctest() {  # $1 = log name, rest = ctest args
  local name=$1; shift
  local out="$LOG_DIR/$name.log" junit="$LOG_DIR/$name.junit.xml" rc=0
  rm -f "$junit"
  ctest --test-dir "$BUILD_DIR" --output-on-failure --no-tests=error --output-junit "$junit" \
    "$@" 2>&1 | tee "$out" || rc=$?
  local line total failed skipped
  line=$(grep -E 'tests passed(, [0-9]+ tests? failed)? out of [0-9]+' "$out" | tail -n1 || true)
  if [ -z "$line" ]; then
    log "ctest ($name) printed no summary (exit $rc)"
    FAILED=$((FAILED + 1))
    return 1
  fi
  total=$(sed -E 's/.* out of ([0-9]+).*/\1/' <<<"$line")
  failed=0
  if grep -qE 'tests? failed' <<<"$line"; then
    failed=$(sed -E 's/.*passed, ([0-9]+) tests? failed.*/\1/' <<<"$line")
  fi
  skipped=$(grep -cE '\(Skipped\)$' "$out" || true)
  local bad="" crc=0 nbad=0 unread=0
  bad=$(python3 "$ROOT/launch/check_skips.py" "$junit") || crc=$?
  if [ $crc = 1 ]; then
    nbad=$(grep -c . <<<"$bad")
    while IFS= read -r l; do log "error: $l"; done <<<"$bad"
  elif [ $crc != 0 ]; then
    log "error: ctest ($name) wrote no readable JUnit report $junit"
    unread=1
  fi
  PASSED=$((PASSED + total - failed - skipped))
  FAILED=$((FAILED + failed + nbad + unread))
  SKIPPED=$((SKIPPED + skipped - nbad))
  [ "$rc" = 0 ] && [ "$failed" = 0 ] && [ "$nbad" = 0 ] && [ "$unread" = 0 ]
}
