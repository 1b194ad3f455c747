// Layer ops on the GPU: RMSNorm, RoPE, SwiGLU, embedding gather, residual add, bias add.
// Data fp32 or bf16 per tensor, math in fp32 (RoPE angles in double). Memory-bound:
// one block per row, 4 elements per access when every pointer, stride and width allows
// it (16 bytes for fp32, 8 for bf16), else scalar accesses; all coalesced.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>

#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda.h"

namespace mprefill::cuda {
namespace {

constexpr int kVec = 4;  // elements per vector access

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Loads/stores N consecutive elements starting at p (aligned to N elements when N > 1).
template <int N, typename T>
__device__ __forceinline__ void load(const T* p, float (&out)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = to_f32(pk.v[j]);
}
template <int N, typename T>
__device__ __forceinline__ void store(T* p, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int j = 0; j < N; ++j) pk.v[j] = from_f32<T>(in[j]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v) {
  __shared__ float partial[32];
  __shared__ float total;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x >> 5;
    float s = lane < nwarps ? partial[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) total = s;
  }
  __syncthreads();
  return total;
}

// ---------------------------------------------------------------- kernels
// grid.x = rows; y may alias x (each element is read and written by one thread).
template <typename TX, typename TW, typename TY, int V>
__global__ void rmsnorm_kernel(const TX* x, int64_t xs, const TW* w, TY* y, int64_t ys, int64_t dim,
                               float eps) {
  const TX* xr = x + static_cast<int64_t>(blockIdx.x) * xs;
  TY* yr = y + static_cast<int64_t>(blockIdx.x) * ys;
  float ss = 0.f;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * V; i < dim;
       i += static_cast<int64_t>(blockDim.x) * V) {
    float v[V];
    load<V>(xr + i, v);
#pragma unroll
    for (int j = 0; j < V; ++j) ss += v[j] * v[j];
  }
  const float r = rsqrtf(block_sum(ss) / static_cast<float>(dim) + eps);
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * V; i < dim;
       i += static_cast<int64_t>(blockDim.x) * V) {
    float v[V], g[V];
    load<V>(xr + i, v);
    load<V>(w + i, g);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = v[j] * r * g[j];
    store<V>(yr + i, v);
  }
}

// grid.x = tokens. Dynamic shared memory: 2 * half floats (cos, sin of this token).
template <typename T>
__global__ void rope_kernel(T* x, int64_t row_stride, int64_t head_stride, int num_heads, int half,
                            const int64_t* positions, int64_t pos0, const double* inv_freq,
                            int adjacent) {
  extern __shared__ float cs[];
  float* c = cs;
  float* s = cs + half;
  const int64_t t = blockIdx.x;
  const int64_t pos = positions ? positions[t] : pos0 + t;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    double sd, cd;
    sincos(static_cast<double>(pos) * inv_freq[i], &sd, &cd);
    c[i] = static_cast<float>(cd);
    s[i] = static_cast<float>(sd);
  }
  __syncthreads();
  T* xt = x + t * row_stride;
  const int pairs = num_heads * half;
  for (int j = threadIdx.x; j < pairs; j += blockDim.x) {
    const int h = j / half, i = j - h * half;
    T* xh = xt + h * head_stride;
    const int d0 = adjacent ? 2 * i : i;
    const int d1 = adjacent ? 2 * i + 1 : i + half;
    const float a = to_f32(xh[d0]), b = to_f32(xh[d1]);
    xh[d0] = from_f32<T>(a * c[i] - b * s[i]);
    xh[d1] = from_f32<T>(a * s[i] + b * c[i]);
  }
}

// grid.x = rows.
template <typename TI, typename TO, int V>
__global__ void swiglu_kernel(const TI* gate, const TI* up, int64_t is, TO* out, int64_t os,
                              int64_t dim) {
  const int64_t r = blockIdx.x;
  const TI* g = gate + r * is;
  const TI* u = up + r * is;
  TO* o = out + r * os;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * V; i < dim;
       i += static_cast<int64_t>(blockDim.x) * V) {
    float gv[V], uv[V];
    load<V>(g + i, gv);
    load<V>(u + i, uv);
#pragma unroll
    for (int j = 0; j < V; ++j) gv[j] = gv[j] / (1.f + __expf(-gv[j])) * uv[j];
    store<V>(o + i, gv);
  }
}

