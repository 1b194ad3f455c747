// Host entry of the dense flash forward: argument checks and dispatch over
// dtype x head_dim x causal onto the explicit instances in inst/.
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "kernels/cuda/check.h"
#include "kernels/cuda/common/launch_common.h"
#include "kernels/cuda/flash/flash.h"
#include "kernels/cuda/flash/flash_launch.h"

namespace mprefill::cuda {
namespace {

using flash::Bf16;
using flash::Fp16;
using flash::run_fwd;

#ifdef MPREFILL_CUDA_SUBSET
constexpr const char* kBuiltHeadDims = "128 (MPREFILL_CUDA_SUBSET build)";
constexpr const char* kBuiltDtypes = "bf16 = 1 (MPREFILL_CUDA_SUBSET build)";
#else
constexpr const char* kBuiltHeadDims = "48 (padded to 64), 64, 128";
constexpr const char* kBuiltDtypes = "bf16 = 1, fp16 = 2";
#endif

// kUnsupported with a message naming the rejected value.
Status unsupported(const char* what, int value, const char* supported) {
  char msg[160];
  std::snprintf(msg, sizeof(msg), "flash_attention_fwd: unsupported %s %d (built: %s)", what, value,
                supported);
  return detail::record_error(Status::kUnsupported, msg, __FILE__, __LINE__);
}

template <class E, int D>
Status dispatch_causal(const AttentionParams& p, cudaStream_t s) {
  return p.causal ? run_fwd<E, D, true>(p, s) : run_fwd<E, D, false>(p, s);
}

template <class E>
Status dispatch_hdim(const AttentionParams& p, cudaStream_t s) {
  switch (p.head_dim) {
    case 128:
      return dispatch_causal<E, 128>(p, s);
#ifndef MPREFILL_CUDA_SUBSET
    case 64:
    case 48:  // the 64 instance, zero-padded in shared memory by TMA
      return dispatch_causal<E, 64>(p, s);
#endif
    default:
      return unsupported("head_dim", p.head_dim, kBuiltHeadDims);
  }
}

// No keys: every row is empty, o = 0 (all-zero bits in bf16 and fp16) and lse = -inf.
__global__ void fill_empty_rows(uint16_t* o, float* lse, int n_q, int heads, int head_dim,
                                int64_t o_row_stride, int64_t o_head_stride,
                                int64_t lse_head_stride) {
  const int64_t row = blockIdx.x;  // (token, head) pair
  const int t = int(row / heads), h = int(row % heads);
  uint16_t* dst = o + t * o_row_stride + h * o_head_stride;
  for (int i = threadIdx.x; i < head_dim; i += blockDim.x) dst[i] = 0;
  if (lse != nullptr && threadIdx.x == 0) lse[h * lse_head_stride + t] = -INFINITY;
}

}  // namespace

bool flash_attention_supported(DType dtype, int head_dim) {
#ifdef MPREFILL_CUDA_SUBSET
  return dtype == DType::kBF16 && head_dim == 128;
#else
  return (dtype == DType::kBF16 || dtype == DType::kF16) &&
         (head_dim == 48 || head_dim == 64 || head_dim == 128);
#endif
}

Status flash_attention_fwd(const AttentionParams& p, cudaStream_t stream) {
  const Status v = validate(p);
  if (v != Status::kOk)
    return detail::record_error(v, "flash_attention_fwd: invalid AttentionParams", __FILE__,
                                __LINE__);
  if (p.dtype != DType::kBF16 && p.dtype != DType::kF16)
    return unsupported("dtype", static_cast<int>(p.dtype), kBuiltDtypes);
  if (const Status s = check_tma_layout(p); s != Status::kOk) return s;
  if (p.n_q == 0) return Status::kOk;
  if (p.n_k == 0) {  // the kernel's K/V tensor maps need n_k >= 1
    if (!flash_attention_supported(p.dtype, p.head_dim))
      return detail::record_error(Status::kUnsupported,
                                  "flash_attention_fwd: unsupported dtype/head_dim", __FILE__,
                                  __LINE__);
    MPREFILL_CHECK_ARG(int64_t(p.n_q) * p.num_heads < (int64_t(1) << 31), Status::kUnsupported);
    fill_empty_rows<<<unsigned(int64_t(p.n_q) * p.num_heads), 64, 0, stream>>>(
        static_cast<uint16_t*>(p.o), p.lse, p.n_q, p.num_heads, p.head_dim, p.o_row_stride,
        p.o_head_stride, p.lse_head_stride);
    MPREFILL_CUDA_LAUNCH_CHECK("fill_empty_rows");
    return Status::kOk;
  }
  switch (p.dtype) {
    case DType::kBF16:
      return dispatch_hdim<Bf16>(p, stream);
#ifndef MPREFILL_CUDA_SUBSET
    case DType::kF16:
      return dispatch_hdim<Fp16>(p, stream);
#endif
    default:
      return unsupported("dtype", static_cast<int>(p.dtype), kBuiltDtypes);
  }
}

}  // namespace mprefill::cuda
