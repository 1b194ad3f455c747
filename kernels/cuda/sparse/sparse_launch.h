// Explicit instances of the sparse forward launcher (one per inst/*.cu file), declared
// without CuTe so that the dispatcher compiles cheaply.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "kernels/attention.h"
#include "kernels/cuda/common/launch_common.h"
#include "kernels/status.h"

namespace mprefill::cuda::sparse {

using cuda::Bf16;
using cuda::Fp16;

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
  // Kernel generation, resolved from SparseKernelGen (sparse_attention.h): 1
  // (sparse_fwd_kernel.cuh), 2 (sparse_fwd_v2_kernel.cuh), 3 (the skeleton,
  // kernels/cuda/attn/walk_sparse.cuh), 4 (the skeleton with owner tiles) or 5 (4 from a
  // tile plan computed before the launch).
  int version = 2;
};

template <class E, int D>
Status run_fwd(const AttentionParams& p, const PatternArgs& pat, cudaStream_t stream);

// Kernel v2 exists for bf16 / head_dim 128 only (the instance tested on the H100, the one
// the engine uses); the other instances run v1 whatever the version asks.
template <class E, int D>
inline constexpr bool kSparseV2Built = (D == 128) && std::is_same_v<E, Bf16>;

}  // namespace mprefill::cuda::sparse

// Instance file body: MPREFILL_SPARSE_FWD_INSTANCE(Bf16, cutlass::bfloat16_t, 128); the
// file includes kernels/cuda/attn/walk_sparse.cuh (which includes v2's and v1's). Version 2 needs
// 32-bit positions (sparse_v2_positions_ok) and kSparseV2Built; otherwise version 1 runs.
#define MPREFILL_SPARSE_FWD_INSTANCE(TAG, ELEMENT, HDIM)                        \
  namespace mprefill::cuda::sparse {                                            \
  template <>                                                                   \
  Status run_fwd<TAG, HDIM>(const AttentionParams& p, const PatternArgs& pat,   \
                            cudaStream_t stream) {                              \
    using T = SparseTraits<ELEMENT, HDIM>;                                      \
    typename T::Params sp{};                                                    \
    sp.kind = static_cast<Kind>(pat.kind);                                      \
    sp.nblocks = pat.nblocks;                                                   \
    sp.range_ptr = pat.range_ptr;                                               \
    sp.range_lo = pat.range_lo;                                                 \
    sp.range_hi = pat.range_hi;                                                 \
    sp.col_ptr = pat.col_ptr;                                                   \
    sp.col = pat.col;                                                           \
    sp.head_offset = pat.head_offset;                                           \
    sp.blocks = pat.blocks;                                                     \
    sp.bs_k = pat.bs_k;                                                         \
    sp.n_init = pat.n_init;                                                     \
    sp.n_local = pat.n_local;                                                   \
    if constexpr (kSparseV2Built<TAG, HDIM>) {                                  \
      if (pat.version >= 3 && sparse_v2_positions_ok(p))                        \
        return run_skel_fwd<ELEMENT, HDIM>(p, pat, stream);                     \
      if (pat.version == 2 && sparse_v2_positions_ok(p))                        \
        return run_sparse_fwd_v2<SparseTraitsV2<ELEMENT, HDIM>>(p, sp, stream); \
    }                                                                           \
    return run_sparse_fwd<T>(p, sp, stream);                                    \
  }                                                                             \
  }