// grid.x = tokens.
template <typename TT, typename TO, int V>
__global__ void embedding_kernel(const TT* table, int64_t vocab, int64_t dim, const int* ids,
                                 TO* out) {
  const int64_t t = blockIdx.x;
  const int id = ids[t];
  TO* o = out + t * dim;
  const bool ok = id >= 0 && id < vocab;
  const TT* row = table + (ok ? static_cast<int64_t>(id) : 0) * dim;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * V; i < dim;
       i += static_cast<int64_t>(blockDim.x) * V) {
    float v[V];
    if (ok) {
      load<V>(row + i, v);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = __int_as_float(0x7fc00000);
    }
    store<V>(o + i, v);
  }
}

// Grid-stride over n / V packs.
template <typename TX, typename TY, int V>
__global__ void add_kernel(TX* x, const TY* y, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < n;
       i += stride) {
    float a[V], b[V];
    load<V>(x + i, a);
    load<V>(y + i, b);
#pragma unroll
    for (int j = 0; j < V; ++j) a[j] += b[j];
    store<V>(x + i, a);
  }
}

// grid.x = rows.
template <typename T, int V>
__global__ void bias_kernel(T* y, int64_t ys, const T* bias, int64_t dim) {
  T* yr = y + static_cast<int64_t>(blockIdx.x) * ys;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * V; i < dim;
       i += static_cast<int64_t>(blockDim.x) * V) {
    float a[V], b[V];
    load<V>(yr + i, a);
    load<V>(bias + i, b);
#pragma unroll
    for (int j = 0; j < V; ++j) a[j] += b[j];
    store<V>(yr + i, a);
  }
}

// ---------------------------------------------------------------- host helpers
Status unsupported_dtype(const char* op, DType t) {
  const std::string what = std::string(op) + ": unsupported dtype " + to_string(t);
  return detail::record_error(Status::kUnsupported, what.c_str(), __FILE__, __LINE__);
}

// Calls f(T{}) with T the element type of t (float or __nv_bfloat16).
template <typename F>
Status with_dtype(const char* op, DType t, F&& f) {
  switch (t) {
    case DType::kF32:
      return f(float{});
    case DType::kBF16:
      return f(__nv_bfloat16{});
    default:
      return unsupported_dtype(op, t);
  }
}

bool aligned(const void* p, int64_t elem_bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(kVec * elem_bytes) == 0;
}

// Threads for a row of `dim` elements read V at a time: a multiple of 32 in [32, 512].
int row_threads(int64_t dim, int v) {
  const int64_t packs = (dim + v - 1) / v;
  const int64_t t = (packs + 31) / 32 * 32;
  return static_cast<int>(t < 32 ? 32 : (t > 512 ? 512 : t));
}

#define MPREFILL_ARG(cond) MPREFILL_CHECK_ARG(cond, Status::kInvalidArgument)

}  // namespace

Status rmsnorm(const void* x, DType x_dtype, int64_t x_row_stride, const void* w, DType w_dtype,
               void* y, DType y_dtype, int64_t y_row_stride, int64_t n, int64_t dim, float eps,
               cudaStream_t stream) {
  MPREFILL_ARG(n >= 0 && n <= INT_MAX && dim > 0);
  if (n == 0) return Status::kOk;
  MPREFILL_ARG(x && w && y && x_row_stride >= dim && y_row_stride >= dim && eps >= 0.f);
  return with_dtype("rmsnorm", x_dtype, [&](auto tx) {
    return with_dtype("rmsnorm", w_dtype, [&](auto tw) {
      return with_dtype("rmsnorm", y_dtype, [&](auto ty) {
        using TX = decltype(tx);
        using TW = decltype(tw);
        using TY = decltype(ty);
        const bool vec = dim % kVec == 0 && x_row_stride % kVec == 0 && y_row_stride % kVec == 0 &&
                         aligned(x, sizeof(TX)) && aligned(w, sizeof(TW)) && aligned(y, sizeof(TY));
        const dim3 grid(static_cast<unsigned>(n));
        if (vec) {
          rmsnorm_kernel<TX, TW, TY, kVec><<<grid, row_threads(dim, kVec), 0, stream>>>(
              static_cast<const TX*>(x), x_row_stride, static_cast<const TW*>(w),
              static_cast<TY*>(y), y_row_stride, dim, eps);
        } else {
          rmsnorm_kernel<TX, TW, TY, 1><<<grid, row_threads(dim, 1), 0, stream>>>(
              static_cast<const TX*>(x), x_row_stride, static_cast<const TW*>(w),
              static_cast<TY*>(y), y_row_stride, dim, eps);
        }
        MPREFILL_CUDA_LAUNCH_CHECK("rmsnorm_kernel");
        return Status::kOk;
      });
    });
  });
}

