#include "bench/bench_budgets.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

#include "model/model_config.h"
#include "model/sparse_policy.h"

namespace mprefill::bench {
namespace {

BudgetHead convert(const HeadPattern& p) { return {to_string(p.kind), p.a, p.b}; }

}  // namespace

BudgetFile read_budget_file(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("budget file " + path + ": cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  const nlohmann::json doc = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (!doc.is_array() || doc.empty() || !doc[0].is_object())
    throw std::runtime_error("budget file " + path +
                             ": not an MInference config (a list of per-layer objects)");
  ModelConfig cfg;
  cfg.n_layers = static_cast<int>(doc.size());
  cfg.n_heads = static_cast<int>(doc[0].size());
  const SparsePolicy pol = load_sparse_policy(path, cfg, /*dense_below=*/0);
  BudgetFile out;
  out.path = path;
  out.n_layers = pol.n_layers;
  out.n_heads = pol.n_heads;
  for (const HeadPattern& h : pol.heads) out.heads.push_back(convert(h));
  for (const PatternCount& c : pol.summary()) out.classes.push_back({convert(c.pattern), c.count});
  return out;
}

}  // namespace mprefill::bench
