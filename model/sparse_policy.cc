#include "model/sparse_policy.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <vector>

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

// A JSON threshold: a number in (0, 1].
double json_tau(const nlohmann::json& v, const std::string& name, const std::string& where) {
  const double t = v.is_number() ? v.get<double>() : std::nan("");
  if (!(t > 0 && t <= 1))
    throw policy_error(name, where + ": tau must be a number in (0, 1], got " + v.dump());
  return t;
}

// Options of a head, from a fifth element or the top level: {"tau": T, "score": "pooled" |
// "antidiagonal", "stride": S}, each key optional (stride only with score antidiagonal, S
// default 8). given_*: the key was there.
struct HeadOptions {
  bool given_tau = false, given_score = false;
  double tau = 0;
  int stride = 0;  // 0: pooled; S > 0: antidiagonal (block-sparse heads)
};

// The options in v (an object of those keys), or throws naming the bad key or value. The
// top level's object also holds "layers".
HeadOptions head_options(const nlohmann::json& v, const std::string& name, const std::string& where,
                         bool top_level) {
  HeadOptions o;
  if (!top_level && !(v.is_object() && (v.contains("tau") || v.contains("score"))))
    throw policy_error(name, where +
                                 ": expected {\"tau\": T} and/or {\"score\": \"antidiagonal\", "
                                 "\"stride\": S}, got " +
                                 v.dump());
  for (const auto& [key, val] : v.items())
    if (key != "tau" && key != "score" && key != "stride" && !(top_level && key == "layers"))
      throw policy_error(name, where + ": unknown key '" + key + "'");
  if (v.contains("tau")) {
    o.given_tau = true;
    o.tau = json_tau(v["tau"], name, where);
  }
  if (v.contains("score")) {
    const nlohmann::json& sc = v["score"];
    const std::string kind = sc.is_string() ? sc.get<std::string>() : "";
    if (kind != "pooled" && kind != "antidiagonal")
      throw policy_error(
          name, where + ": score must be \"pooled\" or \"antidiagonal\", got " + sc.dump());
    o.given_score = true;
    o.stride = kind == "antidiagonal" ? kDefaultAntidiagStride : 0;
  }
  if (v.contains("stride")) {
    if (o.stride == 0)
      throw policy_error(name, where + ": stride applies to \"score\": \"antidiagonal\" only");
    const nlohmann::json& st = v["stride"];
    const double d = st.is_number() ? st.get<double>() : std::nan("");
    if (!(d >= 1 && d <= kBlock && d == std::floor(d)) ||
        !valid_antidiag_stride(static_cast<int>(d)))
      throw policy_error(name, where +
                                   ": stride must be 1, 2, 4, 8, 16, 32 or 64 (a divisor of the "
                                   "64-token block), got " +
                                   st.dump());
    o.stride = static_cast<int>(d);
  }
  return o;
}

// One head's [pattern, a, b, score(, options)]; the top level's options (defaults) apply
// to the vertical-slash (tau) and block-sparse (tau, score) heads that carry none.
HeadPattern parse_head(const nlohmann::json& val, const std::string& name, const std::string& where,
                       const HeadOptions& defaults) {
  if (!val.is_array() || val.size() < 3 || val.size() > 5 || !val[0].is_string())
    throw policy_error(name, where +
                                 ": expected [pattern, a, b, score] or [pattern, a, b, score, " +
                                 "{\"tau\": T}], got " + val.dump());
  HeadOptions own;
  if (val.size() == 5) own = head_options(val[4], name, where + " element 5", false);
  const double tau = own.given_tau ? own.tau : defaults.tau;
  const std::string pat = val[0].get<std::string>();
  if (pat != "block_sparse" && own.given_score)
    throw policy_error(name, where + ": score and stride apply to block_sparse, not " + pat);
  if (pat == "vertical_and_slash")
    return HeadPattern::vertical_slash(whole_number(val[1], name, where, "vertical size", 0),
                                       whole_number(val[2], name, where, "slash size", 0), tau);
  if (pat == "block_sparse")
    return HeadPattern::block_sparse(whole_number(val[1], name, where, "top-k", 1), tau,
                                     own.given_score ? own.stride : defaults.stride);
  if (pat == "stream_llm") {
    if (own.given_tau)
      throw policy_error(name, where +
                                   ": tau applies to vertical_and_slash and block_sparse, "
                                   "not stream_llm");
    return HeadPattern::a_shape(whole_number(val[1], name, where, "init size", 0),
                                whole_number(val[2], name, where, "local window", 1));
  }
  throw policy_error(name, where + ": unknown pattern '" + pat +
                               "' (expected vertical_and_slash, stream_llm, block_sparse)");
}

// The fields of "NAME:F1:F2..." split at ':'.
std::vector<std::string> spec_fields(const std::string& spec) {
  std::vector<std::string> f;
  for (size_t at = 0;;) {
    const size_t colon = spec.find(':', at);
    f.push_back(spec.substr(at, colon - at));
    if (colon == std::string::npos) break;
    at = colon + 1;
  }
  return f;
}

// A whole number >= 1 from a spec field, or throws "WHERE: WHAT must be ...".
int spec_number(const std::string& text, const std::string& where, const char* what) {
  size_t used = 0;
  long long v = -1;
  try {
    v = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || v < 1 || v > 2147483647LL)
    throw std::runtime_error(where + ": " + what + " must be a whole number >= 1, got '" + text +
                             "'");
  return static_cast<int>(v);
}

