#include "model/sparse_policy.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <tuple>

namespace mprefill {
namespace {

std::runtime_error policy_error(const std::string& name, const std::string& what) {
  return std::runtime_error("config " + name + ": " + what);
}

// A JSON number that must be a whole number in [lo, 2^31).
int whole_number(const nlohmann::json& v, const std::string& name, const std::string& where,
                 const char* field, int lo) {
  if (!v.is_number())
    throw policy_error(name, where + ": " + field + " must be a number, got " + v.dump());
  const double d = v.get<double>();
  if (!std::isfinite(d) || d != std::floor(d) || d < lo || d > 2147483647.0)
    throw policy_error(name, where + ": " + field + " must be a whole number >= " +
                                 std::to_string(lo) + ", got " + v.dump());
  return static_cast<int>(d);
}

}  // namespace

const char* to_string(PatternKind k) {
  switch (k) {
    case PatternKind::kDense:
      return "dense";
    case PatternKind::kAShape:
      return "a_shape";
    case PatternKind::kVerticalSlash:
      return "vertical_slash";
    case PatternKind::kBlockSparse:
      return "block_sparse";
  }
  return "unknown";
}

HeadPattern SparsePolicy::at(int layer, int head, int64_t n) const {
  if (heads.empty() || n < dense_below) return HeadPattern::dense();
  return heads.at(static_cast<size_t>(layer) * n_heads + head);
}

bool SparsePolicy::all_dense(int64_t n) const {
  if (heads.empty() || n < dense_below) return true;
  return std::all_of(heads.begin(), heads.end(),
                     [](const HeadPattern& p) { return p.kind == PatternKind::kDense; });
}

void SparsePolicy::check_model(const ModelConfig& cfg) const {
  if (heads.empty()) return;
  if (n_layers != cfg.n_layers || n_heads != cfg.n_heads)
    throw std::runtime_error("sparse policy " + source + " has " + std::to_string(n_layers) +
                             " layers x " + std::to_string(n_heads) + " heads but the model has " +
                             std::to_string(cfg.n_layers) + " layers x " +
                             std::to_string(cfg.n_heads) + " query heads");
  if (heads.size() != static_cast<size_t>(n_layers) * n_heads)
    throw std::runtime_error("sparse policy " + source + ": head table has the wrong size");
}

std::vector<PatternCount> SparsePolicy::summary() const {
  std::vector<PatternCount> out;
  if (heads.empty()) return out;
  std::map<std::tuple<int, int, int>, int> counts;
  for (const HeadPattern& p : heads) ++counts[{static_cast<int>(p.kind), p.a, p.b}];
  for (const auto& [key, c] : counts) {
    const auto [k, a, b] = key;
    out.push_back({HeadPattern{static_cast<PatternKind>(k), a, b}, c});
  }
  std::stable_sort(out.begin(), out.end(),
                   [](const PatternCount& x, const PatternCount& y) { return x.count > y.count; });
  return out;
}

std::string SparsePolicy::summary_string() const {
  std::ostringstream s;
  s << source << " (dense below " << dense_below << " tokens)";
  if (heads.empty()) {
    s << ": all heads dense";
    return s.str();
  }
  s << ":";
  bool first = true;
  for (const PatternCount& c : summary()) {
    s << (first ? " " : ", ") << to_string(c.pattern.kind);
    switch (c.pattern.kind) {
      case PatternKind::kDense:
        break;
      case PatternKind::kBlockSparse:
        s << "(" << c.pattern.a << ")";
        break;
      default:
        s << "(" << c.pattern.a << "," << c.pattern.b << ")";
    }
    s << " x" << c.count;
    first = false;
  }
  return s.str();
}

SparsePolicy SparsePolicy::dense(int64_t dense_below) {
  SparsePolicy p;
  p.source = "dense";
  p.dense_below = dense_below;
  return p;
}

SparsePolicy SparsePolicy::uniform(const ModelConfig& cfg, HeadPattern pattern,
                                   int64_t dense_below) {
  SparsePolicy p;
  p.source = "uniform";
  p.n_layers = cfg.n_layers;
  p.n_heads = cfg.n_heads;
  p.heads.assign(static_cast<size_t>(cfg.n_layers) * cfg.n_heads, pattern);
  p.dense_below = dense_below;
  return p;
}

SparsePolicy parse_minference_config(const std::string& json_text, const std::string& name,
                                     const ModelConfig& cfg) {
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(json_text);
  } catch (const nlohmann::json::exception& e) {
    throw policy_error(name, std::string("not valid JSON (") + e.what() + ")");
  }
  if (!doc.is_array()) throw policy_error(name, "expected a JSON list with one object per layer");
  if (doc.size() != static_cast<size_t>(cfg.n_layers))
    throw policy_error(name, "has " + std::to_string(doc.size()) + " layers but the model has " +
                                 std::to_string(cfg.n_layers));
  SparsePolicy pol;
  pol.source = name;
  pol.n_layers = cfg.n_layers;
  pol.n_heads = cfg.n_heads;
  pol.heads.resize(static_cast<size_t>(cfg.n_layers) * cfg.n_heads);
  for (int l = 0; l < cfg.n_layers; ++l) {
    const nlohmann::json& layer = doc[l];
    const std::string lw = "layer " + std::to_string(l);
    if (!layer.is_object()) throw policy_error(name, lw + ": expected an object of heads");
    if (layer.size() != static_cast<size_t>(cfg.n_heads))
      throw policy_error(name, lw + " has " + std::to_string(layer.size()) +
                                   " heads but the model has " + std::to_string(cfg.n_heads) +
                                   " query heads");
    std::vector<bool> seen(cfg.n_heads, false);
    for (const auto& [key, val] : layer.items()) {
      int h = -1;
      size_t used = 0;
      try {
        h = std::stoi(key, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != key.size() || h < 0 || h >= cfg.n_heads)
        throw policy_error(name, lw + ": head key '" + key + "' is not a head index in [0, " +
                                     std::to_string(cfg.n_heads) + ")");
      if (seen[h]) throw policy_error(name, lw + ": head " + key + " appears twice");
      seen[h] = true;
      const std::string where = lw + " head " + key;
      if (!val.is_array() || val.size() < 3 || !val[0].is_string())
        throw policy_error(name, where + ": expected [pattern, a, b, score], got " + val.dump());
      const std::string pat = val[0].get<std::string>();
      HeadPattern hp;
      if (pat == "vertical_and_slash") {
        hp = HeadPattern::vertical_slash(whole_number(val[1], name, where, "vertical size", 0),
                                         whole_number(val[2], name, where, "slash size", 0));
      } else if (pat == "stream_llm") {
        hp = HeadPattern::a_shape(whole_number(val[1], name, where, "init size", 0),
                                  whole_number(val[2], name, where, "local window", 1));
      } else if (pat == "block_sparse") {
        hp = HeadPattern::block_sparse(whole_number(val[1], name, where, "top-k", 1));
      } else {
        throw policy_error(name, where + ": unknown pattern '" + pat +
                                     "' (expected vertical_and_slash, stream_llm, block_sparse)");
      }
      pol.heads[static_cast<size_t>(l) * cfg.n_heads + h] = hp;
    }
  }
  return pol;
}

SparsePolicy load_sparse_policy(const std::string& spec, const ModelConfig& cfg,
                                int64_t dense_below) {
  if (dense_below < 0)
    throw std::runtime_error("dense-below must be >= 0, got " + std::to_string(dense_below));
  SparsePolicy pol;
  if (spec == "dense") {
    pol = SparsePolicy::dense(dense_below);
  } else if (spec == "auto") {
    pol = SparsePolicy::uniform(cfg, HeadPattern::vertical_slash(1000, 6096), dense_below);
    pol.source = "auto";
  } else {
    std::ifstream f(spec, std::ios::binary);
    if (!f)
      throw std::runtime_error("sparse config " + spec +
                               ": cannot open (expected dense, auto or a JSON file)");
    std::ostringstream s;
    s << f.rdbuf();
    pol = parse_minference_config(s.str(), spec, cfg);
  }
  pol.dense_below = dense_below;
  return pol;
}

}  // namespace mprefill
