#include "model/parallel_plan.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>

#include "kernels/sparse.h"

namespace mprefill {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// sum over b in [0, nb) of min(b + 1, width)
double capped_causal_sum(int64_t nb, int64_t width) {
  width = std::max<int64_t>(width, 1);
  const int64_t w = std::min(width, nb);
  return static_cast<double>(w) * (w + 1) / 2 + static_cast<double>(nb - w) * w;
}

void check_tp_size(const ModelConfig& cfg, int tp) {
  if (tp <= 0 || cfg.n_kv_heads % tp != 0)
    throw std::runtime_error("tensor parallel size " + std::to_string(tp) + " must divide the " +
                             std::to_string(cfg.n_kv_heads) + " KV heads of the model");
}

}  // namespace

double expected_tiles(const HeadPattern& p, int64_t n) {
  const int64_t nb = num_blocks(n);
  switch (p.kind) {
    case PatternKind::kDense:
      return capped_causal_sum(nb, nb);
    case PatternKind::kAShape:
      return capped_causal_sum(nb, ceil_div(p.a, kBlock) + ceil_div(p.b, kBlock) + 1);
    case PatternKind::kVerticalSlash:
      return capped_causal_sum(
          nb, clamp_slash_budget(p.b, n) + ceil_div(clamp_vertical_budget(p.a, n), kBlock));
    case PatternKind::kBlockSparse:
      return capped_causal_sum(nb, p.a);
  }
  return 0;
}

double TpPlan::imbalance() const {
  double max_sum = 0, mean_sum = 0;
  for (const auto& layer : cost) {
    if (layer.empty()) continue;
    max_sum += *std::max_element(layer.begin(), layer.end());
    mean_sum += std::accumulate(layer.begin(), layer.end(), 0.0) / layer.size();
  }
  return mean_sum > 0 ? max_sum / mean_sum : 1.0;
}

TpPlan plan_tensor_parallel(const ModelConfig& cfg, const SparsePolicy& policy, int64_t n, int tp) {
  check_tp_size(cfg, tp);
  const int group = cfg.n_heads / cfg.n_kv_heads, slots = cfg.n_kv_heads / tp;
  TpPlan plan;
  plan.tp = tp;
  plan.kv_heads.resize(cfg.n_layers);
  plan.cost.resize(cfg.n_layers);
  for (int l = 0; l < cfg.n_layers; ++l) {
    std::vector<double> gcost(cfg.n_kv_heads, 0.0);
    for (int h = 0; h < cfg.n_heads; ++h) gcost[h / group] += expected_tiles(policy.at(l, h, n), n);
    std::vector<int> order(cfg.n_kv_heads);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return gcost[a] > gcost[b]; });
    auto& ranks = plan.kv_heads[l];
    auto& load = plan.cost[l];
    ranks.assign(tp, {});
    load.assign(tp, 0.0);
    for (int g : order) {
      int best = -1;
      for (int r = 0; r < tp; ++r)
        if (static_cast<int>(ranks[r].size()) < slots && (best < 0 || load[r] < load[best]))
          best = r;
      ranks[best].push_back(g);
      load[best] += gcost[g];
    }
    for (auto& r : ranks) std::sort(r.begin(), r.end());
  }
  return plan;
}

TpPlan placement_cost(const TpPlan& placement, const ModelConfig& cfg, const SparsePolicy& policy,
                      int64_t n) {
  const int group = cfg.n_heads / cfg.n_kv_heads;
  TpPlan out = placement;
  out.cost.assign(placement.kv_heads.size(), std::vector<double>(placement.tp, 0.0));
  for (size_t l = 0; l < placement.kv_heads.size(); ++l)
    for (int r = 0; r < placement.tp; ++r)
      for (int g : placement.kv_heads[l][r])
        for (int j = 0; j < group; ++j)
          out.cost[l][r] += expected_tiles(policy.at(static_cast<int>(l), g * group + j, n), n);
  return out;
}

TpPlan contiguous_tensor_parallel(const ModelConfig& cfg, const SparsePolicy& policy, int64_t n,
                                  int tp) {
  check_tp_size(cfg, tp);
  const int slots = cfg.n_kv_heads / tp;
  TpPlan plan;
  plan.tp = tp;
  plan.kv_heads.assign(cfg.n_layers, std::vector<std::vector<int>>(tp));
  for (int l = 0; l < cfg.n_layers; ++l)
    for (int r = 0; r < tp; ++r)
      for (int g = 0; g < slots; ++g) plan.kv_heads[l][r].push_back(r * slots + g);
  return placement_cost(plan, cfg, policy, n);
}

