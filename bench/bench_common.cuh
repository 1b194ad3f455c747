// Pieces shared by the CUDA benchmark binaries: check macros (a benchmark stops at the
// first failing call, exit status 2) and device-side random 16-bit inputs.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/edge_check.h"
#include "kernels/status.h"

// A failing call throws the edge check's StatusError (kernels/edge_check.h: the call,
// rank, device, file:line and the CUDA error text); run_main() turns it into one error line
// and exit status 2.
#define BENCH_CUDA(call) MPREFILL_EDGE_CHECK_CUDA(call, #call)
#define BENCH_OK(call) MPREFILL_EDGE_CHECK(call, #call, ::mprefill::cuda::last_error())

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

// A benchmark's main: body(argc, argv), an exception (a failed check) printed as one
// "error: ..." line with exit status 2.
template <class Body>
int run_main(Body body, int argc, char** argv) {
  try {
    return body(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}

}  // namespace mprefill::bench