Status rope(void* x, DType dtype, int64_t n_tokens, int num_heads, int head_dim, int64_t row_stride,
            int64_t head_stride, const int64_t* positions, int64_t pos0, const double* inv_freq,
            RopeStyle style, cudaStream_t stream) {
  MPREFILL_ARG(n_tokens >= 0 && n_tokens <= INT_MAX);
  if (n_tokens == 0) return Status::kOk;
  MPREFILL_ARG(x && inv_freq && num_heads > 0 && head_dim > 0 && head_dim % 2 == 0);
  MPREFILL_ARG(head_stride >= head_dim && row_stride >= (num_heads - 1) * head_stride + head_dim);
  MPREFILL_ARG(static_cast<int64_t>(num_heads) * (head_dim / 2) <= INT_MAX && head_dim <= 8192);
  MPREFILL_ARG(positions || pos0 >= 0);
  MPREFILL_ARG(style == RopeStyle::kRotateHalf || style == RopeStyle::kAdjacentPairs);
  return with_dtype("rope", dtype, [&](auto tag) {
    using T = decltype(tag);
    const int half = head_dim / 2;
    const size_t smem = 2 * sizeof(float) * half;
    rope_kernel<T><<<static_cast<unsigned>(n_tokens), 128, smem, stream>>>(
        static_cast<T*>(x), row_stride, head_stride, num_heads, half, positions, pos0, inv_freq,
        style == RopeStyle::kAdjacentPairs ? 1 : 0);
    MPREFILL_CUDA_LAUNCH_CHECK("rope_kernel");
    return Status::kOk;
  });
}

Status swiglu(const void* gate, const void* up, DType in_dtype, int64_t in_row_stride, void* out,
              DType out_dtype, int64_t out_row_stride, int64_t n, int64_t dim,
              cudaStream_t stream) {
  MPREFILL_ARG(n >= 0 && n <= INT_MAX && dim > 0);
  if (n == 0) return Status::kOk;
  MPREFILL_ARG(gate && up && out && in_row_stride >= dim && out_row_stride >= dim);
  return with_dtype("swiglu", in_dtype, [&](auto ti) {
    return with_dtype("swiglu", out_dtype, [&](auto to) {
      using TI = decltype(ti);
      using TO = decltype(to);
      const bool vec = dim % kVec == 0 && in_row_stride % kVec == 0 && out_row_stride % kVec == 0 &&
                       aligned(gate, sizeof(TI)) && aligned(up, sizeof(TI)) &&
                       aligned(out, sizeof(TO));
      const dim3 grid(static_cast<unsigned>(n));
      if (vec) {
        swiglu_kernel<TI, TO, kVec><<<grid, row_threads(dim, kVec), 0, stream>>>(
            static_cast<const TI*>(gate), static_cast<const TI*>(up), in_row_stride,
            static_cast<TO*>(out), out_row_stride, dim);
      } else {
        swiglu_kernel<TI, TO, 1><<<grid, row_threads(dim, 1), 0, stream>>>(
            static_cast<const TI*>(gate), static_cast<const TI*>(up), in_row_stride,
            static_cast<TO*>(out), out_row_stride, dim);
      }
      MPREFILL_CUDA_LAUNCH_CHECK("swiglu_kernel");
      return Status::kOk;
    });
  });
}

