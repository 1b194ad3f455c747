// CUDA backend host API: device queries, layer ops and GEMMs (sm90 build; other
// archs through CMAKE_CUDA_ARCHITECTURES). Callers need no CUDA header beyond
// <cuda_runtime_api.h> (for cudaStream_t); pointers marked "device" are device memory.
//
// Every launcher validates its arguments, enqueues work on `stream` and returns without
// synchronising; it never allocates device memory. A non-kOk Status leaves a message
// in last_error(). Errors of a kernel's execution surface at the caller's next
// synchronising call.
//
// Element types: DType::kF32 and DType::kBF16 (math in fp32); kF16 gives kUnsupported.
// Layouts are row-major with explicit row strides where a caller may pass a view into
// a wider buffer (e.g. the gate and up halves of a fused [n][2 * inter] GEMM output).
// Attention launchers are declared in kernels/cuda/flash/flash.h.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "kernels/sparse.h"
#include "kernels/status.h"
#include "kernels/types.h"

namespace mprefill::cuda {

// ---------------------------------------------------------------- devices
// True when the CUDA runtime reports at least one device (false, never an error,
// when the driver is missing).
bool has_gpu();
int device_count();  // 0 when no device or no driver

struct DeviceInfo {
  std::string name;
  int sm_count = 0;
  int cc_major = 0, cc_minor = 0;
  size_t total_mem = 0;  // bytes
  int l2_bytes = 0;
  size_t smem_optin = 0;  // max dynamic shared memory per block after opt-in, bytes
};
// kNoDevice when `device` does not exist.
Status device_info(int device, DeviceInfo* out);
std::string device_name(int device = 0);  // "" when absent
int sm_count(int device = 0);             // 0 when absent

// Message of the last failing CUDA/cuBLAS call (or argument check) of this thread:
// "<call> at file:line: <error text>"; "" when none.
std::string last_error();

// ---------------------------------------------------------------- layer ops
// y[r][i] = x[r][i] / sqrt(mean_i(x[r][i]^2) + eps) * w[i], r < n, i < dim.
// x: [n] rows of x_row_stride elements, y: [n] rows of y_row_stride (y may alias x when
// the dtypes and strides agree), w: [dim].
Status rmsnorm(const void* x, DType x_dtype, int64_t x_row_stride, const void* w, DType w_dtype,
               void* y, DType y_dtype, int64_t y_row_stride, int64_t n, int64_t dim, float eps,
               cudaStream_t stream);

// In-place RoPE on x[t][h][d] (t < n_tokens, h < num_heads, d < head_dim, even):
// element at x[t * row_stride + h * head_stride + d]. Token t is at position
// positions[t] (device int64, [n_tokens]) or, when positions is null, pos0 + t.
// Pair i (< head_dim/2) rotates by angle = double(pos) * inv_freq[i] (device double
// array of head_dim/2, see rope_inv_freq), cos/sin evaluated in double and rounded to
// float, rotation in fp32. kRotateHalf pairs (i, i + d/2); kAdjacentPairs (2i, 2i + 1).
// For a fused QKV row, q and k heads sit side by side: pass num_heads = nq + nkv.
Status rope(void* x, DType dtype, int64_t n_tokens, int num_heads, int head_dim, int64_t row_stride,
            int64_t head_stride, const int64_t* positions, int64_t pos0, const double* inv_freq,
            RopeStyle style, cudaStream_t stream);

// out[r][i] = silu(gate[r][i]) * up[r][i], r < n, i < dim; gate and up share
// in_row_stride and dtype. silu(g) = g / (1 + exp(-g)).
Status swiglu(const void* gate, const void* up, DType in_dtype, int64_t in_row_stride, void* out,
              DType out_dtype, int64_t out_row_stride, int64_t n, int64_t dim, cudaStream_t stream);

// out[t][:] = table[ids[t]][:], table [vocab][dim], ids device int32 [n]. Ids outside
// [0, vocab) are the caller's to reject; the kernel writes NaN rows for them.
Status embedding(const void* table, DType table_dtype, int64_t vocab, int64_t dim, const int* ids,
                 int64_t n, void* out, DType out_dtype, cudaStream_t stream);

// x[i] += y[i] for i < n (fp32 sum, rounded to x's dtype).
Status add_inplace(void* x, DType x_dtype, const void* y, DType y_dtype, int64_t n,
                   cudaStream_t stream);

// y[r][j] += bias[j], r < n, j < dim (row stride y_row_stride; bias has y's dtype).
Status add_bias(void* y, DType dtype, int64_t y_row_stride, const void* bias, int64_t n,
                int64_t dim, cudaStream_t stream);

// ---------------------------------------------------------------- GEMM
// y[n][out] = x[n][in] * W^T (+ bias[out]) (+ y when accumulate), W row-major [out][in]
// (the checkpoint layout). fp32 accumulation. Supported:
//   x, W bf16 -> y bf16 or fp32;   x, W fp32 -> y fp32 (true fp32, no TF32).
// bias (optional, [out]) has y's dtype. Leading dimensions are the packed ones
// (in for x and W, out for y). Through cuBLASLt; shapes for which cuBLASLt offers no
// algorithm go through cublasGemmEx (+ add_bias).
//
// A GemmContext holds the library handles and a small cache of chosen algorithms. It is
// not thread-safe: one per host thread (or per stream). Creating it touches the
// current device; the launch path does not allocate device memory or synchronise.
struct GemmContext;
Status gemm_create(GemmContext** ctx);
void gemm_destroy(GemmContext* ctx);
// Workspace the caller provides to gemm_xwt (device memory, 256-byte aligned).
size_t gemm_workspace_size();
// Testing aid: route every call through the cublasGemmEx path.
void gemm_force_fallback(GemmContext* ctx, bool on);

Status gemm_xwt(GemmContext* ctx, const void* x, const void* w, DType in_dtype, const void* bias,
                void* y, DType y_dtype, int64_t n, int64_t in, int64_t out, bool accumulate,
                void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace mprefill::cuda
