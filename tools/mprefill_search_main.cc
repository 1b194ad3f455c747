// mprefill-search: offline per-head pattern search on a calibration prompt, the
// recall-per-budget table, and a retrieval evaluation of sparse policies (probe model,
// python/probe/). Flags only; the work is search/search_cli.h.
//
// Exit status: 0 success; 1 a runtime error (one line "mprefill-search: error: ..." on
// stderr); 2 a usage error (that line plus the usage).
#include <cstdio>
#include <exception>
#include <map>
#include <string>

#include "search/search_cli.h"
#include "tools/cli_args.h"

namespace {

using mprefill::cli::FlagReader;
using mprefill::cli::one_line;
using mprefill::cli::parse_float;
using mprefill::cli::parse_int;
using mprefill::cli::UsageError;
using Args = mprefill::search::SearchArgs;

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

Args parse(int argc, char** argv, bool* help) {
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
      *help = true;
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
  if (*help) return a;
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

}  // namespace

int main(int argc, char** argv) {
  try {
    bool help = false;
    const Args a = parse(argc, argv, &help);
    if (help) {
      std::fputs(kUsage, stdout);
      return 0;
    }
    return mprefill::search::run_search_cli(a);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "mprefill-search: error: %s\n%s", one_line(e.what()).c_str(), kUsage);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mprefill-search: error: %s\n", one_line(e.what()).c_str());
    return 1;
  }
}
