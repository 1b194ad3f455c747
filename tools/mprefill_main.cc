// mprefill: command-line front end. `mprefill generate` runs the single-process CPU engine
// on a prompt (text through the llama2.c tokenizer, or token ids) and prints the
// continuation, or one JSON object with --json.
//
// Exit status: 0 success; 1 a runtime error (one line "mprefill: error: ..." on stderr);
// 2 a usage error (that line plus a short usage).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "kernels/cpu/cpu.h"
#include "model/sparse_policy.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "tools/cli_args.h"
#ifdef MPREFILL_HAVE_GPU_ENGINE
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_generate.h"
#endif

namespace {

using mprefill::cli::one_line;
using mprefill::cli::parse_int;
using mprefill::cli::UsageError;

using namespace mprefill;

const char* kUsage =
    "usage: mprefill <command> [options]\n"
    "commands:\n"
    "  generate   prefill a prompt and decode a continuation on the CPU engine\n"
    "run 'mprefill generate --help' for its options\n";

const char* kGenerateUsage =
    "usage: mprefill generate --model PATH [--tokenizer PATH]\n"
    "                         (--prompt TEXT | --prompt-ids 1,2,3 | --prompt-file FILE)\n"
    "                         [--decode N] [--sparse dense|auto|FILE.json] [--dense-below N]\n"
    "                         [--temperature T] [--top-p P] [--seed S] [--stop-ids a,b]\n"
    "                         [--max-prompt N] [--device cpu|cuda] [--threads N] [--json]\n"
    "                         [--audit-heads K]\n"
    "  --model PATH        HF directory (config.json + safetensors), llama2.c .bin, or\n"
    "                      random:NAME[:SEED] (random weights of a named shape: tiny,\n"
    "                      stories15m, llama3-8b)\n"
    "  --tokenizer PATH    llama2.c tokenizer.bin (needed for --prompt/--prompt-file;\n"
    "                      BOS is prepended)\n"
    "  --decode N          tokens to decode after the first one (default 0)\n"
    "  --sparse SPEC       per-head pattern policy: dense (default), auto (vertical-slash\n"
    "                      1000/6096 on every head) or an MInference per-head JSON\n"
    "  --dense-below N     prompts shorter than N tokens run dense (default 32768)\n"
    "  --temperature T     0 = greedy (default); --top-p P in (0, 1]; --seed S\n"
    "  --stop-ids a,b      stop after emitting one of these ids\n"
    "  --max-prompt N      prompt length limit (default: the model's max position)\n"
    "  --device cpu|cuda   engine (default cpu)\n"
    "  --threads N         CPU worker threads (default: all cores or MPREFILL_THREADS)\n"
    "  --json              print one JSON object on stdout\n"
    "  --audit-heads K     audit K non-dense heads per layer against dense attention on 4\n"
    "                      sampled query blocks: recall and relative output difference\n"
    "                      per head (cpu engine)\n";

struct DeviceError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct GenerateArgs : cli::JobOptions {
  GenerateArgs() { dense_below = kDefaultDenseBelow; }
  std::string model, tokenizer;
  int64_t max_prompt = 0;
  std::string device = "cpu";
  int threads = 0;
  bool json = false;
  bool help = false;
};

GenerateArgs parse_generate(int argc, char** argv) {
  GenerateArgs a;
  cli::FlagReader r(argc, argv);
  while (r.next()) {
    const std::string& flag = r.flag();
    if (flag == "--help" || flag == "-h") {
      a.help = true;
    } else if (flag == "--json") {
      a.json = true;
    } else if (flag == "--model") {
      a.model = r.value();
    } else if (flag == "--tokenizer") {
      a.tokenizer = r.value();
    } else if (a.take(r)) {  // --prompt*, --decode, --sparse, sampling, ...
    } else if (flag == "--max-prompt") {
      a.max_prompt = parse_int(flag, r.value(), 1, int64_t{1} << 40);
    } else if (flag == "--device") {
      a.device = r.value();
      if (a.device != "cpu" && a.device != "cuda")
        throw UsageError("--device must be cpu or cuda, got '" + a.device + "'");
    } else if (flag == "--threads") {
      a.threads = static_cast<int>(parse_int(flag, r.value(), 1, 4096));
    } else {
      throw UsageError("unknown option '" + r.arg() + "'");
    }
  }
  if (a.help) return a;
  if (a.model.empty()) throw UsageError("--model is required");
  a.require_one_prompt();
  if (a.audit_heads > 0 && a.device != "cpu")
    throw UsageError("--audit-heads runs on the cpu engine only (--device cpu)");
  return a;
}

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

// One entry per audited head (engine/audit.h).
nlohmann::json audit_json(const PrefillStats& st) {
  nlohmann::json out = nlohmann::json::array();
  for (const HeadAuditResult& r : st.audit)
    out.push_back({{"layer", r.layer},
                   {"head", r.head},
                   {"pattern", to_string(r.pattern.kind)},
                   {"a", r.pattern.a},
                   {"b", r.pattern.b},
                   {"rows", r.rows},
                   {"recall", r.recall},
                   {"output_rel_error", r.output_rel_error},
                   {"output_rel_error_fro", r.output_rel_error_fro}});
  return out;
}

int run_generate(const GenerateArgs& a) {
#ifdef MPREFILL_HAVE_GPU_ENGINE
  if (a.device == "cuda" && !gpu::cuda_available())
    throw DeviceError("--device cuda: no CUDA device is visible");
#else
  if (a.device == "cuda")
    throw DeviceError(
        "--device cuda: this build has no CUDA engine (configure with -DMPREFILL_CUDA=ON)");
#endif
  if (a.threads > 0) cpu::set_num_threads(a.threads);

  std::optional<Tokenizer> tok;
  if (!a.tokenizer.empty()) tok = Tokenizer::load(a.tokenizer);

  const cli::PromptInput prompt = cli::read_prompt(a);
  std::vector<int> ids = prompt.ids;
  const std::string& prompt_text = prompt.text;
  if (ids.empty()) {
    if (!tok) throw UsageError("a text prompt needs --tokenizer");
    ids = tok->encode(prompt_text, true);
  }

  const auto t_load = std::chrono::steady_clock::now();
  const ModelWeights w = load_model(a.model);
  const double load_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_load).count();
  if (tok && tok->vocab_size() != w.config.vocab)
    throw std::runtime_error("tokenizer " + a.tokenizer + " has " +
                             std::to_string(tok->vocab_size()) + " tokens but the model has " +
                             std::to_string(w.config.vocab));

