#!/usr/bin/env bash
# Installs what mprefill needs, then configures and builds it. Idempotent: a second
# run with nothing changed does no installs and an incremental (no-op) build.
#
#   launch/setup.sh [--ci] [--offline] [--configure-only] [--build-dir DIR]
#                   [--cuda AUTO|ON|OFF] [--target T]... [-- EXTRA_CMAKE_ARGS...]
#
#   --ci              build only the CUDA kernel subset (also when CI=true)
#   --offline         no apt-get / pip (also MPREFILL_OFFLINE=1); use what is installed
#                     plus the carried .deps/ (CUTLASS headers, nlohmann/json.hpp)
#   --configure-only  stop after cmake's configure step
#   --build-dir DIR   default: build/ (or MPREFILL_BUILD_DIR)
#   --cuda MODE       MPREFILL_CUDA (default AUTO: built when nvcc is found)
#   --target T        build only target T (repeatable; default: everything)
#
# Steps: (1) Debian packages (apt-get update at most once, stamp .deps/apt.stamp; apt is
# skipped when every package is installed); (2) CUTLASS/CuTe headers from PyPI
# (pip download --no-deps into .deps/wheels, unpacked into .deps/cutlass); (3) offline
# fallback: when apt or pip cannot reach a registry, go on if the files at hand suffice,
# else stop with one line naming what is missing; (4) cmake -G Ninja + build.
set -euo pipefail
LOG_TAG=setup
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CI_MODE=0
[ "${CI:-}" = "true" ] && CI_MODE=1
OFFLINE=0
[ "${MPREFILL_OFFLINE:-0}" = "1" ] && OFFLINE=1
CONFIGURE_ONLY=0
CUDA_MODE="${MPREFILL_CUDA:-AUTO}"
EXTRA_CMAKE=()
TARGETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --ci) CI_MODE=1 ;;
    --offline) OFFLINE=1 ;;
    --configure-only) CONFIGURE_ONLY=1 ;;
    --build-dir) BUILD_DIR="$(realpath -m "$2")"; shift ;;
    --cuda) CUDA_MODE="$2"; shift ;;
    --target) TARGETS+=("$2"); shift ;;
    --) shift; EXTRA_CMAKE=("$@"); break ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see launch/setup.sh --help)" ;;
  esac
  shift
done
case "$CUDA_MODE" in AUTO|ON|OFF) ;; *) die "--cuda must be AUTO, ON or OFF, not '$CUDA_MODE'" ;; esac

T0=$(now_s)
mkdir -p "$DEPS"
cd "$ROOT"

# ---------------------------------------------------------------- (1) Debian packages
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

missing_pkgs=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${APT_PACKAGES[@]}"; do pkg_installed "$p" || missing_pkgs+=("$p"); done
else
  missing_pkgs=("${APT_PACKAGES[@]}")  # not Debian-like: rely on the checks in (3)
fi

