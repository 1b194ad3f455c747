// Vertical-slash estimation on GPU, two shard-composable passes (kernels/cuda/index/index.h).
//
// Tiling: a CTA of 4 warps owns one (head, key chunk of kChunk = 1024 local keys); the
// 64 estimation rows are split 16 per warp, keys go 64 per tile through a two-stage
// cp.async pipeline into shared memory, and S = Q K^T of a [64 x 64] tile comes from
// mma.sync m16n8k16 (bf16 in, fp32 accumulate). CTAs are numbered head-fastest so the
// query heads of one kv head read the same key chunk at about the same time (L2 reuse).
// B fragments come from ldmatrix.x4 on the padded key rows (conflict-free).
//   pass 1: per row online (max, sum exp) over the chunk -> [H][nchunks][64] partials,
//           merged by a second kernel (one CTA per row, fixed tree);
//   pass 2: recomputes the tile, p = exp(x - M) / S, stores p in shared memory; column
//           sums go straight to col_score (one CTA owns each column), diagonal sums
//           accumulate in a per-chunk shared array indexed t = (j - j0) + 63 - i, which
//           lands in [H][nchunks][kChunk + 64] partials; a last kernel adds the (at most
//           two) chunks that touch each offset. No [64 x N] matrix reaches memory and all
//           sums have a fixed order (deterministic).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kernels/cuda/check.h"
#include "kernels/cuda/index/index.h"
#include "kernels/cuda/index/index_common.cuh"

namespace mprefill::cuda::index {
namespace {

using detail::Carve;

constexpr int kThreads = 128;
constexpr int kTileN = 64;
constexpr int kChunkTiles = 16;
constexpr int kChunk = kTileN * kChunkTiles;
constexpr int kDiagStride = kChunk + 64;  // t in [0, kChunk + 63)
constexpr int kPStride = kTileN + 4;      // floats per row of the p tile

template <int D>
constexpr int k_stride() {
  return D + 8;  // bf16 per shared row: conflict-free 32-bit fragment loads
}
template <int D>
constexpr size_t smem_bytes(bool pass2) {
  return 2 * kTileN * k_stride<D>() * 2 +
         (pass2 ? (64 * kPStride + kDiagStride) * sizeof(float) : 0);
}

struct EstArgs {
  const __nv_bfloat16* q;
  const __nv_bfloat16* k;
  int64_t q_row_stride, q_head_stride, k_row_stride, k_head_stride;
  int n_last;
  int64_t seq_len;
  int n_k;
  int64_t k_pos0;
  int num_heads, group;
  float scale;
  int nchunks;
};

__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n"); }

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                            const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(a));
}

__device__ __forceinline__ uint32_t pack_q(const EstArgs& a, int h, int row, int col) {
  if (row >= a.n_last) return 0u;
  const __nv_bfloat16* p = a.q + row * a.q_row_stride + h * a.q_head_stride + col;
  const uint32_t lo = __bfloat16_as_ushort(p[0]), hi = __bfloat16_as_ushort(p[1]);
  return lo | (hi << 16);
}