Status embedding(const void* table, DType table_dtype, int64_t vocab, int64_t dim, const int* ids,
                 int64_t n, void* out, DType out_dtype, cudaStream_t stream) {
  MPREFILL_ARG(n >= 0 && n <= INT_MAX && dim > 0 && vocab > 0);
  if (n == 0) return Status::kOk;
  MPREFILL_ARG(table && ids && out);
  return with_dtype("embedding", table_dtype, [&](auto tt) {
    return with_dtype("embedding", out_dtype, [&](auto to) {
      using TT = decltype(tt);
      using TO = decltype(to);
      const bool vec = dim % kVec == 0 && aligned(table, sizeof(TT)) && aligned(out, sizeof(TO));
      const dim3 grid(static_cast<unsigned>(n));
      if (vec) {
        embedding_kernel<TT, TO, kVec><<<grid, row_threads(dim, kVec), 0, stream>>>(
            static_cast<const TT*>(table), vocab, dim, ids, static_cast<TO*>(out));
      } else {
        embedding_kernel<TT, TO, 1><<<grid, row_threads(dim, 1), 0, stream>>>(
            static_cast<const TT*>(table), vocab, dim, ids, static_cast<TO*>(out));
      }
      MPREFILL_CUDA_LAUNCH_CHECK("embedding_kernel");
      return Status::kOk;
    });
  });
}

Status add_inplace(void* x, DType x_dtype, const void* y, DType y_dtype, int64_t n,
                   cudaStream_t stream) {
  MPREFILL_ARG(n >= 0);
  if (n == 0) return Status::kOk;
  MPREFILL_ARG(x && y);
  return with_dtype("add_inplace", x_dtype, [&](auto tx) {
    return with_dtype("add_inplace", y_dtype, [&](auto ty) {
      using TX = decltype(tx);
      using TY = decltype(ty);
      const bool vec = n % kVec == 0 && aligned(x, sizeof(TX)) && aligned(y, sizeof(TY));
      constexpr int kThreads = 256;
      const int v = vec ? kVec : 1;
      const int64_t want = (n / v + kThreads - 1) / kThreads;
      const unsigned blocks = static_cast<unsigned>(want < 65536 ? (want > 0 ? want : 1) : 65536);
      if (vec) {
        add_kernel<TX, TY, kVec>
            <<<blocks, kThreads, 0, stream>>>(static_cast<TX*>(x), static_cast<const TY*>(y), n);
      } else {
        add_kernel<TX, TY, 1>
            <<<blocks, kThreads, 0, stream>>>(static_cast<TX*>(x), static_cast<const TY*>(y), n);
      }
      MPREFILL_CUDA_LAUNCH_CHECK("add_kernel");
      return Status::kOk;
    });
  });
}

Status add_bias(void* y, DType dtype, int64_t y_row_stride, const void* bias, int64_t n,
                int64_t dim, cudaStream_t stream) {
  MPREFILL_ARG(n >= 0 && n <= INT_MAX && dim > 0);
  if (n == 0) return Status::kOk;
  MPREFILL_ARG(y && bias && y_row_stride >= dim);
  return with_dtype("add_bias", dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = dim % kVec == 0 && y_row_stride % kVec == 0 && aligned(y, sizeof(T)) &&
                     aligned(bias, sizeof(T));
    const dim3 grid(static_cast<unsigned>(n));
    if (vec) {
      bias_kernel<T, kVec><<<grid, row_threads(dim, kVec), 0, stream>>>(
          static_cast<T*>(y), y_row_stride, static_cast<const T*>(bias), dim);
    } else {
      bias_kernel<T, 1><<<grid, row_threads(dim, 1), 0, stream>>>(static_cast<T*>(y), y_row_stride,
                                                                  static_cast<const T*>(bias), dim);
    }
    MPREFILL_CUDA_LAUNCH_CHECK("bias_kernel");
    return Status::kOk;
  });
}

}  // namespace mprefill::cuda
