#include "engine/engine.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>

#include "comm/self_comm.h"
#include "engine/cpu_local.h"
#include "engine/dist_engine.h"
#include "kv/kv_cache_sink.h"
#include "model/prompt.h"

namespace mprefill {
namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

void check_tensor(const Tensor& t, int64_t expect, const std::string& name) {
  if (t.numel() != expect || static_cast<int64_t>(t.data.size()) != expect)
    throw std::runtime_error("engine: weight " + name + " has " + std::to_string(t.data.size()) +
                             " values, expected " + std::to_string(expect));
}

}  // namespace

Engine::Engine(const ModelWeights& w, EngineOptions opt) : w_(w), opt_(opt) {
  const ModelConfig& c = w.config;
  c.validate();
  if (opt_.mlp_chunk < 1) throw std::runtime_error("engine: mlp_chunk must be >= 1");
  if (w.layers.size() != static_cast<size_t>(c.n_layers))
    throw std::runtime_error("engine: model has " + std::to_string(w.layers.size()) +
                             " layers of weights, config says " + std::to_string(c.n_layers));
  const int64_t H = c.hidden, F = c.intermediate, Q = c.q_dim(), KV = c.kv_dim();
  check_tensor(w.embed, int64_t{c.vocab} * H, "embed");
  check_tensor(w.final_norm, H, "final_norm");
  check_tensor(w.output_matrix(), int64_t{c.vocab} * H, "lm_head");
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = w.layers[l];
    const std::string p = "layers." + std::to_string(l) + ".";
    check_tensor(L.attn_norm, H, p + "attn_norm");
    check_tensor(L.ffn_norm, H, p + "ffn_norm");
    check_tensor(L.wq, Q * H, p + "wq");
    check_tensor(L.wk, KV * H, p + "wk");
    check_tensor(L.wv, KV * H, p + "wv");
    check_tensor(L.wo, H * Q, p + "wo");
    check_tensor(L.w_gate, F * H, p + "w_gate");
    check_tensor(L.w_up, F * H, p + "w_up");
    check_tensor(L.w_down, H * F, p + "w_down");
    if (!L.bq.empty()) check_tensor(L.bq, Q, p + "bq");
    if (!L.bk.empty()) check_tensor(L.bk, KV, p + "bk");
    if (!L.bv.empty()) check_tensor(L.bv, KV, p + "bv");
  }
  inv_freq_ = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling);
  self_ = comm::make_self_communicator();
  EngineOptions dopt;
  dopt.mlp_chunk = opt_.mlp_chunk;
  dist_ = std::make_unique<DistEngine>(self_.get(), w, DistTopology{1, 1}, dopt);
}

Engine::~Engine() = default;

void Engine::check_prompt(const std::vector<int>& ids, int64_t max_prompt) const {
  mprefill::check_prompt(w_.config, ids, max_prompt);
}

namespace {

void check_cache(const KvCache* cache, const ModelConfig& c, int64_t pos0, int64_t n) {
  if (!cache) throw std::runtime_error("engine: no KV cache given");
  if (!cache->has_shape(c.n_layers, static_cast<int>(c.kv_dim())))
    throw std::runtime_error("engine: KV cache shape does not match the model");
  if (cache->n_tokens != pos0)
    throw std::runtime_error("engine: KV cache holds " + std::to_string(cache->n_tokens) +
                             " tokens, expected " + std::to_string(pos0));
  if (pos0 + n > cache->capacity)
    throw std::runtime_error("engine: KV cache capacity " + std::to_string(cache->capacity) +
                             " is too small for " + std::to_string(pos0 + n) + " tokens");
}

}  // namespace

std::vector<float> Engine::prefill(const std::vector<int>& ids, const SparsePolicy& policy,
                                   KvCache* cache, PrefillPlan* plan_inout, PrefillStats* stats,
                                   const AuditOptions& audit) const {
  const auto t0 = Clock::now();
  audit.validate();
  if (audit.enabled() && !stats)
    throw std::runtime_error("engine: an audited prefill needs a stats object for the results");
  const ModelConfig& c = w_.config;
  check_prompt_ids(c, ids);  // no length limit here
  const int64_t n = static_cast<int64_t>(ids.size());
  check_cache(cache, c, 0, n);
  KvCacheSink sink(cache, c.head_dim);
  std::lock_guard<std::mutex> lock(prefill_mu_);
  DistPrefillResult r = dist_->prefill(ids, policy, &sink, plan_inout, opt_.on_layer, audit);
  cache->n_tokens = n;
  r.stats.total_ms = ms_since(t0);
  if (stats) *stats = std::move(r.stats);
  return std::move(r.logits);
}

std::vector<float> Engine::decode_step(int token, int64_t pos, KvCache* cache) const {
  const ModelConfig& c = w_.config;
  check_token_id(c, token, "token id at position " + std::to_string(pos) + ":");
  check_cache(cache, c, pos, 1);
  LocalAttentionParams a;
  a.config = &c;
  a.n = 1;
  a.pos0 = pos;
  a.cache = cache;
  std::vector<float> logits = local_forward(w_, inv_freq_, opt_.mlp_chunk, &token, a);
  cache->n_tokens = pos + 1;
  return logits;
}

void Engine::check_generate(const std::vector<int>& ids, const GenerateOptions& opt) const {
  check_prompt(ids, opt.max_prompt);
  opt.sampler.validate();
  if (opt.decode_steps < 0)
    throw std::runtime_error("decode steps must be >= 0, got " + std::to_string(opt.decode_steps));
}

GenerateResult Engine::generate(const std::vector<int>& ids, const GenerateOptions& opt) const {
  return generate_with(ids, opt, [&](KvCache* cache, PrefillStats* stats) {
    return prefill(ids, opt.policy, cache, nullptr, stats, opt.audit);
  });
}

GenerateResult Engine::generate_with(const std::vector<int>& ids, const GenerateOptions& opt,
                                     const PrefillFn& prefill_fn) const {
  check_generate(ids, opt);
  const int64_t n = static_cast<int64_t>(ids.size());
  GenerateResult r;
  r.prompt_tokens = n;
  Sampler sampler(opt.sampler);
  auto is_stop = [&](int id) {
    return std::find(opt.stop_ids.begin(), opt.stop_ids.end(), id) != opt.stop_ids.end();
  };

  const auto t0 = Clock::now();
  KvCache cache(w_.config, n + opt.decode_steps);
  std::vector<float> logits = prefill_fn(&cache, &r.prefill);
  SampledToken tok = sampler.sample(logits.data(), static_cast<int>(logits.size()));
  r.ttft_ms = ms_since(t0);
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
    logits = decode_step(tok.id, n + step, &cache);
    tok = sampler.sample(logits.data(), static_cast<int>(logits.size()));
  }
  r.decode_ms = ms_since(t1);
  return r;
}

}  // namespace mprefill