  Engine engine(w);
  GenerateOptions opt;
  opt.decode_steps = a.decode;
  opt.sampler.temperature = static_cast<float>(a.temperature);
  opt.sampler.top_p = static_cast<float>(a.top_p);
  opt.sampler.seed = a.seed;
  opt.sampler.validate();
  opt.stop_ids = a.stop_ids;
  opt.max_prompt = a.max_prompt;
  opt.audit.heads_per_layer = a.audit_heads;
  engine.check_prompt(ids, a.max_prompt);  // before reading a sparse config: cheap errors first
  opt.policy = load_sparse_policy(a.sparse, w.config, a.dense_below);
  opt.policy.check_model(w.config);

#ifdef MPREFILL_HAVE_GPU_ENGINE
  // cuda: GPU prefill, KV into a host cache, decoding on the CPU engine.
  const GenerateResult r =
      a.device == "cuda" ? gpu::generate_cuda(w, ids, opt) : engine.generate(ids, opt);
#else
  const GenerateResult r = engine.generate(ids, opt);
#endif

  std::string text;
  if (tok) {
    int prev = ids.back();
    for (int id : r.generated_ids) {
      text += tok->decode_token(prev, id);
      prev = id;
    }
  }

  if (a.json) {
    nlohmann::json j = {{"prompt_tokens", r.prompt_tokens},
                        {"first_token_id", r.first_token_id},
                        {"first_token_logit", r.first_token_logit},
                        {"generated_ids", r.generated_ids},
                        {"logits", r.logits},
                        {"logprobs", r.logprobs},
                        {"ttft_ms", r.ttft_ms},
                        {"decode_ms", r.decode_ms},
                        {"load_ms", load_ms},
                        {"stopped_by", r.stopped_by},
                        {"sparse", sparse_json(opt.policy, r.prefill)},
                        {"device", a.device},
                        {"threads", cpu::num_threads()}};
    if (tok) j["text"] = text;
    if (a.audit_heads > 0) {
      j["audit"] = audit_json(r.prefill);
      j["audit_ms"] = r.prefill.audit_ms;
    }
    std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  } else {
    if (tok) {
      std::cout << prompt_text << text << "\n";
    } else {
      for (size_t i = 0; i < r.generated_ids.size(); ++i)
        std::cout << (i ? "," : "") << r.generated_ids[i];
      std::cout << "\n";
    }
    const size_t ndec = r.generated_ids.size() - 1;
    std::fprintf(stderr,
                 "mprefill: %lld prompt tokens, ttft %.1f ms, %zu decoded in %.1f ms (%.1f tok/s), "
                 "stop: %s, sparse: %s\n",
                 static_cast<long long>(r.prompt_tokens), r.ttft_ms, ndec, r.decode_ms,
                 ndec && r.decode_ms > 0 ? 1000.0 * ndec / r.decode_ms : 0.0, r.stopped_by.c_str(),
                 one_line(opt.policy.summary_string()).c_str());
    if (a.audit_heads > 0 && r.prefill.audit.empty())
      std::fprintf(stderr, "mprefill: audit: no head to audit (the prompt ran dense)\n");
    for (const HeadAuditResult& h : r.prefill.audit)
      std::fprintf(stderr,
                   "mprefill: audit layer %d head %d %s(%d,%d): recall %.6f, output error %.3g "
                   "(max), %.3g (fro) over %lld rows\n",
                   h.layer, h.head, to_string(h.pattern.kind), h.pattern.a, h.pattern.b, h.recall,
                   h.output_rel_error, h.output_rel_error_fro, static_cast<long long>(h.rows));
  }
  return 0;
}

}  // namespace

