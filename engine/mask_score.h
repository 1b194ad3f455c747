// Mask scoring primitives: how much of a query row's softmax mass (and of its output) a
// sparse mask keeps. Used online by the head audit (engine/audit.h) and offline by the
// pattern search (search/pattern_search.h), so an audit of every block equals the
// search's scores of the same head and mask.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/sparse.h"
#include "model/sparse_policy.h"
#include "engine/engine.h"

namespace mprefill {

// Weighted sums of one query row over a set of its causal keys, with weights
// w_c = exp(x_c - m) (x_c the scaled fp32 logit, m a reference such as the set's max) or
// the row's dense softmax probabilities (m = 0). Partial sums over disjoint key sets of
// the same row merge exactly (log-sum-exp), so a row whose keys are spread over sequence
// shards is scored by merging the shards' partials.
struct RowPartial {
  double m = -INFINITY;           // reference of the weights; -inf: no key yet
  double s = 0, s_mask = 0;       // sum of weights over all keys / over the mask's keys
  std::vector<double> o, o_mask;  // [d] sum of w v over all / the mask's keys; empty: none
  void merge(const RowPartial& b);
  // Share of the row's softmax mass that the mask captures (1 for an empty row).
  double captured() const { return s > 0 ? s_mask / s : 1.0; }
};

// The partial of `count` keys: w[j] the weight of key j (relative to m), vis[j] != 0 when
// the key is in the mask (vis null: every key), v + j * v_stride its V row of d values
// (v null or d == 0: no outputs).
RowPartial row_partial(const float* w, double m, const uint8_t* vis, int64_t count, const float* v,
                       int64_t v_stride, int d);
RowPartial row_partial(const double* w, double m, const uint8_t* vis, int64_t count, const float* v,
                       int64_t v_stride, int d);

// Output error of a mask over scored rows: O_dense = o / s, O_mask = o_mask / s_mask (the
// renormalised softmax over the mask: what the sparse kernel outputs; 0 for an empty mask).
struct OutputError {
  double sq_diff = 0, sq_dense = 0, max_diff = 0, max_dense = 0;
  void add(const RowPartial& p);  // p finished (all keys merged), with outputs
  double rel_fro() const { return sq_dense > 0 ? std::sqrt(sq_diff / sq_dense) : 0.0; }
  double rel_max() const { return max_dense > 0 ? max_diff / max_dense : 0.0; }
};

// Keys that a head's sparse kernel computes for the query rows of block b,
// [64 b, min(n, 64 b + 64)) (causal cells c <= r only count).
struct BlockKeys {
  PatternKind kind = PatternKind::kDense;
  int n_init = 0, n_local = 0;  // A-shape: c < n_init || r - c < n_local
  std::vector<uint8_t> keys;    // vertical-slash / block-sparse: [min(n, 64 b + 64)]
  bool visible(int64_t r, int64_t c) const {
    switch (kind) {
      case PatternKind::kDense:
        return true;
      case PatternKind::kAShape:
        return c < n_init || r - c < n_local;
      default:
        return keys[c] != 0;
    }
  }
};
// For a head as the engine runs it: A-shape from pattern, vertical-slash from vs_index
// (cpu::vs_build_index({plan.vs}, n), required then), block-sparse from plan.blocks.
BlockKeys block_keys(const HeadPlan& plan, const HeadPattern& pattern, const VsIndex* vs_index,
                     int64_t n, int64_t block);
// Raw fill of block b's key bytes keys[0, min(n, 64 b + 64)) (set to 1, others untouched).
void fill_vs_block_keys(const VsIndex& ix, int64_t block, uint8_t* keys);
void fill_bs_block_keys(const std::vector<int>& blocks, int topk, int64_t n, int64_t block,
                        uint8_t* keys);

}  // namespace mprefill
