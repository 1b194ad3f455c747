// Vertical-slash estimation across sequence-parallel CPU ranks (MPI backend, fp32): each
// sp rank holds the K rows of its zigzag token ranges (plan_sequence_parallel); row
// statistics, column scores and slash scores are combined with all_reduce, and every
// rank runs the same selection on the same global score arrays, so all ranks return
// identical selections that match single-process cpu::vs_estimate up to fp32 sum order.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "kernels/sparse.h"
#include "kernels/status.h"
#include "model/parallel_plan.h"

namespace mprefill {

// Global score arrays behind a selection, identical on every rank.
struct VsGlobalScores {
  std::vector<float> col;    // [num_heads][n_total]
  std::vector<float> slash;  // [num_heads][n_total]
};

// Sizes of a vertical-slash estimator call: the prompt's last n_last query rows (row
// stride q_row, heads at head_dim) against key rows of stride k_row.
struct VsCallShape {
  int num_heads = 0, num_kv_heads = 0, head_dim = 0;
  int n_last = 0;       // min(64, seq_len)
  int64_t seq_len = 0;  // the prompt's length N
  int64_t q_row = 0, k_row = 0;
  float scale = 0.f;
  DType dtype = DType::kF32;  // kF32 (CPU), kBF16 (CUDA)
};
// The params of one call over the keys k [n_k][k_row] at global positions
// [k_pos0, k_pos0 + n_k): the one constructor of every shard loop (both backends).
VsEstimateParams vs_call_params(const VsCallShape& s, const void* q_last, const void* k,
                                int64_t k_pos0, int n_k);

// Selections of every query head from the last n_last = min(64, n_total) query rows.
//   mine: this rank's ranges (ascending, disjoint, inside [0, n_total)); the ranges of all
//         ranks together must cover [0, n_total) exactly once.
//   q_local: [local tokens][num_heads][head_dim]; k_local: [local tokens][num_kv_heads]
//         [head_dim]; fp32, packed, rows in range order (local tokens = sum of range
//         lengths, may be 0, then the pointers may be null).
//   v_budget, s_budget: [num_heads], the same on every rank.
//   scores: if non-null, receives the global column and slash scores.
//   tau: null (fixed budgets) or [num_heads] thresholds (cpu::vs_select), the same on
//         every rank.
// Every rank of `sp` must call this with the same n_total, shapes, scale and budgets. On
// failure returns the status and, if error is non-null, a one-line message naming the
// rank and the stage.
Status vs_estimate_distributed(comm::Communicator& sp, const TokenRanges& mine, int64_t n_total,
                               const float* q_local, const float* k_local, int num_heads,
                               int num_kv_heads, int head_dim, float scale, const int* v_budget,
                               const int* s_budget, std::vector<VsSelection>* out,
                               std::string* error, VsGlobalScores* scores = nullptr,
                               const double* tau = nullptr);

// Block-sparse estimation across sequence-parallel ranks: every rank mean-pools the
// 64-token blocks of its ranges (which must be 64-aligned, so no block is split), the
// pooled Q and K blocks are combined with a SUM all_reduce of zero-initialised arrays
// (exact: each block is written by one rank), and every rank runs the same
// cpu::block_sparse_select, so all ranks get the single-process index exactly.
// Arguments as in vs_estimate_distributed; topk: [num_heads]; tau as there
// (cpu::block_sparse_select).
// stride S > 0 scores every head of the call by antidiagonals instead (cpu::antidiag_select):
// each rank packs the strided keys of its ranges into a zero-initialised array of all
// ceil(N / S) strided rows, a SUM all_reduce completes it (exact: one writer per row, S
// divides 64 so no strided row crosses a range), each rank selects the query blocks of its
// own ranges, and a SUM all_reduce of the lists (block + 1, 0 elsewhere; int32) gives every
// rank the single-process cpu::block_sparse_estimate index bit for bit. Traffic: the keys
// of the call once (N * num_kv_heads * head_dim floats) plus the lists.
Status block_sparse_estimate_distributed(comm::Communicator& sp, const TokenRanges& mine,
                                         int64_t n_total, const float* q_local,
                                         const float* k_local, int num_heads, int num_kv_heads,
                                         int head_dim, float scale, const int* topk,
                                         BlockSparseIndex* out, std::string* error,
                                         const double* tau = nullptr, int stride = 0);

}  // namespace mprefill