// Common body: loads Q fragments, streams the chunk's key tiles and hands each [64 x 64]
// score tile (fragment form) to `consume(tile, acc)`, and `after(tile)` once all
// threads' consume calls for that tile are done with a barrier in between.
template <int D, typename Consume, typename After>
__device__ __forceinline__ void run_chunk(const EstArgs& a, int h, int chunk, char* smem,
                                          Consume&& consume, After&& after, bool need_after) {
  constexpr int KS = k_stride<D>();
  __nv_bfloat16* ks = reinterpret_cast<__nv_bfloat16*>(smem);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int kvh = h / a.group;
  const int j_begin = chunk * kChunk, j_end = min(a.n_k, j_begin + kChunk);
  const int ntiles = (j_end - j_begin + kTileN - 1) / kTileN;

  uint32_t qa[D / 16][4];
  const int r0 = 16 * warp + g;
#pragma unroll
  for (int s = 0; s < D / 16; ++s) {
    const int col = s * 16 + 2 * t;
    qa[s][0] = pack_q(a, h, r0, col);
    qa[s][1] = pack_q(a, h, r0 + 8, col);
    qa[s][2] = pack_q(a, h, r0, col + 8);
    qa[s][3] = pack_q(a, h, r0 + 8, col + 8);
  }

  const __nv_bfloat16* kbase = a.k + kvh * a.k_head_stride;
  auto load_tile = [&](int tile, int buf) {
    __nv_bfloat16* dst0 = ks + buf * kTileN * KS;
    const int j0 = j_begin + tile * kTileN;
    for (int c = tid; c < kTileN * (D / 8); c += kThreads) {
      const int row = c / (D / 8), seg = c % (D / 8);
      const int j = j0 + row;
      const __nv_bfloat16* src =
          kbase + static_cast<int64_t>(min(j, a.n_k - 1)) * a.k_row_stride + seg * 8;
      cp_async16(dst0 + row * KS + seg * 8, src, j < j_end ? 16 : 0);
    }
  };

  load_tile(0, 0);
  cp_async_commit();
  for (int tile = 0; tile < ntiles; ++tile) {
    cp_async_wait_all();
    __syncthreads();
    if (tile + 1 < ntiles) load_tile(tile + 1, (tile + 1) & 1);
    cp_async_commit();
    const __nv_bfloat16* kt = ks + (tile & 1) * kTileN * KS;
    float acc[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    // ldmatrix.x4: matrices (keys 16np..+7, dims 16s..+7 | +8) and (keys +8, same dims)
    // are the B fragments of key groups 2np and 2np + 1.
    const int lrow = (lane & 7) + ((lane >> 4) << 3), lcol = ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int s = 0; s < D / 16; ++s) {
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b0, b1, b2, b3;
        ldmatrix_x4(b0, b1, b2, b3, kt + (np * 16 + lrow) * KS + s * 16 + lcol);
        mma_bf16(acc[2 * np], qa[s], b0, b1);
        mma_bf16(acc[2 * np + 1], qa[s], b2, b3);
      }
    }
    consume(tile, acc);
    if (need_after) {
      __syncthreads();
      after(tile);
    }
  }
}

// Last local key index row i may see (c <= r), or -1.
__device__ __forceinline__ int row_limit(const EstArgs& a, int i) {
  if (i >= a.n_last) return -1;
  const int64_t r = a.seq_len - a.n_last + i;
  const int64_t lim = r - a.k_pos0 < a.n_k - 1 ? r - a.k_pos0 : static_cast<int64_t>(a.n_k - 1);
  return lim < 0 ? -1 : static_cast<int>(lim);
}

template <int D>
__global__ void __launch_bounds__(kThreads)
    row_stats_kernel(EstArgs a, float* part_max, float* part_sum) {
  extern __shared__ __align__(16) char smem[];
  const int h = blockIdx.x % a.num_heads, chunk = blockIdx.x / a.num_heads;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int rows[2] = {16 * warp + g, 16 * warp + g + 8};
  const int lim[2] = {row_limit(a, rows[0]), row_limit(a, rows[1])};
  const float ninf = -INFINITY;
  float m[2] = {ninf, ninf}, s[2] = {0.f, 0.f};
  const int j_begin = chunk * kChunk;
  run_chunk<D>(
      a, h, chunk, smem,
      [&](int tile, float(&acc)[8][4]) {
        const int j0 = j_begin + tile * kTileN;
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          float x[16];
          float tmax = ninf;
#pragma unroll
          for (int n = 0; n < 8; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int j = j0 + n * 8 + 2 * t + e;
              const float v = j <= lim[rr] ? a.scale * acc[n][2 * rr + e] : ninf;
              x[2 * n + e] = v;
              tmax = fmaxf(tmax, v);
            }
          }
          if (tmax == ninf) continue;
          const float mn = fmaxf(m[rr], tmax);
          float acc_s = s[rr] * __expf(m[rr] - mn);
#pragma unroll
          for (int e = 0; e < 16; ++e) acc_s += __expf(x[e] - mn);
          s[rr] = acc_s;
          m[rr] = mn;
        }
      },
      [](int) {}, false);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      const float om = __shfl_xor_sync(0xffffffffu, m[rr], off);
      const float os = __shfl_xor_sync(0xffffffffu, s[rr], off);
      const float mn = fmaxf(m[rr], om);
      if (mn != ninf) {
        s[rr] = s[rr] * __expf(m[rr] - mn) + os * __expf(om - mn);
        m[rr] = mn;
      }
    }
    if (t == 0) {
      const int64_t o = (static_cast<int64_t>(h) * a.nchunks + chunk) * 64 + rows[rr];
      part_max[o] = m[rr];
      part_sum[o] = s[rr];
    }
  }
}

