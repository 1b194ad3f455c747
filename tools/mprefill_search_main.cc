// mprefill-search: offline per-head pattern search on a calibration prompt
// (search/pattern_search.h), the recall-per-budget table, and a retrieval evaluation of
// sparse policies through the CPU engine or, with --device cuda[:N], the GPU engine
// (probe model, python/probe/).
//
// Exit status: 0 success; 1 a runtime error (one line "mprefill-search: error: ..." on
// stderr); 2 a usage error (that line plus the usage).
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

#include "engine/engine.h"
#include "kernels/cpu/cpu.h"
#include "model/prompt.h"
#include "model/sparse_policy.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "search/pattern_search.h"
#include "search/png.h"
#include "tools/cli_args.h"
#ifdef MPREFILL_HAVE_GPU_ENGINE
#include "engine/cuda/cuda_backend.h"
#include "kv/cuda/kv_sinks.h"
#endif

namespace {

using mprefill::cli::FlagReader;
using mprefill::cli::one_line;
using mprefill::cli::parse_float;
using mprefill::cli::parse_int;
using mprefill::cli::UsageError;

using namespace mprefill;

const char* kUsage =
    "usage: mprefill-search --model PATH [--tokenizer PATH] --calib FILE --out CONFIG.json\n"
    "                       [--csv REPORT.csv] [--heatmaps DIR [--heatmap-heads L:H,...|all]]\n"
    "                       [--budget-tiles X] [--max-tokens N] [--error-rows N] [--threads N]\n"
    "       mprefill-search --recall-table --model PATH [--tokenizer PATH] --calib FILE\n"
    "                       --budgets X,Y,... --lengths N1,N2,... [--table FILE.md]\n"
    "       mprefill-search --eval-retrieval FILE.jsonl --model PATH --policies 'SPEC;SPEC;...'\n"
    "                       [--json FILE] [--limit N] [--device cpu|cuda[:N]]\n"
    "  --model PATH          HF directory, llama2.c .bin, or random:NAME[:SEED]\n"
    "  --calib FILE          calibration prompt: text (tokenized with --tokenizer, BOS\n"
    "                        prepended) or, without --tokenizer, token ids separated by\n"
    "                        spaces, commas or newlines\n"
    "  --out CONFIG.json     chosen pattern per head, MInference's JSON format\n"
    "  --csv FILE            every candidate: layer,head,pattern,a,b,budget_tiles,tiles,\n"
    "                        density,recall,rel_error,choice\n"
    "  --heatmaps DIR        PNG per head of --heatmap-heads (default all): dense attention\n"
    "                        (log scale, downsampled to 256 x 256) with the chosen mask in cyan\n"
    "  --budget-tiles X      kernel cost of every candidate: a fraction in (0, 1] of the causal\n"
    "                        64x64 tiles, or a tile count > 1 (default 0.3)\n"
    "  --max-tokens N        use the first N tokens of the calibration prompt\n"
    "  --error-rows N        query rows sampled for the output error (default 128, 0 = all)\n"
    "  --recall-table        mean recall per pattern and budget at each length (markdown)\n"
    "  --eval-retrieval F    JSON lines {\"ids\": [...], \"answer\": [...]}: greedy answer "
    "through\n"
    "                        the engine per policy; accuracy and mask tile density per length;\n"
    "                        optional \"checks\": [[P, [...]], ...]: answers after prefills of\n"
    "                        ids[0:P) too (correct iff all are; density averaged, time summed)\n"
    "  --policies SPECS      ';'-separated: dense | auto (v=1000, s=6096 everywhere) | FILE.json "
    "|\n"
    "                        ashape:SINK:LOCAL | vs:V:S | bs:K, each optionally @F: budgets "
    "scaled\n"
    "                        by one factor per prompt so the masks estimated on the dense forward\n"
    "                        have tile density <= F\n"
    "  --device D            --eval-retrieval engine: cpu (default) or cuda[:N] (prefill on GPU\n"
    "                        N, decoding on the CPU engine from the exported KV)\n";

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(s);
  while (std::getline(in, cur, sep)) {
    while (!cur.empty() && std::isspace(static_cast<unsigned char>(cur.front()))) cur.erase(0, 1);
    while (!cur.empty() && std::isspace(static_cast<unsigned char>(cur.back()))) cur.pop_back();
    if (!cur.empty()) out.push_back(cur);
  }
  return out;
}

std::string read_file(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(std::string("cannot open ") + what + " " + path);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot write " + path);
  f << text;
  if (!f) throw std::runtime_error("write failed: " + path);
}

struct Args {
  std::string model, tokenizer, calib, out, csv, heatmaps, heatmap_heads = "all", table, eval,
                                                           policies, json, device = "cpu";
  double budget = 0.3;
  std::string budgets, lengths;
  int64_t max_tokens = 0;
  int error_rows = 128, threads = 0, limit = 0;
  bool recall_table = false, help = false;
};

