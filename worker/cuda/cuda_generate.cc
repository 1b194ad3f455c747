#include "worker/cuda/cuda_generate.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>

#include "worker/cuda/cuda_engine.h"
#include "worker/cuda/kv_sinks.h"
#include "worker/sampler.h"

namespace mprefill::gpu {

GenerateResult generate_cuda(const ModelWeights& w, const std::vector<int>& ids,
                             const GenerateOptions& opt) {
  using Clock = std::chrono::steady_clock;
  auto ms_since = [](Clock::time_point t) {
    return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
  };
  Engine cpu(w);  // decoder, and the same prompt checks as the CPU path
  cpu.check_prompt(ids, opt.max_prompt);
  opt.sampler.validate();
  if (opt.decode_steps < 0)
    throw std::runtime_error("decode steps must be >= 0, got " + std::to_string(opt.decode_steps));
  CudaEngine gpu(w);
  const int64_t n = static_cast<int64_t>(ids.size());
  GenerateResult r;
  r.prompt_tokens = n;
  Sampler sampler(opt.sampler);
  auto is_stop = [&](int id) {
    return std::find(opt.stop_ids.begin(), opt.stop_ids.end(), id) != opt.stop_ids.end();
  };

  const auto t0 = Clock::now();
  KvCache cache(w.config, n + opt.decode_steps);
  HostKvCacheSink sink(&cache);
  CudaPrefillStats st;
  std::vector<float> logits = gpu.prefill(ids, opt.policy, &sink, nullptr, &st);
  SampledToken tok = sampler.sample(logits.data(), static_cast<int>(logits.size()));
  r.ttft_ms = ms_since(t0);
  r.prefill.tokens = st.tokens;
  r.prefill.all_dense = st.all_dense;
  r.prefill.plan_reused = st.plan_reused;
  std::copy(st.heads_by_kind, st.heads_by_kind + 4, r.prefill.heads_by_kind);
  r.prefill.total_ms = st.total_ms;
  r.first_token_id = tok.id;
  r.first_token_logit = tok.logit;
  r.stopped_by = "length";

  const auto t1 = Clock::now();
  for (int step = 0;; ++step) {
    r.generated_ids.push_back(tok.id);
    r.logits.push_back(tok.logit);
    r.logprobs.push_back(tok.logprob);
    if (is_stop(tok.id)) {
      r.stopped_by = "stop_id";
      break;
    }
    if (step == opt.decode_steps) break;
    logits = cpu.decode_step(tok.id, n + step, &cache);
    tok = sampler.sample(logits.data(), static_cast<int>(logits.size()));
  }
  r.decode_ms = ms_since(t1);
  return r;
}

}  // namespace mprefill::gpu
