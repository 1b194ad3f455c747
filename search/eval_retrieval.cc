// --eval-retrieval of mprefill-search (search_cli.h).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cli/flags.h"
#include "engine/engine.h"
#include "engine/single_process.h"
#include "kernels/cpu/cpu.h"
#include "model/prompt.h"
#include "model/sparse_policy.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "search/pattern_search.h"
#include "search/png.h"
#include "search/search_cli.h"

namespace mprefill::search {

namespace {

// ---- retrieval evaluation

struct PolicySpec {
  std::string name, base;
  double target = 0;  // > 0: scale budgets to this expected tile density
};

SparsePolicy base_policy(const std::string& spec, const ModelConfig& cfg) {
  auto nums = [&](const std::string& s, size_t count) {
    const std::vector<std::string> parts = split(s, ':');
    if (parts.size() != count + 1)
      throw cli::UsageError("policy '" + s + "' has the wrong field count");
    std::vector<int> v;
    for (size_t i = 1; i < parts.size(); ++i)
      v.push_back(static_cast<int>(cli::parse_int("--policies", parts[i], 0, 1 << 30)));
    return v;
  };
  SparsePolicy p;
  if (spec.rfind("ashape:", 0) == 0) {
    const auto v = nums(spec, 2);
    p = SparsePolicy::uniform(cfg, HeadPattern::a_shape(v[0], v[1]), 0);
  } else if (spec.rfind("vs:", 0) == 0) {
    const auto v = nums(spec, 2);
    p = SparsePolicy::uniform(cfg, HeadPattern::vertical_slash(v[0], v[1]), 0);
  } else if (spec.rfind("bs:", 0) == 0) {
    const auto v = nums(spec, 1);
    if (v[0] < 1) throw cli::UsageError("policy '" + spec + "': top-k must be >= 1");
    p = SparsePolicy::uniform(cfg, HeadPattern::block_sparse(v[0]), 0);
  } else {
    p = load_sparse_policy(spec, cfg, 0);
  }
  p.dense_below = 0;
  p.source = spec;
  return p;
}

// One prefill on the chosen engine: the logits of the last row; the KV into cache (may be
// null: not kept) and the indices the engine estimated into plan.
using PrefillFn = CachePrefill;

// The policy with budgets times the largest f found (geometric bisection on [1e-3, 1],
// 14 steps) whose masks, as the engine estimates them in its own prefill of ids under the
// scaled policy, have a mean tile density <= target. Throws when even f = 1e-3 exceeds it.
SparsePolicy scale_by_engine(const PrefillFn& prefill, const ModelConfig& cfg,
                             const std::vector<int>& ids, const SparsePolicy& p, double target,
                             double* factor) {
  auto density = [&](double f) {
    const SparsePolicy q = scale_policy(p, f);
    PrefillPlan plan;
    prefill(ids, q, nullptr, &plan);
    return plan_tile_density(plan, q, cfg.n_heads);
  };
  *factor = 1.0;
  if (density(1.0) <= target) return p;
  double lo = 1e-3, hi = 1.0;
  const double d_lo = density(lo);
  if (d_lo > target) {
    std::ostringstream m;
    m << "budgets x " << lo << " still keep tile density " << d_lo << " > " << target << " at "
      << ids.size() << " tokens";
    throw std::runtime_error(m.str());
  }
  for (int i = 0; i < 14; ++i) {
    const double mid = std::sqrt(lo * hi);
    (density(mid) <= target ? lo : hi) = mid;
  }
  *factor = lo;
  return scale_policy(p, lo);
}

}  // namespace

int run_eval(const SearchArgs& a, const ModelWeights& w) {
  const ModelConfig& cfg = w.config;
  std::vector<PolicySpec> specs;
  for (const std::string& s : split(a.policies, ';')) {
    PolicySpec ps;
    ps.name = s;
    ps.base = s;
    const size_t at = s.rfind('@');
    if (at != std::string::npos) {
      ps.base = s.substr(0, at);
      ps.target = cli::parse_float("--policies", s.substr(at + 1));
      if (!(ps.target > 0 && ps.target <= 1))
        throw cli::UsageError("policy '" + s + "': the density after @ must be in (0, 1]");
    }
    base_policy(ps.base, cfg);  // validate early
    specs.push_back(ps);
  }
  struct Sample {
    std::vector<int> ids, answer;
    // Further prompts ids[0:P) with their answers (multi-key task of python/probe/).
    std::vector<std::pair<int64_t, std::vector<int>>> checks;
  };
  std::vector<Sample> samples;
  {
    std::istringstream in(read_file(a.eval, "retrieval file"));
    std::string line;
    int lineno = 0;
    while (std::getline(in, line)) {
      ++lineno;
      if (split(line, ' ').empty()) continue;
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
        samples.push_back(
            {j.at("ids").get<std::vector<int>>(), j.at("answer").get<std::vector<int>>(), {}});
        if (j.contains("checks"))
          samples.back().checks =
              j.at("checks").get<std::vector<std::pair<int64_t, std::vector<int>>>>();
      } catch (const nlohmann::json::exception& e) {
        throw std::runtime_error(a.eval + " line " + std::to_string(lineno) +
                                 ": expected {\"ids\": [...], \"answer\": [...]} (" + e.what() +
                                 ")");
      }
      const Sample& s = samples.back();
      if (s.answer.empty())
        throw std::runtime_error(a.eval + " line " + std::to_string(lineno) + ": empty answer");
      for (const auto& [p, ans] : s.checks)
        if (p < 1 || p >= static_cast<int64_t>(s.ids.size()) || ans.empty())
          throw std::runtime_error(a.eval + " line " + std::to_string(lineno) +
                                   ": a check needs a prefix length in [1, " +
                                   std::to_string(s.ids.size()) + ") and a non-empty answer");
      if (a.limit > 0 && static_cast<int>(samples.size()) >= a.limit) break;
    }
  }
  if (samples.empty()) throw std::runtime_error("retrieval file " + a.eval + " has no samples");
  const Engine engine(w);  // prompt checks and decoding (and the prefill on --device cpu)
  // --device cpu | cuda | cuda:N: the backend decision is engine/'s (single_process.h).
  const Backend backend = a.device == "cpu" ? Backend::kCpu : Backend::kCuda;
  const int device = a.device.size() > 5
                         ? static_cast<int>(cli::parse_int("--device", a.device.substr(5), 0, 1023))
                         : 0;
  const PrefillFn prefill = make_cache_prefill(backend, device, engine);
  const bool on_gpu = a.device != "cpu";
  struct Agg {
    int n = 0, correct = 0, run = 0;
    double density = 0, factor = 0, seconds = 0, prefill_seconds = 0;
    std::string note;  // why some samples did not run
  };
  std::map<std::pair<std::string, int64_t>, Agg> agg;
  for (size_t si = 0; si < samples.size(); ++si) {
    const Sample& s = samples[si];
    engine.check_prompt(s.ids, static_cast<int64_t>(s.ids.size()));
    const int64_t n = static_cast<int64_t>(s.ids.size());
    for (const PolicySpec& ps : specs) {
      const auto t0 = std::chrono::steady_clock::now();
      SparsePolicy pol = base_policy(ps.base, cfg);
      double factor = 1.0;
      if (ps.target > 0) {
        try {
          // CPU: masks estimated on the dense forward (fast); GPU: the engine's own
          // prefills under the scaled policy (what then runs).
          pol = on_gpu ? scale_by_engine(prefill, cfg, s.ids, pol, ps.target, &factor)
                       : scale_policy_to_density(w, s.ids, pol, ps.target, &factor);
        } catch (const std::runtime_error& e) {
          // Too short for this density: reported in the table, the other policies run.
          Agg& g = agg[{ps.name, n}];
          ++g.n;
          g.note = cli::one_line(e.what());
          continue;
        }
      }
      // The checks' prefixes, then the whole prompt; the budget factor of @F is the whole
      // prompt's (the prefixes end at most a few queries earlier).
      std::vector<std::pair<int64_t, const std::vector<int>*>> prompts;
      for (const auto& [p, ans] : s.checks) prompts.push_back({p, &ans});
      prompts.push_back({n, &s.answer});
      bool all_correct = true;
      double density = 0, prefill_s = 0;
      for (const auto& [len, answer] : prompts) {
        const std::vector<int> ids(s.ids.begin(), s.ids.begin() + len);
        // On the GPU a one-token answer needs no KV: its export to the host (1 GiB of fp32
        // at 128K) is skipped. The CPU engine's prefill writes into a cache in any case.
        std::unique_ptr<KvCache> cache;
        if (answer->size() > 1 || !on_gpu)
          cache = std::make_unique<KvCache>(cfg, len + static_cast<int64_t>(answer->size()));
        PrefillPlan plan;
        const auto p0 = std::chrono::steady_clock::now();
        std::vector<float> logits = prefill(ids, pol, cache.get(), &plan);
        prefill_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - p0).count();
        std::vector<int> got;
        for (size_t t = 0; t < answer->size(); ++t) {
          const int id =
              static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
          got.push_back(id);
          if (t + 1 < answer->size())
            logits = engine.decode_step(id, len + static_cast<int64_t>(t), cache.get());
        }
        all_correct = all_correct && got == *answer;
        density += plan_tile_density(plan, pol, cfg.n_heads);
      }
      Agg& g = agg[{ps.name, n}];
      ++g.n;
      ++g.run;
      g.correct += all_correct;
      g.density += density / static_cast<double>(prompts.size());
      g.prefill_seconds += prefill_s;
      g.factor += factor;
      g.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    std::fprintf(stderr, "mprefill-search: sample %zu/%zu (%lld tokens) done\n", si + 1,
                 samples.size(), static_cast<long long>(n));
  }
  nlohmann::json rows = nlohmann::json::array();
  std::printf(
      "| policy | tokens | samples | accuracy | tile density | budget factor | s / sample |\n"
      "|---|---|---|---|---|---|---|\n");
  for (const PolicySpec& ps : specs)
    for (const auto& [key, g] : agg) {
      if (key.first != ps.name) continue;
      nlohmann::json row = {
          {"policy", ps.name}, {"tokens", key.second}, {"samples", g.run}, {"device", a.device}};
      if (g.run > 0) {
        const double acc = static_cast<double>(g.correct) / g.run, dens = g.density / g.run;
        std::printf("| %s | %lld | %d | %.3f | %.3f | %.3g | %.2f |\n", ps.name.c_str(),
                    static_cast<long long>(key.second), g.run, acc, dens, g.factor / g.run,
                    g.seconds / g.run);
        row["accuracy"] = acc;
        row["correct"] = g.correct;
        row["tile_density"] = dens;
        row["budget_factor"] = g.factor / g.run;
        row["seconds_per_sample"] = g.seconds / g.run;
        row["prefill_seconds_per_sample"] = g.prefill_seconds / g.run;
      } else {
        std::printf("| %s | %lld | 0 | n/a | n/a | n/a | n/a |\n", ps.name.c_str(),
                    static_cast<long long>(key.second));
      }
      if (!g.note.empty()) {
        std::fprintf(stderr, "mprefill-search: %s at %lld tokens: %d of %d samples skipped: %s\n",
                     ps.name.c_str(), static_cast<long long>(key.second), g.n - g.run, g.n,
                     g.note.c_str());
        row["skipped"] = g.n - g.run;
        row["note"] = g.note;
      }
      rows.push_back(row);
    }
  if (!a.json.empty()) write_file(a.json, rows.dump(1) + "\n");
  return 0;
}

}  // namespace mprefill::search
