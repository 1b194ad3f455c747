#!/usr/bin/env bash
# Fills .carry/ (git-ignored) for the GPU machine, which has no package registry:
#   .carry/deps.tar.xz  CUTLASS/CuTe headers + nlohmann/json.hpp (setup.sh unpacks it there)
#   .carry/bin/         prebuilt binaries for sm_90a: GPU test binaries and the tools
#   .carry/MANIFEST     what was packed, from which build, when
# See launch/DEVICE.md for the commands to run there.
#
#   launch/device_prepare.sh [--no-binaries] [--no-build] [--build-dir DIR]
#
#   --no-binaries   carry the dependencies only (the device then builds with setup.sh)
#   --no-build      copy binaries from the existing build dir without rebuilding
#   --build-dir DIR build dir of the CUDA build (default build/ or MPREFILL_BUILD_DIR)
set -euo pipefail
LOG_TAG=device_prepare
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

BINARIES=1
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --no-binaries) BINARIES=0 ;;
    --no-build) BUILD=0 ;;
    --build-dir) BUILD_DIR="$(realpath -m "$2")"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

CARRY="$ROOT/.carry"
LIMIT_MB=48  # the device tool carries at most 64 MiB with the working tree
grep -qx '/.carry/' "$ROOT/.git/info/exclude" 2>/dev/null ||
  grep -qx '/.carry/' "$ROOT/.gitignore" 2>/dev/null ||
  die ".carry/ is not git-ignored: add '/.carry/' to .git/info/exclude first"

# Online setup once (downloads the CUTLASS wheel, copies nlohmann) without building.
"$ROOT/launch/setup.sh" --configure-only --build-dir "$BUILD_DIR" --cuda ON >/dev/null
have_cutlass || die "CUTLASS headers missing after setup: $CUTLASS_INCLUDE"
[ -f "$DEPS/include/nlohmann/json.hpp" ] || die "nlohmann/json.hpp missing in $DEPS/include"

rm -rf "$CARRY"
mkdir -p "$CARRY"
tar -cJf "$CARRY/deps.tar.xz" -C "$DEPS" cutlass/cutlass_library/source/include include/nlohmann
log "packed CUTLASS/CuTe + nlohmann headers: .carry/deps.tar.xz ($(du -h "$CARRY/deps.tar.xz" | cut -f1))"

if [ $BINARIES = 1 ]; then
  if [ $BUILD = 1 ]; then
    log "building the full CUDA build (sm_90a, all kernel instances) in ${BUILD_DIR#$ROOT/}"
    "$ROOT/launch/setup.sh" --build-dir "$BUILD_DIR" --cuda ON
  fi
  grep -q '^MPREFILL_CUDA_SUBSET:BOOL=OFF' "$BUILD_DIR/CMakeCache.txt" ||
    log "warning: ${BUILD_DIR#$ROOT/} is a subset build: the GPU tests will miss kernel instances"
  mkdir -p "$CARRY/bin"
  n=0
  for f in "$BUILD_DIR"/bin/gpu_* "$BUILD_DIR"/bin/mprefill*; do
    [ -f "$f" ] && [ -x "$f" ] || continue
    cp "$f" "$CARRY/bin/"
    strip --strip-unneeded "$CARRY/bin/$(basename "$f")" 2>/dev/null || true
    n=$((n + 1))
  done
  [ $n -gt 0 ] || die "no binaries in $BUILD_DIR/bin (build with CUDA first)"
  log "copied $n binaries into .carry/bin: $(cd "$CARRY/bin" && ls | tr '\n' ' ')"
fi

{
  echo "prepared: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
  echo "source: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no commit') (+ working tree)"
  echo "nvcc: $("$(nvcc_path)" --version 2>/dev/null | grep -o 'release [0-9.]*' || echo none)"
  if [ $BINARIES = 1 ]; then
    echo "build: ${BUILD_DIR}: $(grep -o -- '--generate-code=arch=[^ ]*' "$BUILD_DIR/build.ninja" 2>/dev/null | sort -u | tr '\n' ' ')"
  fi
  (cd "$CARRY" && find . -type f ! -name MANIFEST -exec ls -l {} \; | awk '{print $5, $9}')
} >"$CARRY/MANIFEST"

mb=$(du -sm "$CARRY" | cut -f1)
[ "$mb" -le $LIMIT_MB ] || die ".carry is ${mb} MiB, over the ${LIMIT_MB} MiB budget (try --no-binaries)"
log ".carry ready: ${mb} MiB (see .carry/MANIFEST; commands in launch/DEVICE.md)"
