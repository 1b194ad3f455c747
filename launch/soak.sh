#!/usr/bin/env bash
# Soak of the prefill service: coordinator + a 2-rank worker group + decoder on
# random:tiny, 4 clients submitting jobs of 16..504 tokens back to back for N minutes;
# every job must finish DONE and the coordinator's and decoder's VmRSS must stay flat
# (printed every 30 s and at the end). Traffic only to 127.0.0.1.
#
#   launch/soak.sh [--minutes N] [--build-dir DIR]
#
#   --minutes N     soak length (default 10)
#   --build-dir DIR a configured build (default: build/, or MPREFILL_BUILD_DIR); the
#                   needed targets are built first
set -euo pipefail
LOG_TAG=soak
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MINUTES=10
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) MINUTES="$2"; shift ;;
    --build-dir) BUILD_DIR="$(realpath -m "$2")"; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see launch/soak.sh --help)" ;;
  esac
  shift
done
[[ "$MINUTES" =~ ^[0-9]+$ ]] && [ "$MINUTES" -ge 1 ] || die "--minutes expects a positive integer"
[ -f "$BUILD_DIR/build.ninja" ] || die "no configured build in $BUILD_DIR (run launch/setup.sh)"

log "building the service and hardening_load_test in $BUILD_DIR"
ninja -C "$BUILD_DIR" -j "$(jobs_n)" hardening_load_test mprefill mprefill-worker \
  mprefill-decoder mprefill-coordinator >/dev/null
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export MPREFILL_SOAK_SECONDS=$((MINUTES * 60))
log "soaking for $MINUTES min"
T0=$(now_s)
rc=0
"$BUILD_DIR/bin/hardening_load_test" --gtest_filter=Load.Soak --gtest_brief=0 || rc=$?
log "wall time $(elapsed "$T0") s, exit $rc"
exit $rc
