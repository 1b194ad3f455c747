// Device-side fills for the GPU engine's random weights (no host copy of the values).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace mprefill::gpu {

// x[i] = bf16(std * z_i), z_i approximately standard normal (sum of four hashed
// uniforms), deterministic in (seed, i).
cudaError_t fill_normal_bf16(uint16_t* x, size_t n, uint64_t seed, float std, cudaStream_t stream);
// A strided window of what fill_normal_bf16 writes into a larger [*][src_cols] tensor:
// x[r * cols + c] = value of element src_offset + r * src_cols + c (r < rows, c < cols),
// so a rank of a tensor-parallel split draws exactly its slice of the whole tensor.
cudaError_t fill_normal_bf16_window(uint16_t* x, size_t rows, size_t cols, size_t src_cols,
                                    size_t src_offset, uint64_t seed, float std,
                                    cudaStream_t stream);
// x[i] = 1 + spread * (2 u_i - 1), u_i uniform in [0, 1) (RMSNorm weights near 1).
cudaError_t fill_near_one_f32(float* x, size_t n, uint64_t seed, float spread, cudaStream_t stream);

}  // namespace mprefill::gpu
