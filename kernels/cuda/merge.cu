#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "kernels/cuda/check.h"
#include "kernels/cuda/merge.h"

namespace mprefill::cuda {
namespace {

template <class T>
__device__ inline float load(const T* p);
template <>
__device__ inline float load<float>(const float* p) {
  return *p;
}
template <>
__device__ inline float load<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
template <>
__device__ inline float load<__half>(const __half* p) {
  return __half2float(*p);
}

// One warp per (row, head) item, lanes stride over head_dim (coalesced rows); kWarps
// items per block.
constexpr int kWarps = 8;

__device__ inline bool item_of(int64_t n, int heads, int* row, int* h) {
  const int64_t item = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (item >= n * heads) return false;
  *row = static_cast<int>(item / heads);
  *h = static_cast<int>(item - int64_t(*row) * heads);
  return true;
}

template <class TB>
__global__ void merge_kernel(MergeStatesParams p) {
  int row, h;
  if (!item_of(p.n, p.num_heads, &row, &h)) return;
  const int lane = threadIdx.x & 31;
  const float la = p.lse_a[h * p.lse_a_head_stride + row];
  const float lb = p.lse_b[h * p.lse_b_head_stride + row];
  const float m = fmaxf(la, lb);
  float wa = 0.f, wb = 0.f, inv = 0.f;
  if (m != -INFINITY) {
    wa = expf(la - m);  // exp(-inf) = 0
    wb = expf(lb - m);
    inv = 1.f / (wa + wb);
  }
  float* oa = p.o_a + row * p.a_row_stride + h * p.a_head_stride;
  const TB* ob = static_cast<const TB*>(p.o_b) + row * p.b_row_stride + h * p.b_head_stride;
  uint16_t* out =
      p.out_bf16 ? p.out_bf16 + row * p.out_row_stride + h * p.out_head_stride : nullptr;
  for (int d = lane; d < p.head_dim; d += 32) {
    // A side of weight 0 is never multiplied (its o may be anything).
    const float a = wa > 0.f ? wa * oa[d] : 0.f;
    const float b = wb > 0.f ? wb * load<TB>(ob + d) : 0.f;
    const float o = (a + b) * inv;
    oa[d] = o;
    if (out) {
      const __nv_bfloat16 v = __float2bfloat16_rn(o);
      out[d] = *reinterpret_cast<const uint16_t*>(&v);
    }
  }
  __syncwarp();  // every lane has read lse_a
  if (lane == 0)
    p.lse_a[h * p.lse_a_head_stride + row] = m == -INFINITY ? -INFINITY : m + logf(wa + wb);
}

__global__ void reset_kernel(float* o, float* lse, int64_t row_stride, int64_t head_stride,
                             int64_t lse_head_stride, int n, int heads, int head_dim) {
  int row, h;
  if (!item_of(n, heads, &row, &h)) return;
  float* p = o + row * row_stride + h * head_stride;
  for (int d = threadIdx.x & 31; d < head_dim; d += 32) p[d] = 0.f;
  if ((threadIdx.x & 31) == 0) lse[h * lse_head_stride + row] = -INFINITY;
}

unsigned blocks_for(int64_t n, int heads) {
  return static_cast<unsigned>((n * heads + kWarps - 1) / kWarps);
}

}  // namespace

Status merge_attention_states(const MergeStatesParams& p, cudaStream_t stream) {
  MPREFILL_CHECK_ARG(p.o_a && p.lse_a && p.o_b && p.lse_b, Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(p.n >= 0 && p.num_heads > 0 && p.head_dim > 0, Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(p.lse_a_head_stride >= p.n && p.lse_b_head_stride >= p.n,
                     Status::kInvalidArgument);
  if (p.n == 0) return Status::kOk;
  MPREFILL_CHECK_ARG(int64_t(p.n) * p.num_heads / kWarps < (int64_t(1) << 31),
                     Status::kInvalidArgument);
  const unsigned grid = blocks_for(p.n, p.num_heads);
  const int t = 32 * kWarps;
  switch (p.b_dtype) {
    case DType::kBF16:
      merge_kernel<__nv_bfloat16><<<grid, t, 0, stream>>>(p);
      break;
    case DType::kF16:
      merge_kernel<__half><<<grid, t, 0, stream>>>(p);
      break;
    case DType::kF32:
      merge_kernel<float><<<grid, t, 0, stream>>>(p);
      break;
    default:
      MPREFILL_CHECK_ARG(false && "b_dtype", Status::kUnsupported);
  }
  MPREFILL_CUDA_LAUNCH_CHECK("merge_attention_states");
  return Status::kOk;
}

Status reset_attention_state(float* o, float* lse, int64_t row_stride, int64_t head_stride,
                             int64_t lse_head_stride, int n, int num_heads, int head_dim,
                             cudaStream_t stream) {
  MPREFILL_CHECK_ARG(o && lse && n >= 0 && num_heads > 0 && head_dim > 0 && lse_head_stride >= n,
                     Status::kInvalidArgument);
  if (n == 0) return Status::kOk;
  reset_kernel<<<blocks_for(n, num_heads), 32 * kWarps, 0, stream>>>(
      o, lse, row_stride, head_stride, lse_head_stride, n, num_heads, head_dim);
  MPREFILL_CUDA_LAUNCH_CHECK("reset_attention_state");
  return Status::kOk;
}

}  // namespace mprefill::cuda
