// GPU index estimation and index build for the sparse attention kernels (sm90 build).
// Same definitions as the CPU reference (kernels/cpu/cpu.h, ../shared/BENCHMARKS.md):
//   - vertical-slash estimation in two shard-composable passes (row statistics, then
//     column and slash scores), top-k selection with forced entries and tie-breaks;
//   - the canonical CSR VsIndex of kernels/sparse.h, equal to cpu::vs_build_index;
//   - block-sparse estimation (mean-pooled 64-token blocks), equal to
//     cpu::block_sparse_estimate: pooling and block dots follow the CPU's fp32 order and
//     rounding (no fused multiply-add), so the scores agree bit for bit.
// All pointers are device memory unless marked host. Launchers validate their
// arguments, enqueue work on `stream` and return without synchronising; none allocates.
// Scratch memory comes from the caller (`workspace`, sized by the *_workspace_size
// functions, 256-byte aligned). A non-kOk Status leaves a message in cuda::last_error().
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/sparse.h"
#include "kernels/status.h"
#include "kernels/types.h"

namespace mprefill::cuda::index {

// Heads per call of vs_select / block_sparse_estimate (budgets travel as kernel
// parameters); callers with more heads split the call.
constexpr int kMaxHeadsPerCall = 128;

// ---------------------------------------------------------------- VS estimation
// p as for the CPU (kernels/sparse.h), with device pointers; dtype kBF16, head_dim 64
// or 128 (others kUnsupported). Row statistics are [num_heads][n_last] fp32.
size_t vs_estimate_workspace_size(const VsEstimateParams& p);

// Pass 1: this shard's per-row (max, sum exp(x - max)); rows with no causal key in the
// shard get (-inf, 0). Overwrites row_max/row_sum.
Status vs_row_stats(const VsEstimateParams& p, float* row_max, float* row_sum, void* workspace,
                    size_t workspace_bytes, cudaStream_t stream);

// a <- a (+) b for `rows` rows (shard statistics gathered from another rank).
Status vs_combine_row_stats(float* a_max, float* a_sum, const float* b_max, const float* b_sum,
                            int64_t rows, cudaStream_t stream);

// Pass 2: accumulates (+=) this shard's scores given the GLOBAL row statistics:
// col_score [num_heads][n_k] (local columns), slash_score [num_heads][seq_len].
Status vs_scores(const VsEstimateParams& p, const float* row_max, const float* row_sum,
                 float* col_score, float* slash_score, void* workspace, size_t workspace_bytes,
                 cudaStream_t stream);

// ---------------------------------------------------------------- VS selections
// Device-side selections of num_heads heads: head h has n_columns[h] columns at
// columns + h * col_capacity (ascending, distinct, in [0, seq_len)) and n_offsets[h]
// offsets at offsets + h * off_capacity (descending, distinct, in [0, seq_len)).
struct VsSelectionsDevice {
  int64_t seq_len = 0;
  int num_heads = 0;
  int* columns = nullptr;
  int* offsets = nullptr;
  int* n_columns = nullptr;  // [num_heads]
  int* n_offsets = nullptr;  // [num_heads]
  int col_capacity = 0, off_capacity = 0;
};

// Top-k of global scores col_score / slash_score ([num_heads][n], n = sel->seq_len)
// with budgets v_budget / s_budget (host arrays [num_heads], clamped with
// clamp_vertical_budget / clamp_slash_budget): columns 0..29 and offsets 0..99 are
// forced, NaN ranks lowest, ties go to the lower index. Writes the sel arrays; the
// capacities must hold the clamped budgets. tau (host array [num_heads], null = all 0):
// a head with 0 < tau <= 1 takes, of the same ranking, the shortest prefix whose score
// mass (finite, > 0) reaches tau of its total, the clamped budgets as caps, never fewer
// than the forced entries (cpu::select_by_mass); its counts are decided on the device
// (n_columns / n_offsets), with no host sync.
size_t vs_select_workspace_size(int num_heads, int64_t n);
Status vs_select(const float* col_score, const float* slash_score, const int* v_budget,
                 const int* s_budget, const VsSelectionsDevice* sel, void* workspace,
                 size_t workspace_bytes, cudaStream_t stream, const double* tau = nullptr);

// ---------------------------------------------------------------- VS index build
// Canonical CSR (kernels/sparse.h) of the selections, equal to cpu::vs_build_index:
// nblocks = ceil(seq_len / 64), ptr arrays [num_heads * nblocks + 1], absolute,
// head-major. Selections must be sorted and distinct as VsSelectionsDevice says.
// Two steps: vs_index_count writes range_ptr and col_ptr (the totals are their last
// elements; the caller reads them to size the value arrays), vs_index_fill writes
// range_lo/range_hi [range_ptr.back()] and col [col_ptr.back()] (col may be null when
// col_ptr.back() is 0). Both take the same workspace size.
size_t vs_index_workspace_size(int num_heads, int64_t n, int off_capacity);
Status vs_index_count(const VsSelectionsDevice& sel, int64_t* range_ptr, int64_t* col_ptr,
                      void* workspace, size_t workspace_bytes, cudaStream_t stream);
Status vs_index_fill(const VsSelectionsDevice& sel, const int64_t* range_ptr,
                     const int64_t* col_ptr, int* range_lo, int* range_hi, int* col,
                     void* workspace, size_t workspace_bytes, cudaStream_t stream);

// ---------------------------------------------------------------- block-sparse estimation
// q [seq_len] x [num_heads] x [head_dim], k [seq_len] x [num_kv_heads] x [head_dim]
// (row/head strides in elements), dtype kBF16 or kF32, any head_dim <= 256. Pooled
// means and scores in fp32. topk: host [num_heads], each >= 1. Output blocks
// [num_heads][nblocks][k_out] (k_out >= max topk): per query block the chosen key
// blocks ascending, then -1. nblocks = ceil(seq_len / 64) must be <= 32768. One CTA per
// (query block, head) re-reads the pooled keys: O(nblocks^2 * head_dim) per head, fine at
// 128K, several ms per head at 1M (not optimised; no target covers it).
struct BlockSparseEstimateParams {
  const void* q = nullptr;
  const void* k = nullptr;
  int64_t q_row_stride = 0, q_head_stride = 0;
  int64_t k_row_stride = 0, k_head_stride = 0;
  int64_t seq_len = 0;
  int num_heads = 0, num_kv_heads = 0, head_dim = 0;
  float scale = 0.f;
  DType dtype = DType::kBF16;
};
size_t block_sparse_estimate_workspace_size(const BlockSparseEstimateParams& p);
Status block_sparse_estimate(const BlockSparseEstimateParams& p, const int* topk, int* blocks,
                             int k_out, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream);

// Shard-composable block-sparse estimation (sequence parallel), the same arithmetic as
// block_sparse_estimate: block_mean_pool pools `rows` rows of x ([rows] x [num_heads] x
// [head_dim], strides in elements; the shard's first row must start a 64-token block of
// the sequence) into out[h * out_blocks + b][head_dim] for its ceil(rows / 64) blocks, so
// `out` may point at the shard's first block inside a global [num_heads][nblocks][head_dim]
// array (out_blocks = nblocks). block_sparse_select_pooled runs the top-k of
// block_sparse_estimate on complete pooled arrays qpool [num_heads][nblocks][head_dim],
// kpool [num_kv_heads][nblocks][head_dim].
Status block_mean_pool(const void* x, int64_t row_stride, int64_t head_stride, int64_t rows,
                       int num_heads, int head_dim, DType dtype, float* out, int64_t out_blocks,
                       cudaStream_t stream);
Status block_sparse_select_pooled(const float* qpool, const float* kpool, int64_t seq_len,
                                  int num_heads, int num_kv_heads, int head_dim, float scale,
                                  const int* topk, int* blocks, int k_out, cudaStream_t stream);

}  // namespace mprefill::cuda::index
