#include "search/search_cli.h"

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
#include "kernels/cpu/cpu.h"
#include "model/prompt.h"
#include "model/sparse_policy.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "search/pattern_search.h"
#include "search/png.h"
#include "search/search_cli.h"

namespace mprefill::search {

int run_eval(const SearchArgs& a, const ModelWeights& w);  // eval_retrieval.cc

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

namespace {

std::vector<int> calibration_ids(const SearchArgs& a, const ModelConfig& cfg) {
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
      throw cli::UsageError("--heatmap-heads expects L:H pairs, got '" + item + "'");
    out.push_back(
        {static_cast<int>(cli::parse_int("--heatmap-heads", item.substr(0, colon), 0, 1 << 20)),
         static_cast<int>(cli::parse_int("--heatmap-heads", item.substr(colon + 1), 0, 1 << 20))});
  }
  return out;
}

void progress_line(int l, int n) {
  std::fprintf(stderr, "mprefill-search: layer %d/%d\n", l + 1, n);
}

// The smallest candidate of every head (block_sparse(1): one tile per query block) needs
// num_blocks(n) tiles; a budget below it is refused before any layer is computed.
void check_budget_fits(double budget, int64_t n) {
  const int64_t tiles = budget <= 1.0 ? static_cast<int64_t>(std::floor(budget * dense_tiles(n)))
                                      : static_cast<int64_t>(std::floor(budget));
  if (tiles < num_blocks(n))
    throw std::runtime_error("budget of " + std::to_string(tiles) + " tiles fits no candidate at " +
                             std::to_string(n) + " tokens (block_sparse(1) alone needs " +
                             std::to_string(num_blocks(n)) + " tiles); raise --budget-tiles");
}

int run_search(const SearchArgs& a, const ModelWeights& w) {
  const std::vector<int> ids = calibration_ids(a, w.config);
  check_budget_fits(a.budget, static_cast<int64_t>(ids.size()));
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

int run_recall_table(const SearchArgs& a, const ModelWeights& w) {
  const std::vector<int> all = calibration_ids(a, w.config);
  std::vector<double> budgets;
  for (const std::string& b : split(a.budgets, ','))
    budgets.push_back(cli::parse_float("--budgets", b));
  std::vector<int64_t> lengths;
  for (const std::string& l : split(a.lengths, ','))
    lengths.push_back(cli::parse_int("--lengths", l, 2 * kBlock, int64_t{1} << 31));
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

}  // namespace

int run_search_cli(const SearchArgs& a) {
  if (a.threads > 0) cpu::set_num_threads(a.threads);
  const ModelWeights w = load_model(a.model);
  if (!a.eval.empty()) return run_eval(a, w);
  if (a.recall_table) return run_recall_table(a, w);
  return run_search(a, w);
}

}  // namespace mprefill::search
