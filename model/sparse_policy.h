// Per-head sparse attention policy of a prefill: for every (layer, query head) a
// pattern and its budgets, plus a length threshold below which everything runs dense.
// Sources: "dense", "auto" (vertical-slash v=1000, s=6096 on every head, MInference's
// common default) or an MInference per-head JSON read as-is
// (configs/minference/README.md: a list of layers, each {"head": [pattern, a, b, score]}).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/model_config.h"

namespace mprefill {

enum class PatternKind : int { kDense = 0, kAShape = 1, kVerticalSlash = 2, kBlockSparse = 3 };
const char* to_string(PatternKind k);

// a, b by kind: dense (unused), A-shape (n_init, n_local), vertical-slash (v, s),
// block-sparse (top-k key blocks, unused).
struct HeadPattern {
  PatternKind kind = PatternKind::kDense;
  int a = 0, b = 0;
  static HeadPattern dense() { return {}; }
  static HeadPattern a_shape(int n_init, int n_local) {
    return {PatternKind::kAShape, n_init, n_local};
  }
  static HeadPattern vertical_slash(int v, int s) { return {PatternKind::kVerticalSlash, v, s}; }
  static HeadPattern block_sparse(int topk) { return {PatternKind::kBlockSparse, topk, 0}; }
  bool operator==(const HeadPattern&) const = default;
};

// How many heads use each (kind, a, b), for logs and --json.
struct PatternCount {
  HeadPattern pattern;
  int count = 0;
};

constexpr int64_t kDefaultDenseBelow = 32768;

struct SparsePolicy {
  std::string source = "dense";              // "dense", "auto" or the config path
  int n_layers = 0, n_heads = 0;             // 0 for the all-dense policy (fits any model)
  std::vector<HeadPattern> heads;            // [n_layers][n_heads]; empty: all dense
  int64_t dense_below = kDefaultDenseBelow;  // prompts of fewer tokens run dense everywhere

  // The pattern of (layer, head) for a prompt of n tokens (dense when n < dense_below).
  HeadPattern at(int layer, int head, int64_t n) const;
  // True when a prompt of n tokens runs dense on every head.
  bool all_dense(int64_t n) const;
  // Throws std::runtime_error when the policy does not fit the model's layers / heads.
  void check_model(const ModelConfig& cfg) const;

  std::vector<PatternCount> summary() const;  // sorted by count (desc), then pattern
  std::string summary_string() const;         // "vertical_slash(1000,6096) x473, ..."

  static SparsePolicy dense(int64_t dense_below = kDefaultDenseBelow);
  static SparsePolicy uniform(const ModelConfig& cfg, HeadPattern p,
                              int64_t dense_below = kDefaultDenseBelow);
};

// An MInference per-head config text. name appears in errors ("config NAME: layer 3
// head 7: ..."). Layer and head counts must match cfg. Throws std::runtime_error.
SparsePolicy parse_minference_config(const std::string& json_text, const std::string& name,
                                     const ModelConfig& cfg);
// "dense" | "auto" | path of an MInference JSON. Throws std::runtime_error.
SparsePolicy load_sparse_policy(const std::string& spec, const ModelConfig& cfg,
                                int64_t dense_below = kDefaultDenseBelow);

}  // namespace mprefill
