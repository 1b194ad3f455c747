// The offline tools of mprefill-search as a library entry point (issue 14: the binary only
// parses flags): the per-head pattern search on a calibration prompt
// (search/pattern_search.h), the recall-per-budget table, and the retrieval evaluation of
// sparse policies through the CPU engine or, with device cuda[:N], the GPU engine.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace mprefill::search {

struct SearchArgs {
  std::string model, tokenizer, calib, out, csv, heatmaps, heatmap_heads = "all", table, eval,
                                                           policies, json, device = "cpu";
  double budget = 0.3;
  std::string budgets, lengths;
  int64_t max_tokens = 0;
  int error_rows = 128, threads = 0, limit = 0;
  bool recall_table = false;
};

// Loads the model and runs the mode the args name (eval when eval is set, the recall table
// when recall_table, else the search). Returns the exit status; throws cli::UsageError
// (cli/flags.h: a bad value inside a list flag such as --budgets, --lengths,
// --heatmap-heads, --policies) or std::runtime_error with one line.
int run_search_cli(const SearchArgs& a);

// Shared by the modes (search_cli.cc, eval_retrieval.cc).
std::vector<std::string> split(const std::string& s, char sep);
std::string read_file(const std::string& path, const char* what);
void write_file(const std::string& path, const std::string& text);

}  // namespace mprefill::search
