// Global sparse-index estimation across sequence-parallel GPU ranks (the GPU form of
// engine/distributed_estimate.h), on the kernels of kernels/cuda/index/index.h and an NCCL
// sp communicator. Every sp rank holds the K (and Q) rows of its zigzag token ranges
// (plan_sequence_parallel: 64-aligned edges) and ends with the same indices:
//
//   vertical-slash: the globally last n_last = min(64, N) query rows are broadcast from
//     their owner rank(s) (gather_last_rows); each rank runs vs_row_stats on its local key
//     ranges (global positions, causal) and combines them; the per-rank (max, sum) pairs
//     are all-gathered and combined in rank order, so every rank holds bit-identical global
//     row statistics; vs_scores of the local ranges land at their global columns of a
//     zeroed [heads][N] array and add to a [heads][N] slash array (diagonals crossing shard
//     edges are simply offsets that several ranks add to); two SUM all-reduces make both
//     global and every rank runs vs_select on the same arrays.
//   block-sparse: each rank mean-pools its 64-token blocks into zeroed global pooled
//     arrays (one writer per block, so the SUM all-reduce is exact), then the top-k of
//     block_sparse_estimate runs on every rank: bit-identical to the single-GPU index.
//
// Versus one GPU (CudaBackend at sp 1): block-sparse indices are identical. Vertical-slash column
// scores are identical given identical row statistics; the row sums and slash sums are fp32
// sums in another order (1024-key chunks start at each shard's first key; rank partials
// are added across ranks), so they may differ in the last ulps, and a selection can then
// differ from the single-GPU one only where two candidates' scores tie within that
// rounding (tests/mpi/gpu_dist_engine_test.cc counts such entries).
//
// All device pointers; work is enqueued on `stream` (NCCL calls on the same stream);
// scratch grows on demand and is kept between calls. Errors throw through the edge
// check (engine/cuda/fail.h) naming the rank, stage and layer.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "engine/cuda/fail.h"
#include "kernels/cuda/index/index.h"
#include "model/parallel_plan.h"

namespace mprefill::gpu {

class SpEstimator {
 public:
  // sp: the sequence-parallel communicator (size = layout.size(), rank = me); may be null
  // when layout has one rank. who: message prefix naming the rank.
  SpEstimator(comm::Communicator* sp, std::vector<TokenRanges> layout, int me, int64_t n,
              cudaStream_t stream, std::string who);
  ~SpEstimator();
  SpEstimator(const SpEstimator&) = delete;
  SpEstimator& operator=(const SpEstimator&) = delete;

  int n_last() const { return n_last_; }
  int64_t local_rows() const { return local_rows_; }

  // q_last[i][...] = global query row n - n_last + i, on every rank. q_local: this rank's
  // rows [local rows][row_elems] bf16 in range order; q_last: [n_last][row_elems] bf16.
  void gather_last_rows(const uint16_t* q_local, int64_t row_elems, uint16_t* q_last);

  // Selections of num_heads heads (GQA: num_heads / num_kv_heads per kv head). q_last:
  // [n_last] rows of stride q_row (head stride head_dim); k_local: local key rows of
  // stride k_row (head stride head_dim). v_budget / s_budget: host [num_heads], clamped
  // (clamp_vertical_budget / clamp_slash_budget); out: capacities must hold them. tau:
  // host [num_heads] or null, adaptive heads (cuda::index::vs_select).
  void vertical_slash(const uint16_t* q_last, int64_t q_row, const uint16_t* k_local, int64_t k_row,
                      int num_heads, int num_kv_heads, int head_dim, float scale,
                      const int* v_budget, const int* s_budget,
                      const cuda::index::VsSelectionsDevice& out, int layer,
                      const double* tau = nullptr);

  // Block lists [num_heads][nblocks][k_out] (block_sparse_estimate's layout). q_local /
  // k_local: local rows of stride q_row / k_row. topk: host [num_heads].
  void block_sparse(const uint16_t* q_local, int64_t q_row, const uint16_t* k_local, int64_t k_row,
                    int num_heads, int num_kv_heads, int head_dim, float scale, const int* topk,
                    int* blocks, int k_out, int layer);

  // Bytes this rank moved through the sp communicator for estimation (sent side).
  int64_t comm_bytes() const { return comm_bytes_; }

 private:
  struct Buf {
    void* p = nullptr;
    size_t bytes = 0;
  };
  template <class T>
  T* get(Buf& b, size_t count);

  comm::Communicator* sp_;
  std::vector<TokenRanges> layout_;
  int me_, sp_size_, n_last_;
  int64_t n_, local_rows_ = 0, max_range_ = 0;
  cudaStream_t st_;
  Fail f_;  // the edge check, prefixed by the caller's `who`
  int64_t comm_bytes_ = 0;
  Buf ws_, lmax_, lsum_, tmax_, tsum_, gmax_, gsum_, col_, slash_, coltmp_, qpool_, kpool_;
};

}  // namespace mprefill::gpu