#ifdef MPREFILL_HAVE_SERVICE
#include "tools/service_cli.h"  // submit / status / cancel / run (tools/cmake/service.cmake)
#endif

int main(int argc, char** argv) {
  std::ios::sync_with_stdio(true);
#ifdef MPREFILL_HAVE_SERVICE
  const char* service_usage = mprefill::cli::kServiceCommandsUsage;
#else
  const char* service_usage = "";
#endif
  if (argc < 2) {
    std::fputs("mprefill: error: no command given\n", stderr);
    std::fputs(kUsage, stderr);
    std::fputs(service_usage, stderr);
    return 2;
  }
  const std::string cmd = argv[1];
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    std::fputs(kUsage, stdout);
    std::fputs(service_usage, stdout);
    return 0;
  }
#ifdef MPREFILL_HAVE_SERVICE
  if (mprefill::cli::is_service_command(cmd))
    return mprefill::cli::service_main(cmd, argc - 2, argv + 2);
#endif
  if (cmd != "generate") {
    std::fprintf(stderr, "mprefill: error: unknown command '%s'\n", one_line(cmd).c_str());
    std::fputs(kUsage, stderr);
    std::fputs(service_usage, stderr);
    return 2;
  }
  try {
    const GenerateArgs a = parse_generate(argc - 2, argv + 2);
    if (a.help) {
      std::fputs(kGenerateUsage, stdout);
      return 0;
    }
    return run_generate(a);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "mprefill: error: %s\n", one_line(e.what()).c_str());
    std::fputs(kGenerateUsage, stderr);
    return 2;
  } catch (const DeviceError& e) {
    std::fprintf(stderr, "mprefill: error: %s\n", one_line(e.what()).c_str());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fputs("mprefill: error: out of memory\n", stderr);
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mprefill: error: %s\n", one_line(e.what()).c_str());
    return 1;
  }
}