bool is_contiguous(const TpPlan& placement, const ModelConfig& cfg) {
  if (placement.tp <= 0 || cfg.n_kv_heads % placement.tp != 0) return false;
  const int slots = cfg.n_kv_heads / placement.tp;
  if (static_cast<int>(placement.kv_heads.size()) != cfg.n_layers) return false;
  for (const auto& layer : placement.kv_heads) {
    if (static_cast<int>(layer.size()) != placement.tp) return false;
    for (int r = 0; r < placement.tp; ++r) {
      if (static_cast<int>(layer[r].size()) != slots) return false;
      for (int g = 0; g < slots; ++g)
        if (layer[r][g] != r * slots + g) return false;
    }
  }
  return true;
}

void check_tp_placement(const TpPlan& placement, const ModelConfig& cfg, int tp) {
  check_tp_size(cfg, tp);
  const std::string what = "KV-head placement over tp " + std::to_string(tp) + ": ";
  if (placement.tp != tp)
    throw std::runtime_error(what + "it is one over tp " + std::to_string(placement.tp));
  if (static_cast<int>(placement.kv_heads.size()) != cfg.n_layers)
    throw std::runtime_error(what + "it has " + std::to_string(placement.kv_heads.size()) +
                             " layers, the model " + std::to_string(cfg.n_layers));
  const int slots = cfg.n_kv_heads / tp;
  for (int l = 0; l < cfg.n_layers; ++l) {
    const auto& layer = placement.kv_heads[l];
    const std::string at = what + "layer " + std::to_string(l) + ": ";
    if (static_cast<int>(layer.size()) != tp)
      throw std::runtime_error(at + std::to_string(layer.size()) + " ranks");
    std::vector<char> seen(cfg.n_kv_heads, 0);
    for (int r = 0; r < tp; ++r) {
      if (static_cast<int>(layer[r].size()) != slots)
        throw std::runtime_error(at + "rank " + std::to_string(r) + " holds " +
                                 std::to_string(layer[r].size()) + " KV heads, not " +
                                 std::to_string(slots));
      for (size_t i = 0; i < layer[r].size(); ++i) {
        const int g = layer[r][i];
        if (g < 0 || g >= cfg.n_kv_heads)
          throw std::runtime_error(at + "KV head " + std::to_string(g) + " is not one of 0.." +
                                   std::to_string(cfg.n_kv_heads - 1));
        if (i > 0 && g <= layer[r][i - 1])
          throw std::runtime_error(at + "rank " + std::to_string(r) +
                                   "'s KV heads are not ascending");
        if (seen[g]++)
          throw std::runtime_error(at + "KV head " + std::to_string(g) + " is placed twice");
      }
    }
  }
}

TpPlan place_kv_heads(const ModelConfig& cfg, const SparsePolicy& policy, int64_t n, int tp,
                      const TpPlan* current, bool any, double threshold) {
  if (!any) return contiguous_tensor_parallel(cfg, policy, n, tp);
  TpPlan base;
  if (current) {
    check_tp_placement(*current, cfg, tp);
    base = placement_cost(*current, cfg, policy, n);
  } else {
    base = contiguous_tensor_parallel(cfg, policy, n, tp);
  }
  if (base.imbalance() <= threshold) return base;
  TpPlan want = plan_tensor_parallel(cfg, policy, n, tp);
  return want.imbalance() < base.imbalance() ? want : base;
}

void check_sp_layout(const std::vector<TokenRanges>& layout, int64_t n, int sp) {
  const std::string what =
      "token layout for " + std::to_string(n) + " tokens over sp " + std::to_string(sp) + ": ";
  if (static_cast<int>(layout.size()) != sp)
    throw std::runtime_error(what + "it has " + std::to_string(layout.size()) + " sp shards");
  std::vector<std::pair<int64_t, int64_t>> all;
  for (int r = 0; r < sp; ++r) {
    int64_t prev_end = -1;
    for (const auto& [b, e] : layout[r]) {
      const std::string range = "sp rank " + std::to_string(r) + " range [" + std::to_string(b) +
                                ", " + std::to_string(e) + ")";
      if (b < 0 || e > n || b >= e)
        throw std::runtime_error(what + range + " is empty or outside the prompt");
      if (b % kBlock != 0 || (e % kBlock != 0 && e != n))
        throw std::runtime_error(what + range + " does not fall on " + std::to_string(kBlock) +
                                 "-token block edges");
      if (b < prev_end) throw std::runtime_error(what + range + " is not in ascending order");
      prev_end = e;
      all.emplace_back(b, e);
    }
  }
  std::sort(all.begin(), all.end());
  int64_t at = 0;
  for (const auto& [b, e] : all) {
    if (b != at)
      throw std::runtime_error(what + (b < at
                                           ? "token " + std::to_string(b) + " is held by two ranks"
                                           : "tokens [" + std::to_string(at) + ", " +
                                                 std::to_string(b) + ") are held by no rank"));
    at = e;
  }
  if (at != n)
    throw std::runtime_error(what + "tokens [" + std::to_string(at) + ", " + std::to_string(n) +
                             ") are held by no rank");
}

