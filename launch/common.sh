# Shared bits of the launch scripts (sourced, not run).
# Sets ROOT (repository root), DEPS (project-local dependency folder), BUILD_DIR.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPS="${MPREFILL_DEPS_DIR:-$ROOT/.deps}"
BUILD_DIR="${MPREFILL_BUILD_DIR:-$ROOT/build}"

# Debian packages the project builds and runs with.
APT_PACKAGES=(g++ cmake ninja-build pkg-config openmpi-bin libopenmpi-dev libboost-dev
  libprotobuf-dev protobuf-compiler nlohmann-json3-dev libgtest-dev libgmock-dev
  python3-protobuf libssl-dev
  clang libclang-rt-14-dev)  # libFuzzer campaigns (launch/fuzz.sh, issue 7)

# PyPI: CUTLASS / CuTe headers (only cutlass_library/source/include is used).
CUTLASS_PKG="nvidia-cutlass==4.2.0.0"
CUTLASS_WHEEL_GLOB="nvidia_cutlass-4.2.0.0-*.whl"
CUTLASS_INCLUDE="$DEPS/cutlass/cutlass_library/source/include"

log() { printf '%s: %s\n' "${LOG_TAG:-mprefill}" "$*"; }
die() { printf '%s: error: %s\n' "${LOG_TAG:-mprefill}" "$*" >&2; exit 1; }

now_s() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now_s)" 'BEGIN { printf "%.1f", b - a }'; }

jobs_n() { nproc 2>/dev/null || echo 2; }

nvcc_path() {
  if command -v nvcc >/dev/null 2>&1; then command -v nvcc
  elif [ -x /usr/local/cuda/bin/nvcc ]; then echo /usr/local/cuda/bin/nvcc
  fi
}

# True when a CUDA device is visible (nvidia-smi lists one).
have_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '
}

# Header locations that work offline: the system's or the carried .deps copies.
have_nlohmann() {
  [ -f /usr/include/nlohmann/json.hpp ] || [ -f "$DEPS/include/nlohmann/json.hpp" ]
}
have_gtest() {
  [ -f /usr/src/googletest/CMakeLists.txt ] ||
    compgen -G "/usr/lib/*/cmake/GTest/GTestConfig.cmake" >/dev/null ||
    compgen -G "/usr/lib*/cmake/GTest/GTestConfig.cmake" >/dev/null ||
    compgen -G "/usr/local/lib*/cmake/GTest/GTestConfig.cmake" >/dev/null
}
have_cutlass() { [ -f "$CUTLASS_INCLUDE/cute/tensor.hpp" ]; }
