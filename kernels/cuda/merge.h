// Log-sum-exp merge of partial attention states on the GPU (ring attention: one partial
// per visiting KV shard). Same meaning as MergeParams (kernels/attention.h), with the
// incoming partial in the attention kernels' output dtype and an optional bf16 copy of
// the merged output:
//   m = max(lse_a, lse_b); wa = exp(lse_a - m), wb = exp(lse_b - m)
//   o_a <- (wa o_a + wb o_b) / (wa + wb), lse_a <- m + log(wa + wb)
// A row with lse_a = lse_b = -inf (no visible key on either side) gets o = 0, lse = -inf.
// Exact for disjoint key sets. fp32 arithmetic.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/status.h"
#include "kernels/types.h"

namespace mprefill::cuda {

struct MergeStatesParams {
  float* o_a = nullptr;          // [n][num_heads][head_dim] (a strides), in/out, fp32
  float* lse_a = nullptr;        // [num_heads][lse_a_head_stride], in/out
  const void* o_b = nullptr;     // [n][num_heads][head_dim] (b strides), dtype b_dtype
  const float* lse_b = nullptr;  // [num_heads][lse_b_head_stride]
  DType b_dtype = DType::kBF16;  // kBF16, kF16 or kF32
  // Optional: the merged output also written here in bf16 (out strides).
  uint16_t* out_bf16 = nullptr;
  int64_t a_row_stride = 0, a_head_stride = 0;
  int64_t b_row_stride = 0, b_head_stride = 0;
  int64_t out_row_stride = 0, out_head_stride = 0;
  int64_t lse_a_head_stride = 0, lse_b_head_stride = 0;  // >= n
  int n = 0, num_heads = 0, head_dim = 0;
};

// Enqueues the merge on `stream`. kInvalidArgument for null pointers, non-positive sizes
// or lse strides below n.
Status merge_attention_states(const MergeStatesParams& p, cudaStream_t stream);

// Resets a state to "no key seen": o = 0 (a strides, [n][num_heads][head_dim]) and
// lse = -inf.
Status reset_attention_state(float* o, float* lse, int64_t row_stride, int64_t head_stride,
                             int64_t lse_head_stride, int n, int num_heads, int head_dim,
                             cudaStream_t stream);

}  // namespace mprefill::cuda
