// Offline per-head pattern search (MInference-style, kernel-aware) on one calibration
// prompt: for every (layer, query head), candidates of each pattern sized to the same
// kernel cost, counted in computed 64x64 tiles on the indices the real estimators and
// index builder produce for this prompt; each scored against the head's dense attention;
// per head the best candidate is chosen and written as an MInference JSON config.
//
// Kernel cost (tiles, as the sparse kernels compute them; a partly covered tile counts):
//   vertical-slash: vs_mask_tiles(vs_build_index(selection)), selection from the real
//                   estimator (vs_row_stats + vs_scores on the last 64 queries, vs_select)
//   block-sparse:   listed key blocks of block_sparse_estimate's index
//   A-shape:        per query block the kernel's ranges [0, min(n_init, m1)) and
//                   [max(m0 - n_local + 1, 0), m1) (one range when they touch), each in
//                   ceil(len / 64) pieces (kernels/cuda/sparse/sparse_fwd_kernel.cuh)
//   dense:          causal tiles, nb (nb + 1) / 2
// Scores, from the head's dense causal softmax P (fp32 logits as the kernels compute them,
// softmax in fp64):
//   recall    = mean over ALL query rows r of sum_{c in mask(r)} P[r][c] / sum_{c <= r} P[r][c]
//               (the captured softmax mass; exactly 1 for a mask that covers every causal key)
//   rel_error = ||O_mask - O_dense||_F / ||O_dense||_F over a sample of query rows (every row
//               when N <= error_rows, else rows N i / error_rows - 1, i = 1..error_rows:
//               evenly spaced, the last row included), O_mask = the renormalised softmax over the
//               mask, i.e. what the sparse kernel outputs (tests/cpu/pattern_search_test.cc checks
//               it against the kernels).
//   max_error = max |O_mask - O_dense| / max |O_dense| over the same rows (the online
//               audit's output_rel_error, engine/audit.h; same row primitives).
// Selection per head and budget: highest recall among that budget's candidates, ties
// (|d recall| <= 1e-9) to the lower error. The dense reference candidate is listed but
// never chosen (MInference's format has no dense pattern).
#pragma once
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "engine/engine.h"
#include "engine/mask_score.h"
#include "model/sparse_policy.h"
#include "model/weights.h"
#include "search/png.h"

namespace mprefill {

struct SearchOptions {
  // Tile budgets: a value in (0, 1] is a fraction of the causal tiles at the calibration
  // length, a value > 1 an absolute tile count (rounded down).
  std::vector<double> budgets = {0.3};
  std::vector<int> ashape_sinks = {64, 128, 256};  // A-shape n_init candidates
  // Vertical-slash shapes: share of the scale t given to the vertical budget,
  // v = 30 + share * t, s = 50 + (1 - share) * t; t is the largest that fits the budget,
  // found by bisection (tiles grow with t up to merges of touching windows, which can drop
  // a tile, so a slightly larger t may also fit; the result always fits).
  std::vector<double> vs_vertical_shares = {0.1, 0.5, 0.9};
  int error_rows = 128;  // query rows sampled for rel_error (0: all)
  // (layer, head) pairs whose heatmap is rendered (chosen mask of budget 0).
  std::vector<std::pair<int, int>> heatmap_heads;
  int heatmap_size = 256;  // pixels per side (at most N)
  // Called after each layer (progress); may be empty.
  std::function<void(int layer, int n_layers)> progress;

  // Throws std::runtime_error naming the bad field.
  void validate() const;
};

struct Candidate {
  HeadPattern pattern;
  int budget = -1;  // index into SearchResult::budget_tiles; -1: the dense reference
  int shape = 0;    // A-shape: index into ashape_sinks; vertical-slash: vs_vertical_shares
  int64_t tiles = 0;
  double density = 0;  // tiles / causal tiles
  double recall = 0;
  double rel_error = 0;
  double max_error = 0;  // max |O_mask - O_dense| / max |O_dense| over the rel_error rows
};

struct HeadSearch {
  int layer = 0, head = 0;
  std::vector<Candidate> candidates;
  std::vector<int> chosen;     // [budget] index into candidates, -1 when none fits
  std::vector<int> runner_up;  // [budget] second best, -1 when none
};

struct Heatmap {
  int layer = 0, head = 0;
  Candidate chosen;
  RgbImage image;
};

struct SearchResult {
  int64_t seq_len = 0;
  int64_t causal_tiles = 0;
  int n_layers = 0, n_heads = 0;
  std::vector<int64_t> budget_tiles;  // [budget]
  std::vector<HeadSearch> heads;      // [n_layers * n_heads], layer-major
  std::vector<Heatmap> heatmaps;
  double seconds = 0;

