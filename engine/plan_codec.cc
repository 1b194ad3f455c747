#include "engine/plan_codec.h"

#include <stdexcept>
#include <string>

namespace mprefill {

void encode_head_plan(const HeadPlan& hp, std::vector<int32_t>* out) {
  out->push_back(static_cast<int32_t>(hp.kind));
  if (hp.kind == PatternKind::kVerticalSlash) {
    out->push_back(static_cast<int32_t>(hp.vs.columns.size()));
    out->insert(out->end(), hp.vs.columns.begin(), hp.vs.columns.end());
    out->push_back(static_cast<int32_t>(hp.vs.offsets.size()));
    out->insert(out->end(), hp.vs.offsets.begin(), hp.vs.offsets.end());
  } else if (hp.kind == PatternKind::kBlockSparse) {
    out->push_back(hp.topk);
    out->push_back(static_cast<int32_t>(hp.blocks.size()));
    out->insert(out->end(), hp.blocks.begin(), hp.blocks.end());
  }
}

HeadPlan decode_head_plan(const std::vector<int32_t>& d, size_t* at) {
  auto next = [&]() -> int32_t {
    if (*at >= d.size()) throw std::runtime_error("encoded prefill plan is truncated");
    return d[(*at)++];
  };
  auto list = [&](std::vector<int>* v) {
    const int32_t n = next();
    if (n < 0 || static_cast<size_t>(n) > d.size() - *at)
      throw std::runtime_error("encoded prefill plan has a bad list length");
    v->assign(d.begin() + *at, d.begin() + *at + n);
    *at += n;
  };
  HeadPlan hp;
  const int32_t kind = next();
  if (kind < 0 || kind > 3) throw std::runtime_error("encoded prefill plan has a bad kind");
  hp.kind = static_cast<PatternKind>(kind);
  if (hp.kind == PatternKind::kVerticalSlash) {
    list(&hp.vs.columns);
    list(&hp.vs.offsets);
  } else if (hp.kind == PatternKind::kBlockSparse) {
    hp.topk = next();
    list(&hp.blocks);
  }
  return hp;
}

std::vector<int32_t> encode_plan(const PrefillPlan& plan) {
  std::vector<int32_t> out;
  out.push_back(static_cast<int32_t>(plan.seq_len & 0x7fffffff));
  out.push_back(static_cast<int32_t>(plan.seq_len >> 31));
  out.push_back(static_cast<int32_t>(plan.layers.size()));
  out.push_back(plan.layers.empty() ? 0 : static_cast<int32_t>(plan.layers[0].size()));
  for (const auto& layer : plan.layers) {
    if (layer.size() != plan.layers[0].size())
      throw std::runtime_error("encode_plan: layers have different head counts");
    for (const auto& hp : layer) encode_head_plan(hp, &out);
  }
  return out;
}

PrefillPlan decode_plan(const std::vector<int32_t>& d) {
  if (d.size() < 4) throw std::runtime_error("encoded prefill plan is truncated");
  PrefillPlan p;
  p.seq_len = int64_t{d[0]} | (int64_t{d[1]} << 31);
  const int32_t layers = d[2], heads = d[3];
  if (layers < 0 || heads < 0) throw std::runtime_error("encoded prefill plan has bad sizes");
  size_t at = 4;
  p.layers.resize(layers);
  for (auto& layer : p.layers)
    for (int h = 0; h < heads; ++h) layer.push_back(decode_head_plan(d, &at));
  if (at != d.size()) throw std::runtime_error("encoded prefill plan has trailing data");
  return p;
}

void check_prefill_plan(const PrefillPlan& plan, const SparsePolicy& policy, const ModelConfig& cfg,
                        int64_t n, const PlanCheck& rules) {
  const std::string& w = rules.prefix;
  if (plan.seq_len != n)
    throw std::runtime_error(w + "prefill plan is for " + std::to_string(plan.seq_len) +
                             " tokens, the prompt has " + std::to_string(n));
  if (plan.layers.size() != static_cast<size_t>(cfg.n_layers))
    throw std::runtime_error(w + "prefill plan has " + std::to_string(plan.layers.size()) +
                             " layers, the model has " + std::to_string(cfg.n_layers));
  const int64_t nb = num_blocks(n);
  for (int l = 0; l < cfg.n_layers; ++l) {
    if (plan.layers[l].size() != static_cast<size_t>(cfg.n_heads))
      throw std::runtime_error(w + "prefill plan layer " + std::to_string(l) + " has " +
                               std::to_string(plan.layers[l].size()) + " heads, the model has " +
                               std::to_string(cfg.n_heads));
    for (int h = 0; h < cfg.n_heads; ++h) {
      const HeadPlan& hp = plan.layers[l][h];
      const std::string where =
          w + "prefill plan layer " + std::to_string(l) + " head " + std::to_string(h);
      const PatternKind want = policy.at(l, h, n).kind;
      if (hp.kind != want)
        throw std::runtime_error(where + " is " + to_string(hp.kind) + " but the policy says " +
                                 to_string(want));
      const bool planned =
          hp.kind == PatternKind::kVerticalSlash
              ? !hp.vs.offsets.empty()
              : hp.kind == PatternKind::kBlockSparse && hp.topk >= 1 && !hp.blocks.empty();
      const bool sparse =
          hp.kind == PatternKind::kVerticalSlash || hp.kind == PatternKind::kBlockSparse;
      if (sparse && !planned) {
        if (rules.allow_unplanned) continue;
        throw std::runtime_error(where + " has no " + to_string(hp.kind) + " indices");
      }
      if (hp.kind == PatternKind::kVerticalSlash) {
        const auto& c = hp.vs.columns;
        const auto& o = hp.vs.offsets;
        bool ok = o.back() == 0;
        for (size_t i = 0; ok && i < c.size(); ++i)
          ok = c[i] >= 0 && c[i] < n && (i == 0 || c[i - 1] < c[i]);
        for (size_t i = 0; ok && i < o.size(); ++i)
          ok = o[i] >= 0 && o[i] < n && (i == 0 || o[i - 1] > o[i]);
        if (!ok)
          throw std::runtime_error(where +
                                   ": vertical-slash selection must have ascending columns and "
                                   "descending offsets in [0, N), offset 0 included");
      } else if (hp.kind == PatternKind::kBlockSparse) {
        bool ok = static_cast<int64_t>(hp.blocks.size()) == nb * hp.topk;
        for (int64_t b = 0; ok && b < nb; ++b) {
          int prev = -1;
          bool pad = false, diag = false;
          for (int j = 0; ok && j < hp.topk; ++j) {
            const int x = hp.blocks[b * hp.topk + j];
            ok = x >= -1 && x <= b;
            if (x == -1) {
              pad = true;
            } else if (rules.ascending_blocks) {
              ok = ok && !pad && x > prev;
              prev = x;
            }
            diag = diag || x == b;
          }
          ok = ok && (diag || !rules.diagonal_block);
        }
        if (!ok)
          throw std::runtime_error(where + ": block list must be [" + std::to_string(nb) +
                                   "][topk] with entries in " + "[-1, query block]" +
                                   (rules.ascending_blocks ? ", ascending then -1 padded" : "") +
                                   (rules.diagonal_block ? ", the diagonal block included" : ""));
      }
    }
  }
}

}  // namespace mprefill
