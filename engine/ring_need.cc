#include "engine/ring_need.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace mprefill {

RingNeed ring_kv_need(const PrefillPlan& plan, const SparsePolicy& policy, const ModelConfig& cfg,
                      const std::vector<TokenRanges>& layout, int64_t n, int tp) {
  const int sp = static_cast<int>(layout.size());
  const int64_t nb = num_blocks(n);
  if (plan.layers.size() != static_cast<size_t>(cfg.n_layers))
    throw std::runtime_error("ring_kv_need: plan has " + std::to_string(plan.layers.size()) +
                             " layers, the model " + std::to_string(cfg.n_layers));
  if (tp < 1 || cfg.n_kv_heads % tp != 0)
    throw std::runtime_error("ring_kv_need: tp does not divide the KV heads");
  for (int l = 0; l < cfg.n_layers; ++l) {
    if (plan.layers[l].size() != static_cast<size_t>(cfg.n_heads))
      throw std::runtime_error("ring_kv_need: plan layer " + std::to_string(l) + " has " +
                               std::to_string(plan.layers[l].size()) + " heads, the model " +
                               std::to_string(cfg.n_heads));
    for (int h = 0; h < cfg.n_heads; ++h) {
      const HeadPlan& p = plan.layers[l][h];
      if (policy.at(l, h, n).kind == PatternKind::kBlockSparse &&
          (p.topk < 1 || p.blocks.size() != static_cast<size_t>(nb * p.topk)))
        throw std::runtime_error("ring_kv_need: block-sparse plan of layer " + std::to_string(l) +
                                 " head " + std::to_string(h) + " has " +
                                 std::to_string(p.blocks.size()) + " indices, not " +
                                 std::to_string(nb) + " blocks x top-k " + std::to_string(p.topk));
    }
  }
  RingNeed out;
  if (sp < 2) return out;
  const int hpt = cfg.n_heads / tp;  // query heads per tp rank (contiguous KV groups)
  // need[r]: key blocks rank r's queries read, for the current (layer, tp rank).
  std::vector<std::vector<int>> need(sp, std::vector<int>(nb + 1, 0));
  std::vector<char> mark(nb), uni(nb);
  for (int l = 0; l < cfg.n_layers; ++l)
    for (int t = 0; t < tp; ++t) {
      for (int r = 0; r < sp; ++r) {
        std::vector<int>& diff = need[r];  // difference array over key blocks
        std::fill(diff.begin(), diff.end(), 0);
        int64_t qmax = -1;
        for (auto [a, e] : layout[r]) qmax = std::max(qmax, e - 1);
        auto cover = [&](int64_t k0, int64_t k1) {  // keys [k0, k1], clamped
          k0 = std::max<int64_t>(k0, 0);
          k1 = std::min(k1, qmax);
          if (k0 > k1) return;
          ++diff[k0 / kBlock];
          --diff[k1 / kBlock + 1];
        };
        for (int h = t * hpt; h < (t + 1) * hpt; ++h) {
          const HeadPattern hp = policy.at(l, h, n);
          const HeadPlan& p = plan.layers[l][h];
          if (hp.kind == PatternKind::kVerticalSlash) {
            for (int c : p.vs.columns) cover(c, c);
            for (int o : p.vs.offsets)
              for (auto [a, e] : layout[r]) cover(a - o, e - 1 - o);
          } else if (hp.kind == PatternKind::kBlockSparse) {
            for (auto [a, e] : layout[r])
              for (int64_t qb = a / kBlock; qb * kBlock < e; ++qb)
                for (int j = 0; j < p.topk; ++j) {
                  const int kb = p.blocks.at(size_t(qb) * p.topk + j);
                  if (kb >= 0) cover(int64_t(kb) * kBlock, int64_t(kb) * kBlock);
                }
          } else {
            cover(0, qmax);
          }
        }
        int run = 0;  // prefix sums -> 0/1
        for (int64_t b = 0; b < nb; ++b) {
          run += diff[b];
          diff[b] = run > 0;
        }
      }
      for (int src = 0; src < sp; ++src) {
        std::fill(mark.begin(), mark.end(), 0);
        int64_t shard_blocks = 0;
        for (auto [a, e] : layout[src])
          for (int64_t b = a / kBlock; b * kBlock < e; ++b) {
            mark[b] = 1;
            ++shard_blocks;
          }
        for (int k = 1; k < sp; ++k) {  // hop k reaches ranks src+k .. src+sp-1
          std::fill(uni.begin(), uni.end(), 0);
          for (int j = k; j < sp; ++j) {
            const std::vector<int>& nr = need[(src + j) % sp];
            for (int64_t b = 0; b < nb; ++b) uni[b] |= static_cast<char>(nr[b]);
          }
          out.sent_blocks += shard_blocks;
          for (int64_t b = 0; b < nb; ++b) out.needed_blocks += mark[b] && uni[b];
        }
      }
    }
  return out;
}

}  // namespace mprefill