__device__ __forceinline__ void merge_stat(float& m, float& s, float om, float os) {
  const float mn = fmaxf(m, om);
  if (mn == -INFINITY) return;
  s = s * __expf(m - mn) + os * __expf(om - mn);
  m = mn;
}

// One CTA of kReduceThreads per (head, row): strided merge over the chunks, then a fixed
// tree (deterministic).
constexpr int kReduceThreads = 256;
__global__ void __launch_bounds__(kReduceThreads)
    row_stats_reduce_kernel(const float* part_max, const float* part_sum, int nchunks, int n_last,
                            float* row_max, float* row_sum) {
  __shared__ float sm_m[kReduceThreads / 32], sm_s[kReduceThreads / 32];
  const int idx = blockIdx.x;  // h * n_last + i
  const int h = idx / n_last, i = idx % n_last;
  float m = -INFINITY, s = 0.f;
  for (int c = threadIdx.x; c < nchunks; c += kReduceThreads) {
    const int64_t o = (static_cast<int64_t>(h) * nchunks + c) * 64 + i;
    merge_stat(m, s, part_max[o], part_sum[o]);
  }
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, m, off);
    const float os = __shfl_xor_sync(0xffffffffu, s, off);
    merge_stat(m, s, om, os);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    sm_m[warp] = m;
    sm_s[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    m = sm_m[0];
    s = sm_s[0];
    for (int w = 1; w < kReduceThreads / 32; ++w) merge_stat(m, s, sm_m[w], sm_s[w]);
    row_max[idx] = m;
    row_sum[idx] = s;
  }
}

__global__ void combine_kernel(float* a_max, float* a_sum, const float* b_max, const float* b_sum,
                               int64_t rows) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows) return;
  const float am = a_max[i], bm = b_max[i];
  const float m = fmaxf(am, bm);
  if (m == -INFINITY) return;
  const double s =
      a_sum[i] * exp(static_cast<double>(am) - m) + b_sum[i] * exp(static_cast<double>(bm) - m);
  a_max[i] = m;
  a_sum[i] = static_cast<float>(s);
}

