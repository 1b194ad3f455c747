#include "engine/cuda/device_init.h"

namespace mprefill::gpu {
namespace {

__device__ inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

__device__ inline float uniform01(uint64_t i, uint64_t seed) {
  return float(mix64(i ^ (seed * 0x9E3779B97F4A7C15ull)) >> 40) * (1.f / 16777216.f);
}

// The bf16 value of element i of a normal fill (a function of (seed, i) only).
__device__ inline uint16_t normal_bf16_at(size_t i, uint64_t seed, float scale) {
  float s = 0.f;
  for (int r = 0; r < 4; ++r) s += uniform01(i * 4 + r, seed) - 0.5f;
  s *= 1.7320508f * scale;  // sum of 4 U(-1/2, 1/2) has variance 1/3
  uint32_t u = __float_as_uint(s);
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return uint16_t(u >> 16);
}

__global__ void normal_bf16_kernel(uint16_t* x, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x)
    x[i] = normal_bf16_at(i, seed, scale);
}

__global__ void normal_bf16_window_kernel(uint16_t* x, size_t rows, size_t cols, size_t src_cols,
                                          size_t src_offset, uint64_t seed, float scale) {
  const size_t n = rows * cols;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    const size_t r = i / cols, c = i - r * cols;
    x[i] = normal_bf16_at(src_offset + r * src_cols + c, seed, scale);
  }
}

__global__ void near_one_kernel(float* x, size_t n, uint64_t seed, float spread) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x)
    x[i] = 1.f + spread * (2.f * uniform01(i, seed) - 1.f);
}

}  // namespace

cudaError_t fill_normal_bf16(uint16_t* x, size_t n, uint64_t seed, float std, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  normal_bf16_kernel<<<4096, 256, 0, stream>>>(x, n, seed, std);
  return cudaGetLastError();
}

cudaError_t fill_normal_bf16_window(uint16_t* x, size_t rows, size_t cols, size_t src_cols,
                                    size_t src_offset, uint64_t seed, float std,
                                    cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  normal_bf16_window_kernel<<<4096, 256, 0, stream>>>(x, rows, cols, src_cols, src_offset, seed,
                                                      std);
  return cudaGetLastError();
}

cudaError_t fill_near_one_f32(float* x, size_t n, uint64_t seed, float spread,
                              cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  near_one_kernel<<<256, 256, 0, stream>>>(x, n, seed, spread);
  return cudaGetLastError();
}

}  // namespace mprefill::gpu