Args parse(int argc, char** argv) {
  Args a;
  const std::map<std::string, std::string*> text_flags = {{"--model", &a.model},
                                                          {"--tokenizer", &a.tokenizer},
                                                          {"--calib", &a.calib},
                                                          {"--out", &a.out},
                                                          {"--csv", &a.csv},
                                                          {"--heatmaps", &a.heatmaps},
                                                          {"--heatmap-heads", &a.heatmap_heads},
                                                          {"--budgets", &a.budgets},
                                                          {"--lengths", &a.lengths},
                                                          {"--table", &a.table},
                                                          {"--eval-retrieval", &a.eval},
                                                          {"--policies", &a.policies},
                                                          {"--json", &a.json},
                                                          {"--device", &a.device}};
  FlagReader r(argc - 1, argv + 1);  // past the program name
  while (r.next()) {
    const std::string& flag = r.flag();
    if (const auto it = text_flags.find(flag); it != text_flags.end())
      *it->second = r.value();
    else if (flag == "--help" || flag == "-h")
      a.help = true;
    else if (flag == "--recall-table")
      a.recall_table = true;
    else if (flag == "--budget-tiles")
      a.budget = parse_float(flag, r.value());
    else if (flag == "--max-tokens")
      a.max_tokens = parse_int(flag, r.value(), 1, int64_t{1} << 31);
    else if (flag == "--error-rows")
      a.error_rows = static_cast<int>(parse_int(flag, r.value(), 0, 1 << 24));
    else if (flag == "--threads")
      a.threads = static_cast<int>(parse_int(flag, r.value(), 1, 4096));
    else if (flag == "--limit")
      a.limit = static_cast<int>(parse_int(flag, r.value(), 1, 1 << 30));
    else
      throw UsageError("unknown option '" + r.arg() + "'");
  }
  if (a.help) return a;
  if (a.model.empty()) throw UsageError("--model is required");
  if (a.device != "cpu" && a.device != "cuda" && a.device.rfind("cuda:", 0) != 0)
    throw UsageError("--device must be cpu, cuda or cuda:N, got '" + a.device + "'");
  if (a.device != "cpu" && a.eval.empty())
    throw UsageError("--device cuda applies to --eval-retrieval only (the search runs on the CPU)");
  if (!a.eval.empty()) {
    if (a.policies.empty()) throw UsageError("--eval-retrieval needs --policies");
    return a;
  }
  if (a.calib.empty()) throw UsageError("--calib is required");
  if (a.recall_table) {
    if (a.budgets.empty() || a.lengths.empty())
      throw UsageError("--recall-table needs --budgets and --lengths");
  } else if (a.out.empty()) {
    throw UsageError("--out is required");
  }
  if (!(a.budget > 0)) throw UsageError("--budget-tiles must be > 0");
  return a;
}

