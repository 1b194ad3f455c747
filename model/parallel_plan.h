// Static parallel plan of one prefill over tp x sp ranks: which KV-head groups each
// tensor-parallel rank computes (per layer, balanced by the per-head sparse cost), and
// which global token ranges each sequence-parallel rank holds (zigzag, causal balance).
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "model/model_config.h"
#include "model/sparse_policy.h"

namespace mprefill {

// Expected 64x64 tiles of one head's mask at n tokens, before estimation (planning
// model): dense = causal tiles; A-shape = per query block min(b + 1, sink + local tiles);
// vertical-slash = per block min(b + 1, s + ceil(v / 64)) (merged windows take at most
// one 64-column piece each, verticals are gathered 64 at a time: vs_mask_tiles);
// block-sparse = per block min(b + 1, k). Exact tiles come from the index.
double expected_tiles(const HeadPattern& p, int64_t n);

struct TpPlan {
  int tp = 1;
  // kv_heads[layer][rank]: the KV heads (ascending) whose query heads rank computes.
  // Every rank gets n_kv_heads / tp of them, so the GEMM shapes are equal.
  std::vector<std::vector<std::vector<int>>> kv_heads;
  std::vector<std::vector<double>> cost;  // [layer][rank] expected tiles
  // sum over layers of max-rank cost / sum over layers of mean-rank cost (>= 1); each
  // layer ends in an all-reduce, so per-layer balance is what counts.
  double imbalance() const;
};

// Throws std::runtime_error when tp does not divide the KV heads. Per layer, groups are
// placed largest-cost first on the least-loaded rank with a free slot (ties: lower rank).
TpPlan plan_tensor_parallel(const ModelConfig& cfg, const SparsePolicy& policy, int64_t n, int tp);

// Rank r holds KV heads [r g, (r + 1) g) of every layer (g = n_kv_heads / tp): the only
// placement the CUDA backend runs, and every group's placement at load time. Costs under
// policy at n tokens. Throws like plan_tensor_parallel.
TpPlan contiguous_tensor_parallel(const ModelConfig& cfg, const SparsePolicy& policy, int64_t n,
                                  int tp);

// The placement's expected tiles per (layer, rank) under policy at n tokens (kv_heads kept).
TpPlan placement_cost(const TpPlan& placement, const ModelConfig& cfg, const SparsePolicy& policy,
                      int64_t n);

// True when placement is contiguous_tensor_parallel's.
bool is_contiguous(const TpPlan& placement, const ModelConfig& cfg);

// Throws std::runtime_error with one line unless placement places cfg's KV heads on tp
// ranks: n_layers entries of tp ranks, each n_kv_heads / tp distinct heads, ascending,
// together every KV head of the layer once.
void check_tp_placement(const TpPlan& placement, const ModelConfig& cfg, int tp);

// The one rule that places KV heads for a prefill (the coordinator runs it per job; an
// executor without a given placement runs it itself): keep `current` (null: contiguous)
// while its expected max/mean over tp ranks under policy at n stays <= threshold; else
// plan_tensor_parallel's placement when it is better. `any`: the executor runs any
// placement (false: the result is contiguous, whatever current is). Costs filled.
TpPlan place_kv_heads(const ModelConfig& cfg, const SparsePolicy& policy, int64_t n, int tp,
                      const TpPlan* current, bool any, double threshold = 1.10);

// Global token ranges [begin, end) held by one sequence-parallel rank, ascending.
using TokenRanges = std::vector<std::pair<int64_t, int64_t>>;

// Zigzag split: the 64-token blocks are cut into 2 sp chunks as equal as possible and
// rank i holds chunks i and 2 sp - 1 - i, so causal work is balanced. Chunk edges fall on
// 64-token block edges (the sparse query blocks are never split between ranks).
std::vector<TokenRanges> plan_sequence_parallel(int64_t n, int sp);

// Throws std::runtime_error with one line unless layout is a token layout of a prompt of
// n tokens over sp ranks: sp entries (a rank may hold none), each rank's ranges ascending
// and non-empty, every edge on a 64-token block edge (or n), every token held by exactly
// one rank. The layouts of plan_sequence_parallel[_weighted] pass.
void check_sp_layout(const std::vector<TokenRanges>& layout, int64_t n, int sp);

// Causal 64x64 tiles of the query rows a rank holds (dense work), for balance reports.
int64_t causal_tiles(const TokenRanges& rows);

// Zigzag split balanced by per-block work: the 64-token blocks are folded (block j pairs
// with block nb - 1 - j, weight w[j] + w[nb - 1 - j]) and the folded sequence is cut into
// sp contiguous parts of near-equal weight (prefix-sum targets i * total / sp), so rank i
// holds blocks [a_i, a_i+1) and their mirror [nb - a_i+1, nb - a_i): the zigzag shape with
// edges moved by the weights. block_weight: [num_blocks(n)] (non-negative). Ranks may get
// no tokens when n is short. Ranges touching in the middle are merged.
std::vector<TokenRanges> plan_sequence_parallel_weighted(int64_t n, int sp,
                                                         const std::vector<double>& block_weight);

// Sum of block_weight over the 64-token blocks of `rows` (64-aligned ranges).
double ranges_weight(const TokenRanges& rows, const std::vector<double>& block_weight);
// max / mean over ranks of ranges_weight (1 when all are zero).
double layout_imbalance(const std::vector<TokenRanges>& layout,
                        const std::vector<double>& block_weight);

}  // namespace mprefill