template <int D>
__global__ void __launch_bounds__(kThreads)
    scores_kernel(EstArgs a, const float* row_max, const float* row_sum, float* col_score,
                  float* part_diag) {
  extern __shared__ __align__(16) char smem[];
  float* ps = reinterpret_cast<float*>(smem + 2 * kTileN * k_stride<D>() * 2);
  float* diag = ps + 64 * kPStride;
  const int h = blockIdx.x % a.num_heads, chunk = blockIdx.x / a.num_heads;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int rows[2] = {16 * warp + g, 16 * warp + g + 8};
  int lim[2];
  float mrow[2], inv[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    lim[rr] = row_limit(a, rows[rr]);
    mrow[rr] = 0.f;
    inv[rr] = 0.f;
    if (lim[rr] >= 0) {
      const float m = row_max[h * a.n_last + rows[rr]], s = row_sum[h * a.n_last + rows[rr]];
      if (m == -INFINITY || !(s > 0.f)) {
        lim[rr] = -1;
      } else {
        mrow[rr] = m;
        inv[rr] = 1.f / s;
      }
    }
  }
  for (int i = tid; i < kDiagStride; i += kThreads) diag[i] = 0.f;
  const int j_begin = chunk * kChunk;
  float* cs = col_score + static_cast<int64_t>(h) * a.n_k;
  run_chunk<D>(
      a, h, chunk, smem,
      [&](int tile, float(&acc)[8][4]) {
        const int j0 = j_begin + tile * kTileN;
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          float* prow = ps + rows[rr] * kPStride;
#pragma unroll
          for (int n = 0; n < 8; ++n) {
            float2 v;
            const int c = n * 8 + 2 * t;
            v.x = j0 + c <= lim[rr] ? __expf(a.scale * acc[n][2 * rr] - mrow[rr]) * inv[rr] : 0.f;
            v.y = j0 + c + 1 <= lim[rr] ? __expf(a.scale * acc[n][2 * rr + 1] - mrow[rr]) * inv[rr]
                                        : 0.f;
            *reinterpret_cast<float2*>(prow + c) = v;
          }
        }
      },
      [&](int tile) {
        const int j0 = j_begin + tile * kTileN;
        if (tid < kTileN) {
          float sum = 0.f;
#pragma unroll 8
          for (int i = 0; i < 64; ++i) sum += ps[i * kPStride + tid];
          if (j0 + tid < a.n_k) cs[j0 + tid] += sum;
        }
        if (tid < 127) {
          // diagonal t' = col + 63 - i of this tile
          float sum = 0.f;
#pragma unroll 8
          for (int i = 0; i < 64; ++i) {
            const int c = tid - 63 + i;
            if (c >= 0 && c < kTileN) sum += ps[i * kPStride + c];
          }
          diag[tile * kTileN + tid] += sum;
        }
      },
      true);
  __syncthreads();
  float* out = part_diag + (static_cast<int64_t>(h) * a.nchunks + chunk) * kDiagStride;
  for (int i = tid; i < kDiagStride; i += kThreads) out[i] = diag[i];
}

// slash[h][d] += partials of the chunks whose t = base - chunk * kChunk - d is in range.
__global__ void slash_reduce_kernel(const float* part_diag, int nchunks, int num_heads,
                                    int64_t seq_len, int64_t base, int64_t d_lo, int64_t d_hi,
                                    float* slash_score) {
  const int h = blockIdx.y;
  const int64_t d = d_lo + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (d > d_hi) return;
  const int64_t u = base - d;  // >= 0
  const int64_t k1 = u / kChunk, t1 = u - k1 * kChunk;
  const float* ph = part_diag + static_cast<int64_t>(h) * nchunks * kDiagStride;
  float sum = 0.f;
  if (k1 >= 1 && k1 - 1 < nchunks && t1 < 63) sum += ph[(k1 - 1) * kDiagStride + t1 + kChunk];
  if (k1 < nchunks) sum += ph[k1 * kDiagStride + t1];
  slash_score[h * seq_len + d] += sum;
}

