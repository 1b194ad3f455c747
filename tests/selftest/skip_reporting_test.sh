#!/usr/bin/env bash
# Self-test of skip reporting (ctest entry selftest_skip_reporting, tests/selftest/):
#
#   skip_reporting_test.sh INNER_DIR SOURCE_DIR
#
# 1. Runs the generated ctest project INNER_DIR, whose entries are named
#    CASE--VERDICT, and fails unless ctest reports every entry as its VERDICT (passed,
#    skipped, failed): a skip under either test main is never "Passed", a failure beside
#    a skip is never "Skipped", a filter that selects nothing is not a pass.
# 2. launch/check_skips.py on that run's JUnit report must name exactly the entries
#    "*_path_exists--*" (skipped for a "missing" path that exists), and must accept a
#    run of the "*_path_missing--*" entry alone.
# 3. launch/test.sh's run_ctest (launch/run_ctest.sh) over some entries must count a
#    skip for a path that exists as failed and the other skips as skipped, and return
#    non-zero only then.
set -u -o pipefail
INNER=${1:?usage: skip_reporting_test.sh INNER_DIR SOURCE_DIR}
SRC=${2:?usage: skip_reporting_test.sh INNER_DIR SOURCE_DIR}
CHECK=$SRC/launch/check_skips.py
[ -f "$INNER/CTestTestfile.cmake" ] || { echo "FAIL: no $INNER/CTestTestfile.cmake"; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The inner mpiruns keep their session directories here, one at a time: Open MPI 4.1's
# mpiruns of one user share /tmp/ompi.HOST.UID, and one starting while another removes
# it fails ("mkdir ... File exists"), as the suite's own entries at ctest -j2 can.
export TMPDIR=$tmp
fail=0
bad() { echo "FAIL: $*"; fail=1; }

# Entries fail on purpose, so ctest's own exit status says nothing here.
ctest --test-dir "$INNER" --output-junit "$tmp/all.xml" >"$tmp/all.log" 2>&1
# "  3/13 Test  #3: mpi_skips--skipped ..........***Skipped   0.51 sec"
re='Test +#[0-9]+: ([A-Za-z0-9_]+)--([a-z]+) [. ]*(\*\*\*)?([A-Za-z]+)'
n=0
while IFS= read -r line; do
  [[ $line =~ $re ]] || continue
  n=$((n + 1))
  name=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]}
  got=$(tr '[:upper:]' '[:lower:]' <<<"${BASH_REMATCH[4]}")
  if [ "$got" = "$want" ]; then echo "ok: $name: $got"; else bad "$name: ctest says $got, want $want"; fi
done <"$tmp/all.log"
total=$(sed -nE 's/.* out of ([0-9]+)$/\1/p' "$tmp/all.log" | tail -n1)
[ "$n" -gt 0 ] && [ "$n" = "${total:-x}" ] ||
  bad "read $n verdicts, ctest ran ${total:-no} tests"
# (Marked, so that an outer run_ctest does not count the inner "(Skipped)" lines.)
[ $fail = 0 ] || { echo "--- inner ctest output:"; sed 's/^/inner| /' "$tmp/all.log"; }

flagged=$(python3 "$CHECK" "$tmp/all.xml")
rc=$?
got=$(sed -E 's/:.*//' <<<"$flagged" | sort | tr '\n' ' ')
want="mpi_path_exists--skipped plain_path_exists--skipped "
if [ $rc = 1 ] && [ "$got" = "$want" ]; then
  echo "ok: check_skips.py flags exactly: $got"
else
  bad "check_skips.py exit $rc, flagged '$got', want exit 1 and '$want'"
fi

ctest --test-dir "$INNER" -R 'path_missing' --output-junit "$tmp/missing.xml" >"$tmp/missing.log" 2>&1
if grep -q '\*\*\*Skipped' "$tmp/missing.log" && python3 "$CHECK" "$tmp/missing.xml"; then
  echo "ok: a skip for a path that does not exist passes check_skips.py"
else
  bad "the path_missing entry: not skipped, or check_skips.py rejected it"
  sed 's/^/inner| /' "$tmp/missing.log"
fi

counts() {  # ctest regex, expected "status passed failed skipped"
  local st=0
  PASSED=0 FAILED=0 SKIPPED=0
  run_ctest "$(tr -c 'a-z\n' _ <<<"$1")" -R "$1" >"$tmp/run_ctest.out" 2>&1 || st=1
  local got="$st $PASSED $FAILED $SKIPPED"
  if [ "$got" = "$2" ]; then echo "ok: run_ctest -R '$1': status/passed/failed/skipped $got"
  else bad "run_ctest -R '$1': status/passed/failed/skipped $got, want $2"; sed 's/^/inner| /' "$tmp/run_ctest.out"; fi
}
(
  LOG_TAG=selftest
  source "$SRC/launch/common.sh"
  ROOT=$SRC BUILD_DIR=$INNER LOG_DIR=$tmp/logs
  mkdir -p "$LOG_DIR"
  source "$SRC/launch/run_ctest.sh"
  counts 'plain_passes|plain_skips|path_' "1 1 2 2"
  counts 'plain_passes|path_missing' "0 1 0 1"
  exit $fail
) || fail=1
exit $fail
