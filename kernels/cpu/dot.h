// Internal helpers of the CPU attention/estimation kernels (not part of the host API).
#pragma once
#include <cstdint>

namespace mprefill::cpu::detail {

// fp32 dot product with 8 independent partial sums (a fixed summation order, so the
// result is deterministic and the compiler can vectorise it without -ffast-math).
inline float dot(const float* a, const float* b, int n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int t = 0; t < 8; ++t) acc[t] += a[i + t] * b[i + t];
  for (int t = 0; i < n; ++i, ++t) acc[t] += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

}  // namespace mprefill::cpu::detail