std::vector<TokenRanges> plan_sequence_parallel(int64_t n, int sp) {
  if (sp <= 0) throw std::runtime_error("sequence parallel size must be positive");
  const int64_t nb = num_blocks(n);
  const int chunks = 2 * sp;
  // Chunk c covers blocks [nb * c / chunks, nb * (c + 1) / chunks).
  auto edge = [&](int c) { return std::min(n, nb * c / chunks * kBlock); };
  std::vector<TokenRanges> out(sp);
  for (int r = 0; r < sp; ++r) {
    for (int c : {r, chunks - 1 - r}) {
      const int64_t b = edge(c), e = edge(c + 1);
      if (b < e) out[r].emplace_back(b, e);
    }
  }
  return out;
}

int64_t causal_tiles(const TokenRanges& rows) {
  int64_t tiles = 0;
  for (auto [b, e] : rows) {
    for (int64_t q = b / kBlock; q < num_blocks(e); ++q) tiles += q + 1;
  }
  return tiles;
}

std::vector<TokenRanges> plan_sequence_parallel_weighted(int64_t n, int sp,
                                                         const std::vector<double>& block_weight) {
  if (sp <= 0) throw std::runtime_error("sequence parallel size must be positive");
  const int64_t nb = num_blocks(n);
  if (static_cast<int64_t>(block_weight.size()) != nb)
    throw std::runtime_error(
        "plan_sequence_parallel_weighted: " + std::to_string(block_weight.size()) +
        " block weights for " + std::to_string(nb) + " blocks");
  // Folded element f in [0, nf): blocks f and nb - 1 - f (one block when they coincide).
  const int64_t nf = (nb + 1) / 2;
  std::vector<double> prefix(nf + 1, 0.0);
  for (int64_t f = 0; f < nf; ++f) {
    const int64_t m = nb - 1 - f;
    prefix[f + 1] = prefix[f] + std::max(0.0, block_weight[f]) +
                    (m != f ? std::max(0.0, block_weight[m]) : 0.0);
  }
  // Cut c (1 <= c < sp) at the folded edge whose prefix is nearest c * total / sp,
  // non-decreasing in c.
  std::vector<int64_t> cut(sp + 1, 0);
  cut[sp] = nf;
  for (int c = 1; c < sp; ++c) {
    const double target = prefix[nf] * c / sp;
    int64_t e = std::lower_bound(prefix.begin(), prefix.end(), target) - prefix.begin();
    e = std::min<int64_t>(e, nf);
    if (e > 0 && target - prefix[e - 1] < prefix[e] - target) --e;
    cut[c] = std::max(cut[c - 1], e);
  }
  auto tok = [&](int64_t block) { return std::min(n, block * kBlock); };
  std::vector<TokenRanges> out(sp);
  for (int r = 0; r < sp; ++r) {
    const int64_t a = cut[r], b = cut[r + 1];
    if (a >= b) continue;
    // Blocks [a, b) and their mirror [nb - b, nb - a); they touch or overlap only at the
    // fold (a folded element of one block when nb is odd).
    const int64_t lo1 = tok(a), hi1 = tok(b);
    const int64_t lo2 = tok(std::max(b, nb - b)), hi2 = tok(nb - a);
    if (lo2 <= hi1) {
      out[r].emplace_back(lo1, std::max(hi1, hi2));
    } else {
      out[r].emplace_back(lo1, hi1);
      if (lo2 < hi2) out[r].emplace_back(lo2, hi2);
    }
  }
  return out;
}

double ranges_weight(const TokenRanges& rows, const std::vector<double>& block_weight) {
  double w = 0;
  for (auto [b, e] : rows)
    for (int64_t q = b / kBlock; q < num_blocks(e) && q < static_cast<int64_t>(block_weight.size());
         ++q)
      w += block_weight[q];
  return w;
}

double layout_imbalance(const std::vector<TokenRanges>& layout,
                        const std::vector<double>& block_weight) {
  if (layout.empty()) return 1.0;
  double mx = 0, sum = 0;
  for (const auto& r : layout) {
    const double w = ranges_weight(r, block_weight);
    mx = std::max(mx, w);
    sum += w;
  }
  return sum > 0 ? mx / (sum / layout.size()) : 1.0;
}

}  // namespace mprefill
