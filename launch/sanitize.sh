#!/usr/bin/env bash
# Sanitizer runs of the service (issue 7), CPU only, in build directories of their own:
#
#   launch/sanitize.sh asan|tsan [--build-dir DIR] [--clang] [--quick]
#
#   asan   ASan + UBSan (-DMPREFILL_SANITIZE=address,undefined): the wire / coordinator /
#          decoder / handoff unit tests, the service end-to-end tests and the hardening
#          tests (bad input, security, faults, load) with every binary they start
#          (coordinator, mpirun worker group, decoder, CLI) instrumented.
#   tsan   TSan (-DMPREFILL_SANITIZE=thread): the coordinator and wire unit tests, the
#          bad-input tests against the coordinator binary, and 8 concurrent clients
#          (Load.EightConcurrentClients) through the whole instrumented service.
#   --build-dir DIR  default: BUILD_DIR-asan / BUILD_DIR-tsan
#   --clang          build with clang/clang++ (default: the system c++, gcc)
#   --quick          asan: skip the service end-to-end suite (stories15M runs)
# Sanitizer reports of every process go to DIR/san-logs/<tool>.<pid>; the run fails when
# a test fails or any report was written. Prints the build and test times.
# Everything is instrumented here (engine and kernels too: ~15 min of build on 2 cores).
# CI's default run (launch/test.sh) has a bounded stage of its own instead: the service's
# code instrumented in the main build directory (targets sanitize-asan / sanitize-tsan,
# ctest -L sanitize; tests/hardening/CMakeLists.txt).
set -euo pipefail
LOG_TAG=sanitize
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODE="${1:-}"
case "$MODE" in asan|tsan) shift ;; -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
  *) die "usage: launch/sanitize.sh asan|tsan [--build-dir DIR] [--clang] [--quick]" ;; esac
SAN_BUILD=""
CLANG=0
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) SAN_BUILD="$(realpath -m "$2")"; shift ;;
    --clang) CLANG=1 ;;
    --quick) QUICK=1 ;;
    *) die "unknown argument '$1' (see launch/sanitize.sh --help)" ;;
  esac
  shift
done
[ -n "$SAN_BUILD" ] || SAN_BUILD="${BUILD_DIR}-$MODE"
if [ $MODE = asan ]; then SAN=address,undefined; else SAN=thread; fi

CMAKE_ARGS=(-G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMPREFILL_CUDA=OFF -DMPREFILL_SANITIZE=$SAN)
if [ $CLANG = 1 ]; then
  command -v clang++ >/dev/null || die "--clang: clang++ not found"
  CMAKE_ARGS+=(-DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++)
fi

T0=$(now_s)
if [ ! -f "$SAN_BUILD/build.ninja" ]; then
  mkdir -p "$SAN_BUILD"
  log "configuring $SAN_BUILD ($SAN)"
  cmake -S "$ROOT" -B "$SAN_BUILD" "${CMAKE_ARGS[@]}" >"$SAN_BUILD/configure.log" 2>&1 ||
    { cat "$SAN_BUILD/configure.log"; die "configure failed"; }
fi
SERVICE_BINS=(mprefill mprefill-coordinator mprefill-worker mprefill-decoder)
if [ $MODE = asan ]; then
  TESTS=(wire_test coordinator_test decoder_test handoff_test hardening_bad_input_test
         hardening_security_test hardening_fault_test hardening_load_test)
  [ $QUICK = 1 ] || TESTS+=(service_e2e_test)
else
  TESTS=(wire_test coordinator_test hardening_bad_input_test hardening_load_test)
fi
log "building ${SERVICE_BINS[*]} ${TESTS[*]}"
ninja -C "$SAN_BUILD" -j "$(jobs_n)" "${SERVICE_BINS[@]}" "${TESTS[@]}" >"$SAN_BUILD/san-build.log" 2>&1 ||
  { tail -n 60 "$SAN_BUILD/san-build.log"; die "build failed (see $SAN_BUILD/san-build.log)"; }
T_BUILD=$(elapsed "$T0")

SANLOG="$SAN_BUILD/san-logs"
rm -rf "$SANLOG"
mkdir -p "$SANLOG"
SUPP="$ROOT/tests/hardening/sanitizer"
# Reports go to files (child processes too); OpenMPI's own allocations at exit are not
# ours (lsan.supp), nor are races inside its progress threads (tsan.supp).
export ASAN_OPTIONS="log_path=$SANLOG/asan:detect_leaks=1:abort_on_error=0:halt_on_error=1"
export LSAN_OPTIONS="suppressions=$SUPP/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="log_path=$SANLOG/ubsan:print_stacktrace=1:halt_on_error=0"
export TSAN_OPTIONS="log_path=$SANLOG/tsan:suppressions=$SUPP/tsan.supp:halt_on_error=0:second_deadlock_stack=1"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
# OpenMPI's memory hooks fight the sanitizers' allocators.
export OMPI_MCA_memory=^patcher
# Bounds sized for instrumented code (2-15x slower than a release build).
export MPREFILL_THREADS=1
# The hardening tests print VmRSS but do not bound it (sanitizer shadow memory grows).
export MPREFILL_SANITIZER_RUN=1

status=0
T1=$(now_s)
for t in "${TESTS[@]}"; do
  filter="*"
  [ $MODE = tsan ] && [ $t = hardening_load_test ] && filter="Load.EightConcurrentClients"
  log "running $t ($filter)"
  rc=0
  "$SAN_BUILD/bin/$t" --gtest_filter="$filter" --gtest_brief=1 >"$SANLOG/$t.out" 2>&1 || rc=$?
  tail -n 3 "$SANLOG/$t.out" | sed 's/^/  /'
  if [ $rc != 0 ]; then
    log "FAILED: $t (exit $rc), output in $SANLOG/$t.out"
    grep -E '^\[  FAILED  \]' "$SANLOG/$t.out" | head -n 20 | sed 's/^/  /' || true
    status=1
  fi
done
reports=$(find "$SANLOG" -name 'asan.*' -o -name 'ubsan.*' -o -name 'tsan.*' | sort)
if [ -n "$reports" ]; then
  log "sanitizer reports:"
  for r in $reports; do
    echo "  $r: $(grep -m1 -E 'ERROR|WARNING|runtime error' "$r" || head -n1 "$r")"
  done
  status=1
else
  log "no sanitizer reports"
fi
log "$MODE: build ${T_BUILD} s, tests $(elapsed "$T1") s, total $(elapsed "$T0") s"
exit $status
