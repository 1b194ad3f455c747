#include "tools/generate.h"

#include <unistd.h>

#include <algorithm>
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
#include "engine/single_process.h"
#include "kernels/cpu/cpu.h"
#include "model/sparse_policy.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "tools/cli_args.h"
#include "tools/generate_report.h"

namespace mprefill::cli {

int run_generate(const GenerateArgs& a) {
  const Backend backend = a.device == "cuda" ? Backend::kCuda : Backend::kCpu;
  if (const std::string why = backend_unavailable(backend); !why.empty())
    throw DeviceError("--device cuda: " + why);
  if (a.threads > 0) cpu::set_num_threads(a.threads);

  const cli::PromptInput prompt = cli::read_prompt(a);
  std::vector<int> ids = prompt.ids;
  const std::string& prompt_text = prompt.text;
  // A text prompt without --tokenizer takes the tokenizer.bin beside the model; ids in,
  // ids out unless --tokenizer is given.
  std::string tok_path = a.tokenizer;
  if (tok_path.empty() && ids.empty()) tok_path = tokenizer_beside(a.model);
  std::optional<Tokenizer> tok;
  if (!tok_path.empty()) tok = Tokenizer::load(tok_path);
  if (ids.empty()) {
    if (!tok)
      throw UsageError("a text prompt needs --tokenizer (no tokenizer.bin beside " + a.model + ")");
    ids = tok->encode(prompt_text, true);
  }

  const auto t_load = std::chrono::steady_clock::now();
  const ModelWeights w = load_model(a.model);
  const double load_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_load).count();
  if (tok && tok->vocab_size() != w.config.vocab)
    throw std::runtime_error("tokenizer " + tok_path + " has " + std::to_string(tok->vocab_size()) +
                             " tokens but the model has " + std::to_string(w.config.vocab));

  // Progress: one line rewritten per layer (a long CPU prefill takes minutes), on a
  // terminal or with --progress; cleared (terminal) or ended (file) after the prefill.
  const bool tty = ::isatty(STDERR_FILENO) != 0;
  const bool progress = a.progress || (tty && !a.json);
  const auto t_prefill = std::chrono::steady_clock::now();
  EngineOptions eo;
  if (progress)
    eo.on_layer = [&](int layer, int n_layers) {
      const double s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t_prefill).count();
      std::fprintf(stderr, "%smprefill: prefill layer %d/%d, %zu tokens, %.1f s%s", tty ? "\r" : "",
                   layer + 1, n_layers, ids.size(), s, tty ? "\033[K" : "\n");
      std::fflush(stderr);
    };
  Engine engine(w, eo);
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
  opt.policy = load_sparse_policy(a.sparse, w.config, *a.dense_below);
  opt.policy.check_model(w.config);

  // cuda: GPU prefill, KV into a host cache, decoding on the CPU engine.
  const GenerateResult r = generate_on(backend, engine, ids, opt);
  if (progress && tty) std::fputs("\r\033[K", stderr);

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
      j["audit_summary"] = audit_summary_json(r.prefill);
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
                 ran_summary(opt.policy, r.prefill).c_str());
    if (a.audit_heads > 0 && r.prefill.audit.empty())
      std::fprintf(stderr, "mprefill: audit: no head to audit (the prompt ran dense)\n");
    for (const HeadAuditResult& h : r.prefill.audit)
      std::fprintf(stderr,
                   "mprefill: audit layer %d head %d %s: recall %.6f, output error %.3g "
                   "(max), %.3g (fro) over %lld rows\n",
                   h.layer, h.head, pattern_label(h.pattern).c_str(), h.recall, h.output_rel_error,
                   h.output_rel_error_fro, static_cast<long long>(h.rows));
    if (!r.prefill.audit.empty()) {
      const nlohmann::json s = audit_summary_json(r.prefill);
      std::fprintf(stderr, "mprefill: audit: %zu heads, recall mean %.6f, min %.6f",
                   s["heads"].get<size_t>(), s["mean_recall"].get<double>(),
                   s["min_recall"].get<double>());
      if (s["adaptive_heads"].get<int>() > 0)
        std::fprintf(stderr, "; adaptive heads %d: recall mean %.6f, min %.6f",
                     s["adaptive_heads"].get<int>(), s["adaptive_mean_recall"].get<double>(),
                     s["adaptive_min_recall"].get<double>());
      std::fprintf(stderr, "\n");
    }
  }
  return 0;
}

}  // namespace mprefill::cli