apt_ok=1
if [ ${#missing_pkgs[@]} -eq 0 ]; then
  log "apt: all ${#APT_PACKAGES[@]} packages installed (skipped)"
elif [ $OFFLINE = 1 ]; then
  log "apt: offline, not installing: ${missing_pkgs[*]}"
  apt_ok=0
elif ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
  log "apt: cannot install (no apt-get or not root): ${missing_pkgs[*]}"
  apt_ok=0
else
  log "apt: installing ${missing_pkgs[*]}"
  apt_opts=(-o Acquire::Retries=0 -o Acquire::http::Timeout=20 -o Acquire::https::Timeout=20)
  apt_install() {
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get "${apt_opts[@]}" install -y -q \
      --no-install-recommends "${missing_pkgs[@]}" >"$DEPS/apt.log" 2>&1
  }
  apt_update() {
    timeout 300 apt-get "${apt_opts[@]}" update -q >"$DEPS/apt.log" 2>&1 && touch "$DEPS/apt.stamp"
  }
  if [ ! -f "$DEPS/apt.stamp" ]; then
    apt_update || { log "apt: 'apt-get update' failed (offline?), see $DEPS/apt.log"; apt_ok=0; }
  fi
  if [ $apt_ok = 1 ] && ! apt_install; then
    # A stale package list is the usual cause: refresh once and retry.
    if apt_update && apt_install; then :; else
      log "apt: install failed (offline?), see $DEPS/apt.log"
      apt_ok=0
    fi
  fi
  [ $apt_ok = 1 ] && log "apt: installed ${missing_pkgs[*]}"
fi

# Carried dependencies (launch/device_prepare.sh) fill what is missing, with no network.
CARRIED="$ROOT/.carry/deps.tar.xz"
if [ -f "$CARRIED" ] && { ! have_cutlass || ! have_nlohmann; }; then
  tar -xJf "$CARRIED" -C "$DEPS"
  log "deps: unpacked ${CARRIED#$ROOT/} into ${DEPS#$ROOT/}"
fi

# ---------------------------------------------------------------- (2) PyPI: CUTLASS headers
unpack_cutlass() {  # $1 = wheel
  rm -rf "$DEPS/cutlass.tmp"
  python3 - "$1" "$DEPS/cutlass.tmp" <<'EOF'
import sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
prefix = "cutlass_library/source/include/"
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
    if not names:
        sys.exit(f"{whl}: no {prefix} in the wheel")
    z.extractall(dest, names)
EOF
  rm -rf "$DEPS/cutlass" && mv "$DEPS/cutlass.tmp" "$DEPS/cutlass"
}

if have_cutlass; then
  log "pypi: CUTLASS/CuTe headers present (${CUTLASS_INCLUDE#$ROOT/}) (skipped)"
else
  wheel=$(compgen -G "$DEPS/wheels/$CUTLASS_WHEEL_GLOB" | head -n1 || true)
  if [ -z "$wheel" ] && [ $OFFLINE = 0 ] && command -v python3 >/dev/null 2>&1; then
    log "pypi: downloading $CUTLASS_PKG (--no-deps) into ${DEPS#$ROOT/}/wheels"
    mkdir -p "$DEPS/wheels"
    if timeout 600 python3 -m pip download -q --no-deps --disable-pip-version-check \
        --timeout 20 --retries 1 -d "$DEPS/wheels" "$CUTLASS_PKG" >"$DEPS/pip.log" 2>&1; then
      wheel=$(compgen -G "$DEPS/wheels/$CUTLASS_WHEEL_GLOB" | head -n1 || true)
    else
      log "pypi: download failed (offline?), see $DEPS/pip.log"
    fi
  fi
  if [ -n "$wheel" ]; then
    unpack_cutlass "$wheel"
    log "pypi: unpacked CUTLASS/CuTe headers from $(basename "$wheel")"
  fi
fi

# Keep .deps self-sufficient for offline machines (launch/device_prepare.sh carries it).
if [ -f /usr/include/nlohmann/json.hpp ] && [ ! -f "$DEPS/include/nlohmann/json.hpp" ]; then
  mkdir -p "$DEPS/include" && cp -r /usr/include/nlohmann "$DEPS/include/"
  log "deps: copied nlohmann/json.hpp into ${DEPS#$ROOT/}/include"
fi

# ---------------------------------------------------------------- (3) what the build needs
NVCC=$(nvcc_path || true)
want_cuda=0
if [ "$CUDA_MODE" = ON ] || { [ "$CUDA_MODE" = AUTO ] && [ -n "$NVCC" ]; }; then want_cuda=1; fi
missing=()
command -v cmake >/dev/null 2>&1 || missing+=("cmake")
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || missing+=("a C++ compiler (g++)")
have_nlohmann || missing+=("nlohmann/json.hpp (Debian nlohmann-json3-dev, or carried .deps/include)")
have_gtest || missing+=("GoogleTest (Debian libgtest-dev, or sources in /usr/src/googletest)")
if [ $want_cuda = 1 ]; then
  [ -n "$NVCC" ] || missing+=("nvcc (MPREFILL_CUDA=ON; install the CUDA toolkit or use --cuda OFF)")
  have_cutlass || missing+=("CUTLASS/CuTe headers ($CUTLASS_PKG: ${CUTLASS_INCLUDE#$ROOT/}, or carried .deps/cutlass)")
fi
if [ ${#missing[@]} -gt 0 ]; then
  die "missing: $(IFS=';'; echo "${missing[*]}") -- run launch/setup.sh online once, or carry .deps/ (launch/device_prepare.sh)"
fi
if [ $apt_ok = 0 ]; then
  log "offline: continuing with what is installed plus ${DEPS#$ROOT/} (not installed: ${missing_pkgs[*]})"
fi

# ---------------------------------------------------------------- (4) configure + build
GEN=Ninja
command -v ninja >/dev/null 2>&1 || GEN="Unix Makefiles"
SUBSET=OFF
[ $CI_MODE = 1 ] && SUBSET=ON
CMAKE_ARGS=(-DMPREFILL_CUDA="$CUDA_MODE" -DMPREFILL_CUDA_SUBSET=$SUBSET
  -DMPREFILL_DEPS_DIR="$DEPS" -DMPREFILL_CUTLASS_INCLUDE="$CUTLASS_INCLUDE" "${EXTRA_CMAKE[@]}")
ARGS_FILE="$BUILD_DIR/.mprefill-setup-args"
args_now="$GEN|${CMAKE_ARGS[*]}"
if [ -f "$BUILD_DIR/CMakeCache.txt" ] && [ -f "$ARGS_FILE" ] && [ "$(cat "$ARGS_FILE")" = "$args_now" ]; then
  log "configure: ${BUILD_DIR#$ROOT/} already configured with the same options (skipped)"
else
  if [ -f "$BUILD_DIR/CMakeCache.txt" ] && ! grep -q "^CMAKE_GENERATOR:INTERNAL=$GEN\$" "$BUILD_DIR/CMakeCache.txt"; then
    die "${BUILD_DIR} was configured with another generator; remove it or pass --build-dir"
  fi
  log "configure: cmake -S . -B ${BUILD_DIR#$ROOT/} -G $GEN ${CMAKE_ARGS[*]}"
  t=$(now_s)
  cmake -S "$ROOT" -B "$BUILD_DIR" -G "$GEN" "${CMAKE_ARGS[@]}" >"$DEPS/cmake.log" 2>&1 || {
    tail -n 30 "$DEPS/cmake.log" >&2
    die "cmake configure failed (full log: $DEPS/cmake.log)"
  }
  grep -E '^-- mprefill:|CMake Warning' "$DEPS/cmake.log" | sed 's/^/  /' || true
  echo "$args_now" >"$ARGS_FILE"
  log "configure: done in $(elapsed "$t") s"
fi
if [ $CONFIGURE_ONLY = 1 ]; then
  log "done in $(elapsed "$T0") s (configure only)"
  exit 0
fi

J=$(jobs_n)
TARGET_ARGS=()
[ ${#TARGETS[@]} -gt 0 ] && TARGET_ARGS=(--target "${TARGETS[@]}")
log "build: cmake --build ${BUILD_DIR#$ROOT/} -j $J ${TARGET_ARGS[*]}"
t=$(now_s)
build_log="$BUILD_DIR/build.log"
if ! cmake --build "$BUILD_DIR" -j "$J" "${TARGET_ARGS[@]}" >"$build_log" 2>&1; then
  grep -E 'error|Error|FAILED' "$build_log" | head -n 40 >&2 || true
  tail -n 20 "$build_log" >&2
  die "build failed (full log: $build_log)"
fi
if grep -q 'no work to do' "$build_log"; then
  log "build: up to date ($(elapsed "$t") s)"
else
  log "build: $(grep -cE '^\[[0-9]+/[0-9]+\]' "$build_log" || true) steps in $(elapsed "$t") s"
fi
log "done in $(elapsed "$T0") s"