  const HeadSearch& at(int layer, int head) const {
    return heads.at(static_cast<size_t>(layer) * n_heads + head);
  }
  // The chosen patterns of one budget as a policy (heads with no fitting candidate run
  // block_sparse(1), the cheapest pattern). Throws when budget is out of range.
  SparsePolicy policy(int budget) const;
};

// Dense fp32 forward of a prompt: the one CPU layer forward (engine/cpu_local.h
// local_forward, with K / V in one reused layer buffer instead of a cache), handing each
// layer's Q (after RoPE) [N][q_dim], K (after RoPE) and V [N][kv_dim] to fn before the
// layer's attention. Returns the logits of the last row, bit-identical to a dense
// Engine::prefill's (tests/mpi/dist_engine_one_rank_test.cc). No length limit (the calibration
// prompt may exceed max_position).
std::vector<float> capture_qkv(
    const ModelWeights& w, const std::vector<int>& ids,
    const std::function<void(int layer, const float* q, const float* k, const float* v)>& fn);

// Runs the search on a calibration prompt. Throws std::runtime_error on bad input
// (empty prompt, ids out of range, prompt shorter than 2 blocks, bad options).
SearchResult search_patterns(const ModelWeights& w, const std::vector<int>& ids,
                             const SearchOptions& opt);

// The search of one head: q rows [n] (after RoPE) of stride q_stride, k and v rows of
// stride kv_stride, budgets in tiles. When heatmap is given it receives the rendering
// with the chosen mask of budget 0 (left empty when nothing fits). layer / head of the
// result are 0. Throws std::runtime_error for n < 128 or bad options.
HeadSearch search_head(const float* q, int64_t q_stride, const float* k, const float* v,
                       int64_t kv_stride, int64_t n, int head_dim,
                       const std::vector<int64_t>& budget_tiles, const SearchOptions& opt,
                       RgbImage* heatmap = nullptr);

// MInference JSON of one budget's chosen patterns: a list per layer of
// {"head": [pattern, a, b, recall]} (block_sparse's b is 0).
std::string minference_json(const SearchResult& r, int budget);
// CSV: header, then one row per candidate:
// layer,head,pattern,a,b,budget_tiles,tiles,density,recall,rel_error,choice
// (choice: chosen | runner_up | empty; the dense reference has budget_tiles = causal tiles).
std::string search_csv(const SearchResult& r);

// Tile counts (see the header comment). ashape_tiles matches the kernel's ranges.
int64_t ashape_tiles(int n_init, int n_local, int64_t n);
int64_t dense_tiles(int64_t n);
int64_t block_sparse_tiles(const std::vector<int>& blocks, int topk);

// Tile density of the masks of a filled prefill plan under a policy at n tokens:
// sum over heads of computed tiles / (heads * causal tiles). Dense heads count as
// causal tiles, A-shape by ashape_tiles, the others by their estimated indices.
double plan_tile_density(const PrefillPlan& plan, const SparsePolicy& policy, int n_heads);

// Every head's budgets times one factor f in (0, 1] (A-shape n_init, n_local >= 1;
// vertical-slash v, s; block-sparse k >= 1; dense heads stay dense).
SparsePolicy scale_policy(const SparsePolicy& p, double f);

// The policy with budgets scaled by the largest f (bisection, 30 steps) whose masks,
// estimated by the real estimators on the dense forward of ids, have a mean tile
// density <= target (dense heads count 1). *factor gets f (1 when already within).
// Throws std::runtime_error when even the smallest budgets exceed target.
SparsePolicy scale_policy_to_density(const ModelWeights& w, const std::vector<int>& ids,
                                     const SparsePolicy& p, double target, double* factor);

}  // namespace mprefill