std::vector<int> calibration_ids(const Args& a, const ModelConfig& cfg) {
  const std::string text = read_file(a.calib, "calibration file");
  std::vector<int> ids;
  if (!a.tokenizer.empty()) {
    const Tokenizer tok = Tokenizer::load(a.tokenizer, cfg.vocab);
    ids = tok.encode(text, true);
  } else {
    std::string norm = text;
    for (char& c : norm)
      if (c == ',' || c == '\n' || c == '\r' || c == '\t') c = ' ';
    for (const std::string& item : split(norm, ' ')) {
      size_t used = 0;
      long long v = -1;
      try {
        v = std::stoll(item, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != item.size())
        throw std::runtime_error("calibration file " + a.calib + " is not a list of token ids ('" +
                                 item.substr(0, 20) + "'); give --tokenizer to read it as text");
      check_token_id(cfg, v, "calibration token id");
      ids.push_back(static_cast<int>(v));
    }
  }
  if (ids.empty()) throw std::runtime_error("calibration file " + a.calib + " has no tokens");
  if (a.max_tokens > 0 && static_cast<int64_t>(ids.size()) > a.max_tokens) ids.resize(a.max_tokens);
  return ids;
}

std::vector<std::pair<int, int>> parse_heads(const std::string& s, const ModelConfig& cfg) {
  std::vector<std::pair<int, int>> out;
  if (s == "all") {
    for (int l = 0; l < cfg.n_layers; ++l)
      for (int h = 0; h < cfg.n_heads; ++h) out.push_back({l, h});
    return out;
  }
  for (const std::string& item : split(s, ',')) {
    const size_t colon = item.find(':');
    if (colon == std::string::npos)
      throw UsageError("--heatmap-heads expects L:H pairs, got '" + item + "'");
    out.push_back(
        {static_cast<int>(parse_int("--heatmap-heads", item.substr(0, colon), 0, 1 << 20)),
         static_cast<int>(parse_int("--heatmap-heads", item.substr(colon + 1), 0, 1 << 20))});
  }
  return out;
}

void progress_line(int l, int n) {
  std::fprintf(stderr, "mprefill-search: layer %d/%d\n", l + 1, n);
}

int run_search(const Args& a, const ModelWeights& w) {
  const std::vector<int> ids = calibration_ids(a, w.config);
  SearchOptions opt;
  opt.budgets = {a.budget};
  opt.error_rows = a.error_rows;
  if (!a.heatmaps.empty()) opt.heatmap_heads = parse_heads(a.heatmap_heads, w.config);
  opt.progress = progress_line;
  if (!a.heatmaps.empty()) std::filesystem::create_directories(a.heatmaps);
  const SearchResult r = search_patterns(w, ids, opt);
  for (const HeadSearch& h : r.heads)
    if (h.chosen[0] < 0)
      throw std::runtime_error(
          "budget of " + std::to_string(r.budget_tiles[0]) + " tiles fits no candidate of layer " +
          std::to_string(h.layer) + " head " + std::to_string(h.head) + " at " +
          std::to_string(r.seq_len) + " tokens (block_sparse(1) alone needs " +
          std::to_string(num_blocks(r.seq_len)) + " tiles); raise --budget-tiles");
  write_file(a.out, minference_json(r, 0));
  if (!a.csv.empty()) write_file(a.csv, search_csv(r));
  for (const Heatmap& h : r.heatmaps) {
    const std::string path =
        a.heatmaps + "/L" + std::to_string(h.layer) + "_H" + std::to_string(h.head) + ".png";
    write_png(path, h.image);
  }
  double recall = 0;
  int64_t tiles = 0;
  std::map<std::string, int> kinds;
  for (const HeadSearch& h : r.heads) {
    if (h.chosen[0] < 0) continue;
    const Candidate& c = h.candidates[h.chosen[0]];
    recall += c.recall;
    tiles += c.tiles;
    ++kinds[to_string(c.pattern.kind)];
  }
  const double nh = static_cast<double>(r.heads.size());
  std::string mix;
  for (const auto& [k, c] : kinds) mix += (mix.empty() ? "" : ", ") + k + " x" + std::to_string(c);
  std::fprintf(stderr,
               "mprefill-search: %lld tokens, budget %lld of %lld causal tiles per head; chosen: "
               "%s; mean recall %.4f, mean density %.3f; %.1f s; wrote %s\n",
               static_cast<long long>(r.seq_len), static_cast<long long>(r.budget_tiles[0]),
               static_cast<long long>(r.causal_tiles), mix.c_str(), recall / nh,
               tiles / (nh * r.causal_tiles), r.seconds, a.out.c_str());
  return 0;
}

int run_recall_table(const Args& a, const ModelWeights& w) {
  const std::vector<int> all = calibration_ids(a, w.config);
  std::vector<double> budgets;
  for (const std::string& b : split(a.budgets, ',')) budgets.push_back(parse_float("--budgets", b));
  std::vector<int64_t> lengths;
  for (const std::string& l : split(a.lengths, ','))
    lengths.push_back(parse_int("--lengths", l, 2 * kBlock, int64_t{1} << 31));
  std::ostringstream md;
  md.setf(std::ios::fixed);
  md.precision(3);
  const char* kinds[] = {"a_shape", "vertical_slash", "block_sparse"};
  for (int64_t n : lengths) {
    if (n > static_cast<int64_t>(all.size()))
      throw std::runtime_error("--lengths " + std::to_string(n) + " is longer than the " +
                               std::to_string(all.size()) + "-token calibration prompt");
    const std::vector<int> ids(all.begin(), all.begin() + n);
    SearchOptions opt;
    opt.budgets = budgets;
    opt.error_rows = a.error_rows;
    const SearchResult r = search_patterns(w, ids, opt);
    md << "\n#### " << n << " tokens (" << r.causal_tiles << " causal tiles per head, "
       << r.heads.size() << " heads; search " << std::setprecision(1) << r.seconds << " s)\n\n"
       << std::setprecision(3);
    md << "| budget (tiles) | A-shape recall | vertical-slash recall | block-sparse recall | "
          "chosen recall | chosen rel. error | chosen mix (A/VS/BS) |\n"
       << "|---|---|---|---|---|---|---|\n";
    for (size_t bi = 0; bi < budgets.size(); ++bi) {
      md << "| " << budgets[bi] << " (" << r.budget_tiles[bi] << ") ";
      for (const char* kind : kinds) {
        double sum = 0;
        int cnt = 0;
        for (const HeadSearch& h : r.heads) {
          double best = -1;
          for (const Candidate& c : h.candidates)
            if (c.budget == static_cast<int>(bi) && std::string(to_string(c.pattern.kind)) == kind)
              best = std::max(best, c.recall);
          if (best >= 0) {
            sum += best;
            ++cnt;
          }
        }
        if (cnt == static_cast<int>(r.heads.size()))
          md << "| " << sum / cnt << " ";
        else
          md << "| " << (cnt ? std::to_string(cnt) + " heads fit" : std::string("does not fit"))
             << " ";
      }
      double rec = 0, err = 0;
      int mix[4] = {};
      for (const HeadSearch& h : r.heads) {
        if (h.chosen[bi] < 0) continue;
        const Candidate& c = h.candidates[h.chosen[bi]];
        rec += c.recall;
        err += c.rel_error;
        ++mix[static_cast<int>(c.pattern.kind)];
      }
      const double nh = static_cast<double>(r.heads.size());
      md << "| " << rec / nh << " | " << err / nh << " | " << mix[1] << "/" << mix[2] << "/"
         << mix[3] << " |\n";
    }
    std::fprintf(stderr, "mprefill-search: %lld tokens done (%.1f s)\n", static_cast<long long>(n),
                 r.seconds);
  }
  if (a.table.empty())
    std::cout << md.str();
  else
    write_file(a.table, md.str());
  return 0;
}

// ---- retrieval evaluation

struct PolicySpec {
  std::string name, base;
  double target = 0;  // > 0: scale budgets to this expected tile density
};

SparsePolicy base_policy(const std::string& spec, const ModelConfig& cfg) {
  auto nums = [&](const std::string& s, size_t count) {
    const std::vector<std::string> parts = split(s, ':');
    if (parts.size() != count + 1) throw UsageError("policy '" + s + "' has the wrong field count");
    std::vector<int> v;
    for (size_t i = 1; i < parts.size(); ++i)
      v.push_back(static_cast<int>(parse_int("--policies", parts[i], 0, 1 << 30)));
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
    if (v[0] < 1) throw UsageError("policy '" + spec + "': top-k must be >= 1");
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
using PrefillFn = std::function<std::vector<float>(const std::vector<int>&, const SparsePolicy&,
                                                   KvCache*, PrefillPlan*)>;

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

int run_eval(const Args& a, const ModelWeights& w) {
  const ModelConfig& cfg = w.config;
  std::vector<PolicySpec> specs;
  for (const std::string& s : split(a.policies, ';')) {
    PolicySpec ps;
    ps.name = s;
    ps.base = s;
    const size_t at = s.rfind('@');
    if (at != std::string::npos) {
      ps.base = s.substr(0, at);
      ps.target = parse_float("--policies", s.substr(at + 1));
      if (!(ps.target > 0 && ps.target <= 1))
        throw UsageError("policy '" + s + "': the density after @ must be in (0, 1]");
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
  PrefillFn prefill = [&](const std::vector<int>& ids, const SparsePolicy& pol, KvCache* cache,
                          PrefillPlan* plan) {
    return engine.prefill(ids, pol, cache, plan, nullptr);
  };
#ifdef MPREFILL_HAVE_GPU_ENGINE
  std::unique_ptr<gpu::CudaBackend> gpu_engine;
  if (a.device != "cpu") {
    gpu::CudaOptions o;
    if (a.device.size() > 5)
      o.device = static_cast<int>(parse_int("--device", a.device.substr(5), 0, 1023));
    if (!gpu::cuda_available())
      throw std::runtime_error("--device cuda: no CUDA device is visible");
    gpu_engine = std::make_unique<gpu::CudaBackend>(nullptr, w, DistTopology{}, o);
    prefill = [&](const std::vector<int>& ids, const SparsePolicy& pol, KvCache* cache,
                  PrefillPlan* plan) {
      if (cache == nullptr) return gpu_engine->prefill(ids, pol, nullptr, plan);
      gpu::HostKvCacheSink sink(cache);
      return gpu_engine->prefill(ids, pol, &sink, plan);
    };
  }
#else
  if (a.device != "cpu")
    throw std::runtime_error(
        "--device cuda: this build has no CUDA engine (configure with -DMPREFILL_CUDA=ON)");
#endif
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
          g.note = one_line(e.what());
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

}  // namespace

int main(int argc, char** argv) {
  try {
    const Args a = parse(argc, argv);
    if (a.help) {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (a.threads > 0) cpu::set_num_threads(a.threads);
    const ModelWeights w = load_model(a.model);
    if (!a.eval.empty()) return run_eval(a, w);
    if (a.recall_table) return run_recall_table(a, w);
    return run_search(a, w);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "mprefill-search: error: %s\n%s", one_line(e.what()).c_str(), kUsage);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mprefill-search: error: %s\n", one_line(e.what()).c_str());
    return 1;
  }
}
