#include "tools/generate_report.h"

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "cli/flags.h"

namespace mprefill::cli {

nlohmann::json sparse_json(const SparsePolicy& p, const PrefillStats& st) {
  nlohmann::json patterns = nlohmann::json::array();
  for (const PatternCount& c : p.summary()) {
    nlohmann::json e = {{"pattern", to_string(c.pattern.kind)}, {"heads", c.count}};
    switch (c.pattern.kind) {
      case PatternKind::kAShape:
        e["n_init"] = c.pattern.a;
        e["n_local"] = c.pattern.b;
        break;
      case PatternKind::kVerticalSlash:
        e["v"] = c.pattern.a;
        e["s"] = c.pattern.b;
        break;
      case PatternKind::kBlockSparse:
        e["topk"] = c.pattern.a;
        break;
      case PatternKind::kDense:
        break;
    }
    patterns.push_back(e);
  }
  return {{"source", p.source},
          {"dense_below", p.dense_below},
          {"ran_dense", st.all_dense},
          {"patterns", patterns},
          {"heads_run",
           {{"dense", st.heads_by_kind[0]},
            {"a_shape", st.heads_by_kind[1]},
            {"vertical_slash", st.heads_by_kind[2]},
            {"block_sparse", st.heads_by_kind[3]}}}};
}

std::string ran_summary(const SparsePolicy& p, const PrefillStats& st) {
  if (st.all_dense) {
    if (p.source == "dense") return "dense";
    return "dense on every head (" + std::to_string(st.tokens) + " tokens < --dense-below " +
           std::to_string(p.dense_below) + "; policy: " + one_line(p.source) + ")";
  }
  return heads_summary(
             {st.heads_by_kind[0], st.heads_by_kind[1], st.heads_by_kind[2], st.heads_by_kind[3]}) +
         " (policy: " + one_line(p.source) + ")";
}

std::string heads_summary(const std::array<int64_t, 4>& per_kind) {
  static const char* kNames[] = {"dense", "a_shape", "vertical_slash", "block_sparse"};
  std::string out;
  for (int k : {2, 3, 1, 0}) {
    if (per_kind[k] == 0) continue;
    out += (out.empty() ? "" : ", ") + std::string(kNames[k]) + " x" + std::to_string(per_kind[k]);
  }
  return out;
}

nlohmann::json audit_json(const PrefillStats& st) {
  nlohmann::json out = nlohmann::json::array();
  for (const HeadAuditResult& r : st.audit) {
    nlohmann::json e = {{"layer", r.layer},
                        {"head", r.head},
                        {"pattern", to_string(r.pattern.kind)},
                        {"a", r.pattern.a},
                        {"b", r.pattern.b},
                        {"rows", r.rows},
                        {"recall", r.recall},
                        {"output_rel_error", r.output_rel_error},
                        {"output_rel_error_fro", r.output_rel_error_fro}};
    if (r.pattern.adaptive()) e["tau"] = r.pattern.tau;
    if (r.pattern.antidiagonal()) e["stride"] = r.pattern.stride;
    out.push_back(std::move(e));
  }
  return out;
}

nlohmann::json audit_summary_json(const PrefillStats& st) {
  double sum = 0, lo = 1, asum = 0, alo = 1;
  int adaptive = 0;
  for (const HeadAuditResult& r : st.audit) {
    sum += r.recall;
    lo = std::min(lo, r.recall);
    if (!r.pattern.adaptive()) continue;
    ++adaptive;
    asum += r.recall;
    alo = std::min(alo, r.recall);
  }
  const size_t n = st.audit.size();
  nlohmann::json j = {{"heads", n},
                      {"mean_recall", n ? sum / n : 1.0},
                      {"min_recall", lo},
                      {"adaptive_heads", adaptive}};
  if (adaptive) {
    j["adaptive_mean_recall"] = asum / adaptive;
    j["adaptive_min_recall"] = alo;
  }
  return j;
}

}  // namespace mprefill::cli
