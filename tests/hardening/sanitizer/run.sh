#!/usr/bin/env bash
# One test of CI's sanitizer stage (ctest label "sanitize", tests/hardening/CMakeLists.txt):
#
#   run.sh asan|tsan BIN_DIR LOG_DIR TEST_BINARY [gtest args...]
#
# Runs TEST_BINARY with MPREFILL_BIN_DIR=BIN_DIR, so that the service binaries it starts
# (coordinator, mpirun worker group, decoder) are the instrumented ones in BIN_DIR.
# Every process's sanitizer report goes to LOG_DIR/<tool>.<pid>; the test fails when the
# binary fails or any report was written. Exit 77 (ctest: skipped) when BIN_DIR holds no
# instrumented coordinator (build the target sanitize-asan / sanitize-tsan first), or
# when the test binary exits 77 (a test skipped, none failed).
set -uo pipefail
[ $# -ge 4 ] || { echo "usage: run.sh asan|tsan BIN_DIR LOG_DIR TEST_BINARY [args...]" >&2; exit 2; }
MODE=$1 BIN=$2 LOGS=$3 EXE=$4
shift 4
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ ! -x "$BIN/mprefill-coordinator" ]; then
  echo "sanitize: $BIN/mprefill-coordinator not built (build the target sanitize-$MODE); skipped"
  exit 77
fi
[ -x "$EXE" ] || { echo "sanitize: $EXE not built" >&2; exit 1; }
rm -rf "$LOGS"
mkdir -p "$LOGS"
# OpenMPI's own allocations at exit are not ours (lsan.supp), nor are races inside its
# progress threads (tsan.supp).
# Full (slow) unwinding of allocations: the fast frame-pointer unwinder stops at the
# first uninstrumented library frame, and OpenMPI's allocations at exit could then not be
# matched to it by lsan.supp ("<unknown module>").
export ASAN_OPTIONS="log_path=$LOGS/asan:log_exe_name=1:detect_leaks=1:fast_unwind_on_malloc=0:abort_on_error=0:halt_on_error=1${MPREFILL_ASAN_EXTRA:+:$MPREFILL_ASAN_EXTRA}"
export LSAN_OPTIONS="suppressions=$HERE/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="log_path=$LOGS/ubsan:log_exe_name=1:print_stacktrace=1:halt_on_error=0"
export TSAN_OPTIONS="log_path=$LOGS/tsan:log_exe_name=1:suppressions=$HERE/tsan.supp:halt_on_error=0:second_deadlock_stack=1"
# OpenMPI's memory hooks fight the sanitizers' allocators. Its components stay loaded at
# exit, so that LeakSanitizer names them (lsan.supp) instead of "<unknown module>".
export OMPI_MCA_memory=^patcher OMPI_MCA_mca_base_component_disable_dlclose=1
export MPREFILL_BIN_DIR="$BIN"
# Bounds of the hardening tests sized for instrumented code; VmRSS printed, not bounded.
export MPREFILL_THREADS=1 MPREFILL_SANITIZER_RUN=1
echo "sanitize ($MODE): $EXE $* (service binaries from $BIN)"
rc=0
"$EXE" "$@" || rc=$?
reports=$(find "$LOGS" -type f \( -name 'asan.*' -o -name 'ubsan.*' -o -name 'tsan.*' \) | sort)
if [ -n "$reports" ]; then
  for r in $reports; do
    echo "sanitize: report $r: $(grep -m1 -E 'ERROR|WARNING|runtime error' "$r" || head -n1 "$r")"
    head -n 40 "$r"
  done
  echo "sanitize: FAILED: sanitizer reports above"
  exit 1
fi
# 77: no test failed but some skipped (tests/exit_status.h); ctest reports it skipped.
[ $rc = 77 ] && { echo "sanitize: no sanitizer report, but test(s) skipped"; exit 77; }
[ $rc = 0 ] || { echo "sanitize: FAILED: test exit $rc"; exit $rc; }
echo "sanitize: passed, no sanitizer report"
