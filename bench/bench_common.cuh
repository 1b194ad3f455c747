// Pieces shared by the CUDA benchmark binaries: fatal check macros (a benchmark stops at
// the first failing call, exit status 2) and device-side random 16-bit inputs.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/cuda.h"
#include "kernels/status.h"

#define BENCH_CUDA(call)                                                      \
  do {                                                                        \
    const cudaError_t e_ = (call);                                            \
    if (e_ != cudaSuccess) {                                                  \
      std::fprintf(stderr, "error: %s: %s\n", #call, cudaGetErrorString(e_)); \
      std::exit(2);                                                           \
    }                                                                         \
  } while (0)

#define BENCH_OK(call)                                                             \
  do {                                                                             \
    const ::mprefill::Status s_ = (call);                                          \
    if (s_ != ::mprefill::Status::kOk) {                                           \
      std::fprintf(stderr, "error: %s: %s (%s)\n", #call, mprefill::to_string(s_), \
                   mprefill::cuda::last_error().c_str());                          \
      std::exit(2);                                                                \
    }                                                                              \
  } while (0)

namespace mprefill::bench {

// Approximately normal values (sum of 4 hashed uniforms, variance 1; never all zeros) as
// bf16 (round to nearest even) or fp16.
static __global__ void fill_random(uint16_t* x, size_t n, uint64_t seed, bool bf16 = true) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int r = 0; r < 4; ++r) {
      uint64_t z = (i * 4 + r) ^ (seed * 0x9E3779B97F4A7C15ull);
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      z ^= z >> 31;
      s += float(z >> 40) * (1.f / 16777216.f) - 0.5f;
    }
    s *= 1.7320508f;  // variance 4 * 1/12 * 3 = 1
    if (bf16) {
      uint32_t u;
      memcpy(&u, &s, 4);
      u += 0x7fffu + ((u >> 16) & 1u);
      x[i] = uint16_t(u >> 16);
    } else {
      x[i] = __half_as_ushort(__float2half_rn(s));
    }
  }
}

}  // namespace mprefill::bench
