// Host API of the attention kernels: plain params structs shared by the CPU
// reference (kernels/cpu) and the sm90 implementation (kernels/cuda).
//
// Layout (all backends): token-major. Element (token t, head h, dim i) of Q is at
//   q[t * q_row_stride + h * q_head_stride + i]      (strides in elements)
// and likewise for K, V (kv heads) and O (query heads). GQA: query head h reads
// kv head h / (num_heads / num_kv_heads). LSE is [num_heads][lse_head_stride],
// natural log of sum_j exp(scale * q.k_j) over the visible keys; a row with no
// visible key has lse = -inf and an output of exactly zero.
//
// Positions: query row i has global position q_pos0 + i, key j has k_pos0 + j.
// Causal means key position <= query position. Masks of the sparse patterns are
// defined on global positions (see sparse.h), so a ring step that attends a KV
// shard held elsewhere passes that shard's k_pos0 and gets exactly its part of
// the global mask.
#pragma once
#include <cstdint>

#include "kernels/status.h"
#include "kernels/types.h"

namespace mprefill {

struct AttentionParams {
  const void* q = nullptr;  // [n_q] x [num_heads] x [head_dim]
  const void* k = nullptr;  // [n_k] x [num_kv_heads] x [head_dim]
  const void* v = nullptr;  // [n_k] x [num_kv_heads] x [head_dim]
  void* o = nullptr;        // [n_q] x [num_heads] x [head_dim], same dtype as q
  float* lse = nullptr;     // [num_heads] x [lse_head_stride]; may be null

  int64_t q_row_stride = 0, q_head_stride = 0;
  int64_t k_row_stride = 0, k_head_stride = 0;
  int64_t v_row_stride = 0, v_head_stride = 0;
  int64_t o_row_stride = 0, o_head_stride = 0;
  int64_t lse_head_stride = 0;  // >= n_q

  int n_q = 0, n_k = 0;
  int num_heads = 0, num_kv_heads = 0, head_dim = 0;
  int64_t q_pos0 = 0, k_pos0 = 0;  // global positions of query row 0 and key 0
  bool causal = true;
  float scale = 0.f;  // softmax scale, usually 1/sqrt(head_dim)
  DType dtype = DType::kF32;
};

// Fill the strides of a packed layout (rows of heads*head_dim, lse stride n_q).
void set_packed_strides(AttentionParams& p);

// Structural checks shared by every backend (pointers, sizes, GQA ratio, strides).
Status validate(const AttentionParams& p);

// Partial attention state of one query row set: output + lse, as produced by an
// attention call. merge: (o_a, lse_a) <- merge of (o_a, lse_a) and (o_b, lse_b),
// exact for disjoint key sets; either side may be empty (lse = -inf).
struct MergeParams {
  float* o_a = nullptr;    // [n] x [num_heads] x [head_dim] (row/head strides below), in/out
  float* lse_a = nullptr;  // [num_heads] x [lse_head_stride], in/out
  const float* o_b = nullptr;
  const float* lse_b = nullptr;
  int64_t row_stride = 0, head_stride = 0, lse_head_stride = 0;  // shared by a and b
  int n = 0, num_heads = 0, head_dim = 0;
};

}  // namespace mprefill
