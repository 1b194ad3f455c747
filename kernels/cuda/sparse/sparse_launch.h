// Explicit instances of the sparse forward launcher (one per inst/*.cu file), declared
// without CuTe so that the dispatcher compiles cheaply.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/attention.h"
#include "kernels/status.h"

namespace mprefill::cuda::sparse {

struct Bf16 {};
struct Fp16 {};

// Pattern of one launch (the kernel's Params minus what AttentionParams gives).
struct PatternArgs {
  int kind = 0;  // Kind: 0 vertical-slash, 1 block-sparse, 2 A-shape
  int64_t nblocks = 0;
  const int64_t* range_ptr = nullptr;
  const int* range_lo = nullptr;
  const int* range_hi = nullptr;
  const int64_t* col_ptr = nullptr;
  const int* col = nullptr;
  int head_offset = 0;
  const int* blocks = nullptr;
  int bs_k = 0;
  int64_t n_init = 0, n_local = 0;
};

template <class E, int D>
Status run_fwd(const AttentionParams& p, const PatternArgs& pat, cudaStream_t stream);

}  // namespace mprefill::cuda::sparse

// Instance file body: MPREFILL_SPARSE_FWD_INSTANCE(Bf16, cutlass::bfloat16_t, 128)
#define MPREFILL_SPARSE_FWD_INSTANCE(TAG, ELEMENT, HDIM)                      \
  namespace mprefill::cuda::sparse {                                          \
  template <>                                                                 \
  Status run_fwd<TAG, HDIM>(const AttentionParams& p, const PatternArgs& pat, \
                            cudaStream_t stream) {                            \
    using T = SparseTraits<ELEMENT, HDIM>;                                    \
    typename T::Params sp{};                                                  \
    sp.kind = static_cast<Kind>(pat.kind);                                    \
    sp.nblocks = pat.nblocks;                                                 \
    sp.range_ptr = pat.range_ptr;                                             \
    sp.range_lo = pat.range_lo;                                               \
    sp.range_hi = pat.range_hi;                                               \
    sp.col_ptr = pat.col_ptr;                                                 \
    sp.col = pat.col;                                                         \
    sp.head_offset = pat.head_offset;                                         \
    sp.blocks = pat.blocks;                                                   \
    sp.bs_k = pat.bs_k;                                                       \
    sp.n_init = pat.n_init;                                                   \
    sp.n_local = pat.n_local;                                                 \
    return run_sparse_fwd<T>(p, sp, stream);                                  \
  }                                                                           \
  }
