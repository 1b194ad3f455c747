// Per-head sparse attention policy of a prefill: for every (layer, query head) a
// pattern and its budgets, plus a length threshold below which everything runs dense.
// Sources: "dense", "auto" (vertical-slash v=1000, s=6096 on every head, MInference's
// common default), "adaptive:TAU[:V:S]" (vertical-slash on every head, adaptive with
// threshold TAU and caps V, S; default caps auto's) or an MInference per-head JSON read
// as-is (configs/minference/README.md: a list of layers, each {"head": [pattern, a, b,
// score]}), optionally with thresholds (the same README: {"tau": T, "layers": [...]}
// and/or a fifth per-head element {"tau": T}; block-sparse heads may score by
// antidiagonals: {"score": "antidiagonal", "stride": S} in the same places).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/sparse.h"  // valid_antidiag_stride, kDefaultAntidiagStride
#include "model/model_config.h"

namespace mprefill {

enum class PatternKind : int { kDense = 0, kAShape = 1, kVerticalSlash = 2, kBlockSparse = 3 };
const char* to_string(PatternKind k);

// a, b by kind: dense (unused), A-shape (n_init, n_local), vertical-slash (v, s),
// block-sparse (top-k key blocks, unused).
// tau (vertical-slash and block-sparse only): 0 = fixed budgets a, b; 0 < tau <= 1 =
// adaptive: per prompt the head keeps the smallest set of columns / offsets (key blocks
// per query block) whose estimated attention mass reaches tau, with a, b as caps, so
// index sizes stay bounded by the budgets (kernels/cpu/cpu.h vs_select,
// block_sparse_estimate).
// stride (block-sparse only): 0 = key blocks scored by mean-pooled 64-token blocks
// (MInference); S > 0 = by the antidiagonal block mass of stride S (XAttention; kernels/
// cpu/cpu.h antidiag_select), valid_antidiag_stride(S).
struct HeadPattern {
  PatternKind kind = PatternKind::kDense;
  int a = 0, b = 0;
  double tau = 0;
  int stride = 0;
  bool adaptive() const { return tau > 0; }
  bool antidiagonal() const { return stride > 0; }
  static HeadPattern dense() { return {}; }
  static HeadPattern a_shape(int n_init, int n_local) {
    return {PatternKind::kAShape, n_init, n_local};
  }
  static HeadPattern vertical_slash(int v, int s, double tau = 0) {
    return {PatternKind::kVerticalSlash, v, s, tau};
  }
  static HeadPattern block_sparse(int topk, double tau = 0, int stride = 0) {
    return {PatternKind::kBlockSparse, topk, 0, tau, stride};
  }
  bool operator==(const HeadPattern&) const = default;
};

// "dense", "a_shape(A,B)", "vertical_slash(A,B)", "block_sparse(A)"; adaptive heads add
// ",tau=T" inside the parentheses: "vertical_slash(1000,6096,tau=0.95)"; antidiagonal
// block-sparse heads ",antidiagonal=S": "block_sparse(100,tau=0.9,antidiagonal=8)".
std::string pattern_label(const HeadPattern& p);

// Budget caps of "adaptive:TAU" without V:S (auto's budgets).
constexpr int kAdaptiveVerticalCap = 1000, kAdaptiveSlashCap = 6096;
// Top-k cap of "xattn:TAU" without K (MInference's block_sparse budget).
constexpr int kXattnBlockCap = 100;

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
  // True when some head is adaptive (tau > 0).
  bool any_adaptive() const;
  // True when some block-sparse head scores by antidiagonals (stride > 0).
  bool any_antidiagonal() const;

  std::vector<PatternCount> summary() const;  // sorted by count (desc), then pattern
  std::string summary_string() const;  // "vertical_slash(1000,6096) x473, ...", adaptive heads
                                       // "vertical_slash(1000,6096,tau=0.95)"

  static SparsePolicy dense(int64_t dense_below = kDefaultDenseBelow);
  static SparsePolicy uniform(const ModelConfig& cfg, HeadPattern p,
                              int64_t dense_below = kDefaultDenseBelow);
};

// An MInference per-head config text. name appears in errors ("config NAME: layer 3
// head 7: ..."). Layer and head counts must match cfg. Throws std::runtime_error.
SparsePolicy parse_minference_config(const std::string& json_text, const std::string& name,
                                     const ModelConfig& cfg);
// "dense" | "auto" | "adaptive:TAU[:V:S]" | "xattn:TAU[:K[:S]]" (block-sparse on every
// head, antidiagonal score of stride S (default 8), threshold TAU, cap K (default 100)) |
// path of an MInference JSON. Throws std::runtime_error (one line naming the spec and the
// bad field).
SparsePolicy load_sparse_policy(const std::string& spec, const ModelConfig& cfg,
                                int64_t dense_below = kDefaultDenseBelow);
// True for the specs load_sparse_policy builds without a file: "dense", "auto",
// "adaptive", "xattn" and any "adaptive:..." / "xattn:..." (well formed or not:
// load_sparse_policy says what is wrong).
bool is_builtin_sparse_spec(const std::string& spec);
// A threshold in (0, 1] from text (a CLI field) or throws "WHERE: tau must be a number in
// (0, 1], got 'TEXT'".
double parse_tau(const std::string& text, const std::string& where);

}  // namespace mprefill
