// Block-sparse estimation on GPU (kernels/cuda/index/index.h), the CPU's definition:
// mean-pooled 64-token blocks of Q (per query head) and K (per kv head) in fp32 (rows
// summed in order, then times the correctly rounded 1 / rows: the CPU's arithmetic),
// block scores scale * qpool[b] . kpool[j] for j <= b, top-k with the diagonal forced in
// and ties to the lower block.
//
// One CTA per (query block, head): the b + 1 scores live in shared memory as top-k keys
// (score_key; the dot in the CPU's order and rounding), a 4-round radix select in shared memory
// finds the k-th key, and an ordered compaction writes the chosen blocks ascending, then -1
// padding. Every CTA reads the kv head's pooled keys up to its block from L2: O(nblocks^2 *
// head_dim) traffic per head, fine at 128K, slow (milliseconds per head) at 1M.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/check.h"
#include "kernels/cuda/index/block_scan.cuh"
#include "kernels/cuda/index/index.h"
#include "kernels/cuda/index/index_common.cuh"

namespace mprefill::cuda::index {
namespace {

using detail::Carve;
using detail::kForcedKey;
using detail::score_key;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 32768;

struct TopkParams {
  int k[kMaxHeadsPerCall];
};

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// out[h][b][i] = mean over the rows of block b of x[r][h][i].
template <typename T>
// out_nb: blocks per head in out (nb, or the global block count when out points at a
// shard's first block of a global pooled array).
__global__ void pool_kernel(const T* x, int64_t row_stride, int64_t head_stride, int64_t n, int d,
                            int64_t out_nb, float* out) {
  const int b = blockIdx.x, h = blockIdx.y;
  const int64_t r0 = static_cast<int64_t>(b) * kBlock, r1 = min(n, r0 + kBlock);
  const float inv = __frcp_rn(static_cast<float>(r1 - r0));
  float* o = out + (static_cast<int64_t>(h) * out_nb + b) * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float s = 0.f;
    for (int64_t r = r0; r < r1; ++r)
      s = __fadd_rn(s, to_f32(x[r * row_stride + h * head_stride + i]));
    o[i] = __fmul_rn(s, inv);
  }
}

// The CPU's fp32 dot (kernels/cpu/dot.h): 8 partial sums, no fused multiply-add, the
// same final pairing, so block scores match the CPU bit for bit.
__device__ __forceinline__ float cpu_order_dot(const float* a, const float* b, int n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int i = 0;
  for (; i + 8 <= n; i += 8) {
#pragma unroll
    for (int t = 0; t < 8; ++t) acc[t] = __fadd_rn(acc[t], __fmul_rn(a[i + t], b[i + t]));
  }
  for (int t = 0; i < n; ++i, ++t) acc[t] = __fadd_rn(acc[t], __fmul_rn(a[i], b[i]));
  return __fadd_rn(__fadd_rn(__fadd_rn(acc[0], acc[4]), __fadd_rn(acc[1], acc[5])),
                   __fadd_rn(__fadd_rn(acc[2], acc[6]), __fadd_rn(acc[3], acc[7])));
}

__global__ void __launch_bounds__(kThreads)
    topk_kernel(const float* qpool, const float* kpool, int nb, int d, int group, float scale,
                TopkParams tp, int* blocks, int k_out) {
  extern __shared__ __align__(16) uint32_t keys[];
  float* qv = reinterpret_cast<float*>(keys + ((nb + 3) & ~3));
  __shared__ uint32_t hist[256];
  __shared__ uint32_t scratch[32];
  __shared__ uint32_t s_prefix, s_kk;
  const int qb = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, lane = tid & 31;
  const int cnt = qb + 1;
  const float* q = qpool + (static_cast<int64_t>(h) * nb + qb) * d;
  for (int i = tid; i < d; i += kThreads) qv[i] = q[i];
  __syncthreads();
  const float* kb = kpool + static_cast<int64_t>(h / group) * nb * d;
  for (int j = tid; j < cnt; j += kThreads) {
    const float* kr = kb + static_cast<int64_t>(j) * d;
    keys[j] = j == qb ? kForcedKey : score_key(__fmul_rn(scale, cpu_order_dot(qv, kr, d)));
  }
  const int take = min(tp.k[h], cnt);
  if (tid == 0) {
    s_prefix = 0u;
    s_kk = static_cast<uint32_t>(take);
  }
  __syncthreads();
  for (int round = 0; round < 4; ++round) {
    const int shift = 24 - 8 * round;
    const uint32_t mask = round == 0 ? 0u : ~0u << (shift + 8);
    hist[tid] = 0;
    __syncthreads();
    const uint32_t prefix = s_prefix;
    for (int base = 0; base < cnt; base += kThreads) {
      const int j = base + tid;
      int bin = 256;
      if (j < cnt && (keys[j] & mask) == prefix) bin = (keys[j] >> shift) & 255;
      const unsigned peers = __match_any_sync(0xffffffffu, bin);
      if (bin < 256 && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
    }
    __syncthreads();
    const int digit = 255 - tid;
    const uint32_t c = hist[digit];
    uint32_t total;
    const uint32_t excl = detail::block_excl_scan(c, scratch, &total);
    const uint32_t kk = s_kk;
    __syncthreads();
    if (c > 0 && excl < kk && kk <= excl + c) {
      s_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
      s_kk = kk - excl;
    }
    __syncthreads();
  }
  const uint32_t T = s_prefix, kk = s_kk;
  const int per = (cnt + kThreads - 1) / kThreads;
  const int j0 = tid * per, j1 = min(cnt, j0 + per);
  uint32_t gt = 0, eq = 0;
  for (int j = j0; j < j1; ++j) {
    gt += keys[j] > T;
    eq += keys[j] == T;
  }
  uint32_t tg, te;
  uint32_t before_gt = detail::block_excl_scan(gt, scratch, &tg);
  uint32_t before_eq = detail::block_excl_scan(eq, scratch, &te);
  int* out = blocks + (static_cast<int64_t>(h) * nb + qb) * k_out;
  for (int j = j0; j < j1; ++j) {
    if (keys[j] > T) {
      out[before_gt + min(before_eq, kk)] = j;
      ++before_gt;
    } else if (keys[j] == T) {
      if (before_eq < kk) out[before_gt + before_eq] = j;
      ++before_eq;
    }
  }
  for (int p = take + tid; p < k_out; p += kThreads) out[p] = -1;
}

size_t smem_bytes(int nb, int d) { return (static_cast<size_t>((nb + 3) & ~3) + d) * 4; }

}  // namespace

size_t block_sparse_estimate_workspace_size(const BlockSparseEstimateParams& p) {
  if (p.seq_len <= 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0) return 256;
  const int64_t nb = num_blocks(p.seq_len);
  Carve c(nullptr);
  c.take<float>(static_cast<size_t>(p.num_heads) * nb * p.head_dim);
  c.take<float>(static_cast<size_t>(p.num_kv_heads) * nb * p.head_dim);
  return c.used;
}

Status block_sparse_estimate(const BlockSparseEstimateParams& p, const int* topk, int* blocks,
                             int k_out, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream) {
  MPREFILL_CHECK_ARG(p.q && p.k && topk && blocks, Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(p.seq_len > 0 && p.num_heads > 0 && p.num_kv_heads > 0 && p.head_dim > 0 &&
                         p.num_heads % p.num_kv_heads == 0,
                     Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(p.num_heads <= kMaxHeadsPerCall, Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(p.q_head_stride >= 0 && p.k_head_stride >= 0 &&
                         (p.seq_len <= 1 || (p.q_row_stride > 0 && p.k_row_stride > 0)),
                     Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(p.scale > 0.f && std::isfinite(p.scale), Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(p.dtype == DType::kBF16 || p.dtype == DType::kF32, Status::kUnsupported);
  MPREFILL_CHECK_ARG(p.head_dim <= 256, Status::kUnsupported);
  const int64_t nb = num_blocks(p.seq_len);
  MPREFILL_CHECK_ARG(nb <= kMaxBlocks, Status::kUnsupported);
  TopkParams tp{};
  int kmax = 0;
  for (int h = 0; h < p.num_heads; ++h) {
    MPREFILL_CHECK_ARG(topk[h] >= 1, Status::kInvalidArgument);
    tp.k[h] = topk[h];
    kmax = std::max(kmax, topk[h]);
  }
  MPREFILL_CHECK_ARG(k_out >= kmax, Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(workspace && workspace_bytes >= block_sparse_estimate_workspace_size(p),
                     Status::kOutOfMemory);
  Carve c(workspace);
  float* qpool = c.take<float>(static_cast<size_t>(p.num_heads) * nb * p.head_dim);
  float* kpool = c.take<float>(static_cast<size_t>(p.num_kv_heads) * nb * p.head_dim);
  const int pool_threads = std::min(256, (p.head_dim + 31) / 32 * 32);
  if (p.dtype == DType::kBF16) {
    pool_kernel<<<dim3(nb, p.num_heads), pool_threads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(p.q), p.q_row_stride, p.q_head_stride, p.seq_len,
        p.head_dim, static_cast<int>(nb), qpool);
    MPREFILL_CUDA_LAUNCH_CHECK("pool_kernel");
    pool_kernel<<<dim3(nb, p.num_kv_heads), pool_threads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(p.k), p.k_row_stride, p.k_head_stride, p.seq_len,
        p.head_dim, static_cast<int>(nb), kpool);
    MPREFILL_CUDA_LAUNCH_CHECK("pool_kernel");
  } else {
    pool_kernel<<<dim3(nb, p.num_heads), pool_threads, 0, stream>>>(
        static_cast<const float*>(p.q), p.q_row_stride, p.q_head_stride, p.seq_len, p.head_dim,
        static_cast<int>(nb), qpool);
    MPREFILL_CUDA_LAUNCH_CHECK("pool_kernel");
    pool_kernel<<<dim3(nb, p.num_kv_heads), pool_threads, 0, stream>>>(
        static_cast<const float*>(p.k), p.k_row_stride, p.k_head_stride, p.seq_len, p.head_dim,
        static_cast<int>(nb), kpool);
    MPREFILL_CUDA_LAUNCH_CHECK("pool_kernel");
  }
  const size_t sm = smem_bytes(static_cast<int>(nb), p.head_dim);
  MPREFILL_CUDA_TRY(cudaFuncSetAttribute(topk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(sm)));
  topk_kernel<<<dim3(nb, p.num_heads), kThreads, sm, stream>>>(
      qpool, kpool, static_cast<int>(nb), p.head_dim, p.num_heads / p.num_kv_heads, p.scale, tp,
      blocks, k_out);
  MPREFILL_CUDA_LAUNCH_CHECK("topk_kernel");
  return Status::kOk;
}

Status block_mean_pool(const void* x, int64_t row_stride, int64_t head_stride, int64_t rows,
                       int num_heads, int head_dim, DType dtype, float* out, int64_t out_blocks,
                       cudaStream_t stream) {
  MPREFILL_CHECK_ARG(rows >= 0 && num_heads > 0 && head_dim > 0 && out_blocks >= 0,
                     Status::kInvalidArgument);
  if (rows == 0) return Status::kOk;
  const int64_t nb = num_blocks(rows);
  MPREFILL_CHECK_ARG(
      x && out && nb <= out_blocks && head_stride >= 0 && (rows <= 1 || row_stride > 0),
      Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(dtype == DType::kBF16 || dtype == DType::kF32, Status::kUnsupported);
  MPREFILL_CHECK_ARG(head_dim <= 256 && nb <= kMaxBlocks, Status::kUnsupported);
  const int threads = std::min(256, (head_dim + 31) / 32 * 32);
  const dim3 grid(static_cast<unsigned>(nb), num_heads);
  if (dtype == DType::kBF16)
    pool_kernel<<<grid, threads, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), row_stride,
                                              head_stride, rows, head_dim, out_blocks, out);
  else
    pool_kernel<<<grid, threads, 0, stream>>>(static_cast<const float*>(x), row_stride, head_stride,
                                              rows, head_dim, out_blocks, out);
  MPREFILL_CUDA_LAUNCH_CHECK("pool_kernel");
  return Status::kOk;
}

Status block_sparse_select_pooled(const float* qpool, const float* kpool, int64_t seq_len,
                                  int num_heads, int num_kv_heads, int head_dim, float scale,
                                  const int* topk, int* blocks, int k_out, cudaStream_t stream) {
  MPREFILL_CHECK_ARG(qpool && kpool && topk && blocks, Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(seq_len > 0 && num_heads > 0 && num_kv_heads > 0 && head_dim > 0 &&
                         num_heads % num_kv_heads == 0 && num_heads <= kMaxHeadsPerCall,
                     Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(scale > 0.f && std::isfinite(scale), Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(head_dim <= 256, Status::kUnsupported);
  const int64_t nb = num_blocks(seq_len);
  MPREFILL_CHECK_ARG(nb <= kMaxBlocks, Status::kUnsupported);
  TopkParams tp{};
  int kmax = 0;
  for (int h = 0; h < num_heads; ++h) {
    MPREFILL_CHECK_ARG(topk[h] >= 1, Status::kInvalidArgument);
    tp.k[h] = topk[h];
    kmax = std::max(kmax, topk[h]);
  }
  MPREFILL_CHECK_ARG(k_out >= kmax, Status::kInvalidArgument);
  const size_t sm = smem_bytes(static_cast<int>(nb), head_dim);
  MPREFILL_CUDA_TRY(cudaFuncSetAttribute(topk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(sm)));
  topk_kernel<<<dim3(nb, num_heads), kThreads, sm, stream>>>(qpool, kpool, static_cast<int>(nb),
                                                             head_dim, num_heads / num_kv_heads,
                                                             scale, tp, blocks, k_out);
  MPREFILL_CUDA_LAUNCH_CHECK("topk_kernel");
  return Status::kOk;
}

}  // namespace mprefill::cuda::index
