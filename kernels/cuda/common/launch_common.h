// Host-side launcher pieces shared by the attention entries (flash_api.cu, sparse_api.cu),
// without CuTe: element tags of the explicit instances and the layout checks that the
// TMA-based kernels need.
#pragma once
#include <cstdint>

#include "kernels/attention.h"
#include "kernels/cuda/check.h"
#include "kernels/status.h"

namespace mprefill::cuda {

// Element tags naming the explicit instances (inst/*.cu) without CUTLASS types.
struct Bf16 {};
struct Fp16 {};

inline bool aligned(const void* ptr, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// What the TMA kernels need beyond validate(): 16-byte aligned q/k/v with row and head
// strides in multiples of 8 elements (TMA), o 4-byte aligned with even strides (the
// epilogue stores column pairs), 32-bit-safe sizes and heads within grid.y.
// kUnsupported with the failing condition otherwise.
inline Status check_tma_layout(const AttentionParams& p) {
  MPREFILL_CHECK_ARG(aligned(p.q, 16) && aligned(p.k, 16) && aligned(p.v, 16) && aligned(p.o, 4),
                     Status::kUnsupported);
  MPREFILL_CHECK_ARG(p.q_row_stride % 8 == 0 && p.q_head_stride % 8 == 0 &&
                         p.k_row_stride % 8 == 0 && p.k_head_stride % 8 == 0 &&
                         p.v_row_stride % 8 == 0 && p.v_head_stride % 8 == 0,
                     Status::kUnsupported);
  MPREFILL_CHECK_ARG(p.o_row_stride % 2 == 0 && p.o_head_stride % 2 == 0, Status::kUnsupported);
  MPREFILL_CHECK_ARG(p.n_q < (1 << 30) && p.n_k < (1 << 30), Status::kUnsupported);
  MPREFILL_CHECK_ARG(p.num_heads <= 65535, Status::kUnsupported);  // grid.y
  return Status::kOk;
}

}  // namespace mprefill::cuda
