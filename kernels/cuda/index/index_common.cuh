// Shared device helpers of the index kernels: order-preserving score keys, workspace
// carving.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mprefill::cuda::index::detail {

// Key of the top-k order: larger key = better. Monotone in the float value; -0 maps
// like +0; NaN maps like -inf (the CPU's rule); forced entries use kForcedKey, the key
// of +inf (so a genuine +inf ties with them and the lower index wins, as on the CPU).
__device__ __forceinline__ uint32_t score_key(float x) {
  if (x != x) x = -__int_as_float(0x7f800000);
  if (x == 0.f) x = 0.f;
  const uint32_t b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
constexpr uint32_t kForcedKey = 0x7f800000u | 0x80000000u;

// Bump allocator over a caller workspace; every piece 256-byte aligned.
struct Carve {
  char* base;
  size_t used = 0;
  explicit Carve(void* p) : base(static_cast<char*>(p)) {}
  template <typename T>
  T* take(size_t count) {
    T* p = reinterpret_cast<T*>(base ? base + used : nullptr);
    used += (count * sizeof(T) + 255) / 256 * 256;
    return p;
  }
};

}  // namespace mprefill::cuda::index::detail
