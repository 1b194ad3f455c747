// Block-wide exclusive prefix sums of uint32 (blockDim.x a multiple of 32, <= 1024).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace mprefill::cuda::index::detail {

// Returns the exclusive prefix of v over the block's threads (thread order) and the
// block total in *total. `scratch` is 32 words of shared memory. All threads must call.
__device__ __forceinline__ uint32_t block_excl_scan(uint32_t v, uint32_t* scratch,
                                                    uint32_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  uint32_t incl = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const uint32_t n = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += n;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    uint32_t w = lane < nwarps ? scratch[lane] : 0u;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const uint32_t n = __shfl_up_sync(0xffffffffu, w, off);
      if (lane >= off) w += n;
    }
    scratch[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const uint32_t excl = incl - v + (warp > 0 ? scratch[warp - 1] : 0u);
  *total = scratch[nwarps - 1];
  __syncthreads();
  return excl;
}

}  // namespace mprefill::cuda::index::detail