Status check(const VsEstimateParams& p) {
  MPREFILL_CHECK_ARG(p.q_last && p.k, Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(p.seq_len > 0 && p.n_last == std::min<int64_t>(kBlock, p.seq_len),
                     Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(p.n_k >= 0 && p.k_pos0 >= 0 && p.k_pos0 + p.n_k <= p.seq_len,
                     Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(p.num_heads > 0 && p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0,
                     Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(p.q_head_stride >= 0 && p.k_head_stride >= 0 &&
                         (p.n_last <= 1 || p.q_row_stride > 0) &&
                         (p.n_k <= 1 || p.k_row_stride > 0),
                     Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(p.scale > 0.f && std::isfinite(p.scale), Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(p.dtype == DType::kBF16, Status::kUnsupported);
  MPREFILL_CHECK_ARG(p.head_dim == 64 || p.head_dim == 128, Status::kUnsupported);
  // 16-byte key rows for cp.async
  MPREFILL_CHECK_ARG(reinterpret_cast<uintptr_t>(p.k) % 16 == 0 && p.k_row_stride % 8 == 0 &&
                         p.k_head_stride % 8 == 0,
                     Status::kUnsupported);
  return Status::kOk;
}

int num_chunks(const VsEstimateParams& p) { return (p.n_k + kChunk - 1) / kChunk; }

EstArgs make_args(const VsEstimateParams& p) {
  EstArgs a;
  a.q = static_cast<const __nv_bfloat16*>(p.q_last);
  a.k = static_cast<const __nv_bfloat16*>(p.k);
  a.q_row_stride = p.q_row_stride;
  a.q_head_stride = p.q_head_stride;
  a.k_row_stride = p.k_row_stride;
  a.k_head_stride = p.k_head_stride;
  a.n_last = p.n_last;
  a.seq_len = p.seq_len;
  a.n_k = p.n_k;
  a.k_pos0 = p.k_pos0;
  a.num_heads = p.num_heads;
  a.group = p.num_heads / p.num_kv_heads;
  a.scale = p.scale;
  a.nchunks = num_chunks(p);
  return a;
}

template <typename K>
Status raise_smem(K kernel, size_t bytes) {
  MPREFILL_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(bytes)));
  return Status::kOk;
}

struct Parts {
  float *pmax, *psum, *pdiag;
};
Parts carve(const VsEstimateParams& p, void* ws) {
  Carve c(ws);
  const size_t rows = static_cast<size_t>(p.num_heads) * num_chunks(p) * 64;
  Parts r;
  r.pmax = c.take<float>(rows);
  r.psum = c.take<float>(rows);
  r.pdiag = c.take<float>(static_cast<size_t>(p.num_heads) * num_chunks(p) * kDiagStride);
  return r;
}

}  // namespace

size_t vs_estimate_workspace_size(const VsEstimateParams& p) {
  if (p.n_k <= 0 || p.num_heads <= 0) return 256;
  Carve c(nullptr);
  const size_t rows = static_cast<size_t>(p.num_heads) * num_chunks(p) * 64;
  c.take<float>(rows);
  c.take<float>(rows);
  c.take<float>(static_cast<size_t>(p.num_heads) * num_chunks(p) * kDiagStride);
  return c.used;
}

Status vs_row_stats(const VsEstimateParams& p, float* row_max, float* row_sum, void* workspace,
                    size_t workspace_bytes, cudaStream_t stream) {
  if (const Status s = check(p); s != Status::kOk) return s;
  MPREFILL_CHECK_ARG(row_max && row_sum, Status::kInvalidArgument);
  const int rows = p.num_heads * p.n_last;
  if (p.n_k == 0) {
    // (-inf, 0) for every row: a reduce over zero chunks.
    row_stats_reduce_kernel<<<rows, kReduceThreads, 0, stream>>>(nullptr, nullptr, 0, p.n_last,
                                                                 row_max, row_sum);
    MPREFILL_CUDA_LAUNCH_CHECK("row_stats_reduce_kernel");
    return Status::kOk;
  }
  MPREFILL_CHECK_ARG(workspace && workspace_bytes >= vs_estimate_workspace_size(p),
                     Status::kOutOfMemory);
  const Parts parts = carve(p, workspace);
  const EstArgs a = make_args(p);
  const dim3 grid(a.nchunks * p.num_heads);
  if (p.head_dim == 128) {
    constexpr size_t sm = smem_bytes<128>(false);
    if (const Status s = raise_smem(row_stats_kernel<128>, sm); s != Status::kOk) return s;
    row_stats_kernel<128><<<grid, kThreads, sm, stream>>>(a, parts.pmax, parts.psum);
  } else {
    constexpr size_t sm = smem_bytes<64>(false);
    if (const Status s = raise_smem(row_stats_kernel<64>, sm); s != Status::kOk) return s;
    row_stats_kernel<64><<<grid, kThreads, sm, stream>>>(a, parts.pmax, parts.psum);
  }
  MPREFILL_CUDA_LAUNCH_CHECK("row_stats_kernel");
  row_stats_reduce_kernel<<<rows, kReduceThreads, 0, stream>>>(parts.pmax, parts.psum, a.nchunks,
                                                               p.n_last, row_max, row_sum);
  MPREFILL_CUDA_LAUNCH_CHECK("row_stats_reduce_kernel");
  return Status::kOk;
}

Status vs_combine_row_stats(float* a_max, float* a_sum, const float* b_max, const float* b_sum,
                            int64_t rows, cudaStream_t stream) {
  MPREFILL_CHECK_ARG(rows >= 0, Status::kInvalidArgument);
  if (rows == 0) return Status::kOk;
  MPREFILL_CHECK_ARG(a_max && a_sum && b_max && b_sum, Status::kInvalidArgument);
  combine_kernel<<<static_cast<unsigned>((rows + 255) / 256), 256, 0, stream>>>(a_max, a_sum, b_max,
                                                                                b_sum, rows);
  MPREFILL_CUDA_LAUNCH_CHECK("combine_kernel");
  return Status::kOk;
}

Status vs_scores(const VsEstimateParams& p, const float* row_max, const float* row_sum,
                 float* col_score, float* slash_score, void* workspace, size_t workspace_bytes,
                 cudaStream_t stream) {
  if (const Status s = check(p); s != Status::kOk) return s;
  MPREFILL_CHECK_ARG(row_max && row_sum && slash_score && (p.n_k == 0 || col_score),
                     Status::kInvalidArgument);
  if (p.n_k == 0) return Status::kOk;
  const int64_t r_first = p.seq_len - p.n_last, r_last = p.seq_len - 1;
  const int64_t d_lo = std::max<int64_t>(0, r_first - (p.k_pos0 + p.n_k - 1));
  const int64_t d_hi = r_last - p.k_pos0;
  if (d_hi < 0) return Status::kOk;
  MPREFILL_CHECK_ARG(workspace && workspace_bytes >= vs_estimate_workspace_size(p),
                     Status::kOutOfMemory);
  const Parts parts = carve(p, workspace);
  const EstArgs a = make_args(p);
  const dim3 grid(a.nchunks * p.num_heads);
  if (p.head_dim == 128) {
    constexpr size_t sm = smem_bytes<128>(true);
    if (const Status s = raise_smem(scores_kernel<128>, sm); s != Status::kOk) return s;
    scores_kernel<128><<<grid, kThreads, sm, stream>>>(a, row_max, row_sum, col_score, parts.pdiag);
  } else {
    constexpr size_t sm = smem_bytes<64>(true);
    if (const Status s = raise_smem(scores_kernel<64>, sm); s != Status::kOk) return s;
    scores_kernel<64><<<grid, kThreads, sm, stream>>>(a, row_max, row_sum, col_score, parts.pdiag);
  }
  MPREFILL_CUDA_LAUNCH_CHECK("scores_kernel");
  const int64_t base = p.seq_len - p.n_last + 63 - p.k_pos0;
  const int64_t nd = d_hi - d_lo + 1;
  const dim3 rgrid(static_cast<unsigned>((nd + 255) / 256), p.num_heads);
  slash_reduce_kernel<<<rgrid, 256, 0, stream>>>(parts.pdiag, a.nchunks, p.num_heads, p.seq_len,
                                                 base, d_lo, d_hi, slash_score);
  MPREFILL_CUDA_LAUNCH_CHECK("slash_reduce_kernel");
  return Status::kOk;
}

}  // namespace mprefill::cuda::index
