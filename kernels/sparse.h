// Sparse attention patterns (MInference): A-shape, vertical-slash, block-sparse.
// Exact definitions (../shared/BENCHMARKS.md); every backend computes these masks
// cell for cell. N is the GLOBAL sequence length; query block b covers global rows
// [m0, m1) = [64 b, min(64 b + 64, N)).
//
// A-shape (stream_llm): key c visible to row r iff c <= r && (c < n_init || r - c < n_local).
//
// Vertical-slash: a selection = vertical columns (ascending) + slash offsets d = r - c
// (descending, 0 always present). The key set of block b is the union of
//   - for every offset d < m1: the column window [max(m1 - d, 64) - 64, max(m1 - d, 64)),
//   - every vertical column c < m1,
// and each row r of the block attends the keys of that set with c <= r. The INDEX of
// block b is that set in canonical form: maximal disjoint column ranges [lo, hi),
// ascending, clipped to [0, m1), with hi < next lo (touching windows are merged), plus
// the vertical columns that fall in no range, ascending.
//
// Block-sparse: per query block b, up to k key blocks j <= b (ascending, -1 padded);
// block b always includes j = b. Row r attends key c iff c's block is listed and c <= r.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/attention.h"

namespace mprefill {

inline int64_t num_blocks(int64_t n) { return (n + kBlock - 1) / kBlock; }

// Block-sparse antidiagonal scoring (XAttention): a stride S divides the 64-token block, so
// no strided row or column straddles two blocks; 8 is the paper's default for 64-128 blocks.
constexpr int kDefaultAntidiagStride = 8;
inline bool valid_antidiag_stride(int s) { return s >= 1 && s <= kBlock && kBlock % s == 0; }

// ---------------------------------------------------------------- selections
// What estimation chooses for one query head (and what index files store).
struct VsSelection {
  std::vector<int> columns;  // ascending, distinct, in [0, N)
  std::vector<int> offsets;  // descending, distinct, in [0, N), contains 0
};

// Budgets are clamped as MInference does: v = min(N, max(v, 30)), s = min(N, max(s, 50)).
constexpr int kForcedColumns = 30;   // columns 0..29 always chosen
constexpr int kForcedOffsets = 100;  // offsets 0..99 always chosen (subject to the s budget)
constexpr int kMinVertical = 30;
constexpr int kMinSlash = 50;
int clamp_vertical_budget(int v, int64_t n);
int clamp_slash_budget(int s, int64_t n);

// ---------------------------------------------------------------- VS index (CSR)
// Canonical per-block index of a vertical-slash mask, for H heads, concatenated
// (head-major). Offsets in *_ptr are absolute into the value arrays, so one head can
// be viewed by offsetting the ptr arrays alone.
struct VsIndex {
  int64_t seq_len = 0;  // global N
  int num_heads = 0;
  int64_t nblocks = 0;                  // ceil(N / 64)
  std::vector<int64_t> range_ptr;       // [H * nblocks + 1]
  std::vector<int> range_lo, range_hi;  // [range_ptr.back()]
  std::vector<int64_t> col_ptr;         // [H * nblocks + 1]
  std::vector<int> col;                 // [col_ptr.back()]
};

// Non-owning view (what kernels take; device pointers on CUDA).
struct VsIndexView {
  int64_t seq_len = 0;
  int64_t nblocks = 0;
  const int64_t* range_ptr =
      nullptr;  // head h, block b: [range_ptr[h*nblocks+b], range_ptr[h*nblocks+b+1])
  const int* range_lo = nullptr;
  const int* range_hi = nullptr;
  const int64_t* col_ptr = nullptr;
  const int* col = nullptr;
};
VsIndexView view(const VsIndex& ix);

// Work of a head's mask in the 64x64 tiles a kernel computes (a partly covered tile
// counts as one): per query block, each range in 64-column pieces, ceil(len / 64), plus
// the block's gathered vertical columns 64 at a time, ceil(cols / 64). This is the count
// behind ../shared/BENCHMARKS.md's densities (clustered Llama-3-8B mix: 69% / 35% / 13%
// of the causal tiles at 32K / 128K / 512K; tests/cpu/index_sets_test.cc); counting
// grid-aligned key tiles instead gives 81% / 55% / 25%, since scattered verticals touch
// most key tiles. Returns -1 for a head outside [0, num_heads).
int64_t vs_mask_tiles(const VsIndex& ix, int head);

// ---------------------------------------------------------------- block-sparse index
struct BlockSparseIndex {
  int64_t seq_len = 0;
  int num_heads = 0;
  int64_t nblocks = 0;
  int k = 0;                // slots per query block
  std::vector<int> blocks;  // [H][nblocks][k], ascending then -1 padded
};
struct BlockSparseView {
  int64_t seq_len = 0;
  int64_t nblocks = 0;
  int k = 0;
  const int* blocks = nullptr;
};
BlockSparseView view(const BlockSparseIndex& ix);

// ---------------------------------------------------------------- sparse attention params
// Attention restricted to a pattern, for a group of query heads that share the kind.
// The AttentionParams fields keep their meaning; causal must be true. Per-head values
// are indexed by the query head of the call (0..num_heads-1); a caller that works on a
// subset of heads offsets the per-head pointers accordingly.
struct AShapeParams {
  const int* n_init = nullptr;   // [num_heads]
  const int* n_local = nullptr;  // [num_heads]
};

// ---------------------------------------------------------------- estimation
// Vertical-slash scores from the last queries (global rows [N - n_last, N), n_last =
// min(64, N)) against the keys [k_pos0, k_pos0 + n_k) of one shard. Softmax is over all
// N keys of each row, so the row statistics are global: pass 1 gives each shard's
// (max, sum exp(x - max)) per row; the caller combines them across shards
// (combine_row_stats) and pass 2 turns them into probabilities and sums them:
//   col_score[h][j]   += sum_r p[r][k_pos0 + j]             (local columns only)
//   slash_score[h][d] += sum_r p[r][r - d]  for local keys  (d in [0, N))
// Scores are x = scale * q.k for causal cells (c <= r); non-causal cells do not exist.
struct VsEstimateParams {
  const void* q_last = nullptr;  // [n_last] x [num_heads] x [head_dim] (row/head strides)
  const void* k = nullptr;       // [n_k] x [num_kv_heads] x [head_dim]
  int64_t q_row_stride = 0, q_head_stride = 0;
  int64_t k_row_stride = 0, k_head_stride = 0;
  int n_last = 0;       // min(64, N)
  int64_t seq_len = 0;  // global N; query row i is at global position N - n_last + i
  int n_k = 0;
  int64_t k_pos0 = 0;
  int num_heads = 0, num_kv_heads = 0, head_dim = 0;
  float scale = 0.f;
  DType dtype = DType::kF32;
};
struct RowStats {  // [num_heads][n_last]
  std::vector<float> max, sum;
};

// ---------------------------------------------------------------- layer ops
enum class RopeStyle : int {
  kRotateHalf = 0,     // HF Llama: pairs (i, i + d/2)
  kAdjacentPairs = 1,  // llama2.c / Meta: pairs (2i, 2i + 1)
};
struct RopeScaling {
  bool llama3 = false;  // "rope_type": "llama3"
  double factor = 1.0, low_freq_factor = 1.0, high_freq_factor = 4.0;
  double original_max_position = 8192.0;
};
// inv_freq[i] = theta^(-2i/d), i < d/2, then llama3 scaling; all in double.
std::vector<double> rope_inv_freq(int head_dim, double theta, const RopeScaling& scaling);

}  // namespace mprefill