// "adaptive:TAU[:V:S]" (spec is "adaptive" or starts with "adaptive:").
SparsePolicy adaptive_policy(const std::string& spec, const ModelConfig& cfg) {
  const std::vector<std::string> f = spec_fields(spec);
  const std::string where = "sparse policy '" + spec + "'";
  if (f[0] != "adaptive" || (f.size() != 2 && f.size() != 4))
    throw std::runtime_error(where + ": expected adaptive:TAU or adaptive:TAU:V:S");
  const double tau = parse_tau(f[1], where);
  int cap[2] = {kAdaptiveVerticalCap, kAdaptiveSlashCap};
  for (size_t i = 2; i < f.size(); ++i) cap[i - 2] = spec_number(f[i], where, i == 2 ? "V" : "S");
  SparsePolicy p = SparsePolicy::uniform(cfg, HeadPattern::vertical_slash(cap[0], cap[1], tau));
  p.source = spec;
  return p;
}

// "xattn:TAU[:K[:S]]" (spec is "xattn" or starts with "xattn:").
SparsePolicy xattn_policy(const std::string& spec, const ModelConfig& cfg) {
  const std::vector<std::string> f = spec_fields(spec);
  const std::string where = "sparse policy '" + spec + "'";
  if (f[0] != "xattn" || f.size() < 2 || f.size() > 4)
    throw std::runtime_error(where + ": expected xattn:TAU, xattn:TAU:K or xattn:TAU:K:S");
  const double tau = parse_tau(f[1], where);
  const int k = f.size() > 2 ? spec_number(f[2], where, "K") : kXattnBlockCap;
  const int stride = f.size() > 3 ? spec_number(f[3], where, "S") : kDefaultAntidiagStride;
  if (!valid_antidiag_stride(stride))
    throw std::runtime_error(where + ": S must be 1, 2, 4, 8, 16, 32 or 64 (a divisor of the " +
                             "64-token block), got '" + f[3] + "'");
  SparsePolicy p = SparsePolicy::uniform(cfg, HeadPattern::block_sparse(k, tau, stride));
  p.source = spec;
  return p;
}

}  // namespace

double parse_tau(const std::string& text, const std::string& where) {
  char* end = nullptr;
  const double t = text.empty() ? std::nan("") : std::strtod(text.c_str(), &end);
  if (text.empty() || end != text.c_str() + text.size() || !(t > 0 && t <= 1))
    throw std::runtime_error(where + ": tau must be a number in (0, 1], got '" + text + "'");
  return t;
}

bool is_builtin_sparse_spec(const std::string& spec) {
  return spec == "dense" || spec == "auto" || spec == "adaptive" ||
         spec.rfind("adaptive:", 0) == 0 || spec == "xattn" || spec.rfind("xattn:", 0) == 0;
}

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

std::string pattern_label(const HeadPattern& p) {
  std::ostringstream s;
  s << to_string(p.kind);
  if (p.kind == PatternKind::kDense) return s.str();
  s << "(" << p.a;
  if (p.kind != PatternKind::kBlockSparse) s << "," << p.b;
  if (p.adaptive()) s << ",tau=" << p.tau;
  if (p.antidiagonal()) s << ",antidiagonal=" << p.stride;
  s << ")";
  return s.str();
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

bool SparsePolicy::any_adaptive() const {
  return std::any_of(heads.begin(), heads.end(), [](const HeadPattern& p) { return p.adaptive(); });
}

bool SparsePolicy::any_antidiagonal() const {
  return std::any_of(heads.begin(), heads.end(),
                     [](const HeadPattern& p) { return p.antidiagonal(); });
}

std::vector<PatternCount> SparsePolicy::summary() const {
  std::vector<PatternCount> out;
  if (heads.empty()) return out;
  std::map<std::tuple<int, int, int, double, int>, int> counts;
  for (const HeadPattern& p : heads)
    ++counts[{static_cast<int>(p.kind), p.a, p.b, p.tau, p.stride}];
  for (const auto& [key, c] : counts) {
    const auto [k, a, b, tau, stride] = key;
    out.push_back({HeadPattern{static_cast<PatternKind>(k), a, b, tau, stride}, c});
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
    s << (first ? " " : ", ") << pattern_label(c.pattern);
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
  // {"tau": T, "score": ..., "stride": S, "layers": [...]}: for every VS / BS head
  HeadOptions defaults;
  if (doc.is_object()) {
    if (!doc.contains("layers"))
      throw policy_error(name,
                         "expected a JSON list with one object per layer, or an object "
                         "{\"layers\": [...], \"tau\": T}");
    defaults = head_options(doc, name, "top level", true);
    nlohmann::json layers = std::move(doc["layers"]);
    doc = std::move(layers);
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
      pol.heads[static_cast<size_t>(l) * cfg.n_heads + h] =
          parse_head(val, name, lw + " head " + key, defaults);
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
  } else if (spec == "adaptive" || spec.rfind("adaptive:", 0) == 0) {
    pol = adaptive_policy(spec, cfg);
  } else if (spec == "xattn" || spec.rfind("xattn:", 0) == 0) {
    pol = xattn_policy(spec, cfg);
  } else {
    std::ifstream f(spec, std::ios::binary);
    if (!f)
      throw std::runtime_error(
          "sparse config " + spec +
          ": cannot open (expected dense, auto, adaptive:TAU[:V:S], xattn:TAU[:K[:S]] or a JSON "
          "file)");
    std::ostringstream s;
    s << f.rdbuf();
    pol = parse_minference_config(s.str(), spec, cfg);
  }
  pol.dense_below = dense_below;
  return pol;
}

}  // namespace mprefill
