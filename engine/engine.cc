#include "engine/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/cpu/cpu.h"
#include "model/prompt.h"
#include "engine/audit.h"
#include "engine/plan_codec.h"

namespace mprefill {
namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

void check_status(Status s, const char* what, int layer, int head) {
  if (s == Status::kOk) return;
  std::string where = "layer " + std::to_string(layer);
  if (head >= 0) where += " head " + std::to_string(head);
  throw std::runtime_error(std::string("engine: ") + what + " failed at " + where + ": " +
                           to_string(s));
}

void check_tensor(const Tensor& t, int64_t expect, const std::string& name) {
  if (t.numel() != expect || static_cast<int64_t>(t.data.size()) != expect)
    throw std::runtime_error("engine: weight " + name + " has " + std::to_string(t.data.size()) +
                             " values, expected " + std::to_string(expect));
}

const float* bias_or_null(const Tensor& t) { return t.empty() ? nullptr : t.data.data(); }

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
}

void Engine::check_prompt(const std::vector<int>& ids, int64_t max_prompt) const {
  mprefill::check_prompt(w_.config, ids, max_prompt);
}

namespace {

// Forward pass over tokens at positions [pos0, pos0 + n): pos0 == 0 is a prefill under
// the policy; pos0 > 0 appends rows to the cache with dense attention over it. run()
// returns the logits of the last row.
struct Forward {
  const ModelWeights& w;
  const std::vector<double>& inv_freq;
  int64_t mlp_chunk;

  void attention_layer(int l, const float* q, const float* K, const float* V, float* att, int64_t n,
                       int64_t pos0, const SparsePolicy& policy, PrefillPlan* plan, bool fill_plan,
                       PrefillStats* st) const {
    const ModelConfig& c = w.config;
    const int hd = c.head_dim, group = c.n_heads / c.n_kv_heads;
    const float scale = 1.f / std::sqrt(static_cast<float>(hd));
    AttentionParams p;
    p.q = q;
    p.k = K;
    p.v = V;
    p.o = att;
    p.q_row_stride = p.o_row_stride = c.q_dim();
    p.k_row_stride = p.v_row_stride = c.kv_dim();
    p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = hd;
    p.n_q = static_cast<int>(n);
    p.n_k = static_cast<int>(pos0 + n);
    p.head_dim = hd;
    p.q_pos0 = pos0;
    p.k_pos0 = 0;
    p.causal = true;
    p.scale = scale;
    p.dtype = DType::kF32;

    const int64_t N = pos0 + n;
    if (pos0 > 0 || policy.all_dense(N)) {
      p.num_heads = c.n_heads;
      p.num_kv_heads = c.n_kv_heads;
      const auto t = Clock::now();
      check_status(cpu::attention_dense(p), "attention_dense", l, -1);
      if (st) st->attention_ms += ms_since(t);
      if (plan && fill_plan) plan->layers[l].assign(c.n_heads, HeadPlan{});
      if (st) st->heads_by_kind[0] += c.n_heads;
      return;
    }
    if (plan && fill_plan) plan->layers[l].assign(c.n_heads, HeadPlan{});
    for (int h = 0; h < c.n_heads; ++h) {
      const HeadPattern hp = policy.at(l, h, N);
      const int kvh = h / group;
      AttentionParams ph = p;
      ph.num_heads = ph.num_kv_heads = 1;
      ph.q = q + static_cast<int64_t>(h) * hd;
      ph.o = att + static_cast<int64_t>(h) * hd;
      ph.k = K + static_cast<int64_t>(kvh) * hd;
      ph.v = V + static_cast<int64_t>(kvh) * hd;
      HeadPlan local;
      HeadPlan& hplan = plan ? plan->layers[l][h] : local;
      hplan.kind = hp.kind;
      if (st) ++st->heads_by_kind[static_cast<int>(hp.kind)];
      const bool estimate = !plan || fill_plan;
      switch (hp.kind) {
        case PatternKind::kDense: {
          const auto t = Clock::now();
          check_status(cpu::attention_dense(ph), "attention_dense", l, h);
          if (st) st->attention_ms += ms_since(t);
          break;
        }
        case PatternKind::kAShape: {
          AShapeParams a;
          a.n_init = &hp.a;
          a.n_local = &hp.b;
          const auto t = Clock::now();
          check_status(cpu::attention_ashape(ph, a), "attention_ashape", l, h);
          if (st) st->attention_ms += ms_since(t);
          break;
        }
        case PatternKind::kVerticalSlash: {
          auto t = Clock::now();
          if (estimate) {
            const int n_last = static_cast<int>(std::min<int64_t>(64, N));
            VsEstimateParams e;
            e.q_last = static_cast<const float*>(ph.q) + (N - n_last) * c.q_dim();
            e.k = ph.k;
            e.q_row_stride = c.q_dim();
            e.q_head_stride = hd;
            e.k_row_stride = c.kv_dim();
            e.k_head_stride = hd;
            e.n_last = n_last;
            e.seq_len = N;
            e.n_k = static_cast<int>(N);
            e.k_pos0 = 0;
            e.num_heads = e.num_kv_heads = 1;
            e.head_dim = hd;
            e.scale = scale;
            std::vector<VsSelection> sel;
            check_status(cpu::vs_estimate(e, &hp.a, &hp.b, &sel), "vs_estimate", l, h);
            if (sel.size() != 1)
              throw std::runtime_error("engine: vs_estimate returned " +
                                       std::to_string(sel.size()) + " selections for one head");
            hplan.vs = std::move(sel[0]);
          }
          const VsIndex ix = cpu::vs_build_index({hplan.vs}, N);
          if (st) st->estimate_ms += ms_since(t);
          t = Clock::now();
          check_status(cpu::attention_vs(ph, view(ix), 0), "attention_vs", l, h);
          if (st) st->attention_ms += ms_since(t);
          break;
        }
        case PatternKind::kBlockSparse: {
          auto t = Clock::now();
          if (estimate) {
            cpu::BlockSparseEstimateParams e;
            e.q = ph.q;
            e.k = ph.k;
            e.q_row_stride = c.q_dim();
            e.q_head_stride = hd;
            e.k_row_stride = c.kv_dim();
            e.k_head_stride = hd;
            e.seq_len = N;
            e.num_heads = e.num_kv_heads = 1;
            e.head_dim = hd;
            e.scale = scale;
            BlockSparseIndex bix;
            check_status(cpu::block_sparse_estimate(e, &hp.a, &bix), "block_sparse_estimate", l, h);
            hplan.topk = bix.k;
            hplan.blocks = std::move(bix.blocks);
          }
          if (st) st->estimate_ms += ms_since(t);
          BlockSparseView bv;
          bv.seq_len = N;
          bv.nblocks = num_blocks(N);
          bv.k = hplan.topk;
          bv.blocks = hplan.blocks.data();
          t = Clock::now();
          check_status(cpu::attention_block_sparse(ph, bv, 0), "attention_block_sparse", l, h);
          if (st) st->attention_ms += ms_since(t);
          break;
        }
      }
    }
  }

  std::vector<float> run(const int* ids, int64_t n, int64_t pos0, const SparsePolicy& policy,
                         KvCache* cache, PrefillPlan* plan, bool fill_plan, PrefillStats* st,
                         const AuditOptions* audit = nullptr) const {
    const ModelConfig& c = w.config;
    const int64_t H = c.hidden, F = c.intermediate, QD = c.q_dim(), KVD = c.kv_dim();
    std::vector<float> x(n * H), xb(n * H), q(n * QD), att(n * QD);
    cpu::embedding(w.embed.data.data(), c.vocab, H, ids, n, x.data());
    const int64_t chunk = std::min(mlp_chunk, n);
    std::vector<float> gate(chunk * F), up(chunk * F);

    for (int l = 0; l < c.n_layers; ++l) {
      const LayerWeights& L = w.layers[l];
      float* K = cache->k[l].data();
      float* V = cache->v[l].data();
      float* Kn = K + pos0 * KVD;
      float* Vn = V + pos0 * KVD;

      auto t = Clock::now();
      cpu::rmsnorm(x.data(), L.attn_norm.data.data(), xb.data(), n, H, c.rms_eps);
      cpu::gemm_xwt(xb.data(), L.wq.data.data(), bias_or_null(L.bq), q.data(), n, H, QD);
      cpu::gemm_xwt(xb.data(), L.wk.data.data(), bias_or_null(L.bk), Kn, n, H, KVD);
      cpu::gemm_xwt(xb.data(), L.wv.data.data(), bias_or_null(L.bv), Vn, n, H, KVD);
      cpu::rope(q.data(), n, c.n_heads, c.head_dim, QD, c.head_dim, nullptr, pos0, inv_freq,
                c.rope_style);
      cpu::rope(Kn, n, c.n_kv_heads, c.head_dim, KVD, c.head_dim, nullptr, pos0, inv_freq,
                c.rope_style);
      if (st) st->gemm_ms += ms_since(t);

      attention_layer(l, q.data(), K, V, att.data(), n, pos0, policy, plan, fill_plan, st);
      if (audit && audit->enabled() && pos0 == 0 && plan && st) {
        const auto ta = Clock::now();
        audit_layer(l, c, policy, plan->layers[l], q.data(), QD, K, V, KVD, n, *audit, &st->audit);
        st->audit_ms += ms_since(ta);
      }

      t = Clock::now();
      cpu::gemm_xwt(att.data(), L.wo.data.data(), nullptr, xb.data(), n, QD, H);
      cpu::add_inplace(x.data(), xb.data(), n * H);
      if (st) st->gemm_ms += ms_since(t);

      // MLP over token chunks: x += W_down (silu(W_gate h) * W_up h), h = rmsnorm(x).
      t = Clock::now();
      for (int64_t t0 = 0; t0 < n; t0 += chunk) {
        const int64_t m = std::min(chunk, n - t0);
        float* xr = x.data() + t0 * H;
        float* hr = xb.data() + t0 * H;
        cpu::rmsnorm(xr, L.ffn_norm.data.data(), hr, m, H, c.rms_eps);
        cpu::gemm_xwt(hr, L.w_gate.data.data(), nullptr, gate.data(), m, H, F);
        cpu::gemm_xwt(hr, L.w_up.data.data(), nullptr, up.data(), m, H, F);
        cpu::swiglu(gate.data(), up.data(), gate.data(), m * F);
        cpu::gemm_xwt(gate.data(), L.w_down.data.data(), nullptr, hr, m, F, H);
        cpu::add_inplace(xr, hr, m * H);
      }
      if (st) st->mlp_ms += ms_since(t);
    }
    cache->n_tokens = pos0 + n;

    std::vector<float> last(H), logits(c.vocab);
    cpu::rmsnorm(x.data() + (n - 1) * H, w.final_norm.data.data(), last.data(), 1, H, c.rms_eps);
    cpu::gemm_xwt(last.data(), w.output_matrix().data.data(), nullptr, logits.data(), 1, H,
                  c.vocab);
    return logits;
  }
};

void check_cache(const KvCache* cache, const ModelConfig& c, int64_t pos0, int64_t n) {
  if (!cache) throw std::runtime_error("engine: no KV cache given");
  if (cache->n_layers != c.n_layers || cache->kv_dim != c.kv_dim() ||
      cache->k.size() != static_cast<size_t>(c.n_layers) ||
      cache->v.size() != static_cast<size_t>(c.n_layers))
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
  // The audit reads each layer's indices: a prefill without a plan fills a local one.
  PrefillPlan audit_plan;
  if (audit.enabled() && !plan_inout) plan_inout = &audit_plan;
  const ModelConfig& c = w_.config;
  check_prompt_ids(c, ids);  // no length limit here
  const int64_t n = static_cast<int64_t>(ids.size());
  check_cache(cache, c, 0, n);
  policy.check_model(c);
  const bool reuse = plan_inout && !plan_inout->empty();
  if (reuse) check_prefill_plan(*plan_inout, policy, c, n);
  if (plan_inout && !reuse) {
    plan_inout->seq_len = n;
    plan_inout->layers.assign(c.n_layers, {});
  }
  PrefillStats st;
  st.tokens = n;
  st.all_dense = policy.all_dense(n);
  st.plan_reused = reuse;
  Forward f{w_, inv_freq_, opt_.mlp_chunk};
  std::vector<float> logits =
      f.run(ids.data(), n, 0, policy, cache, plan_inout, !reuse, &st, &audit);
  st.total_ms = ms_since(t0);
  if (stats) *stats = st;
  return logits;
}

std::vector<float> Engine::decode_step(int token, int64_t pos, KvCache* cache) const {
  const ModelConfig& c = w_.config;
  check_token_id(c, token, "token id at position " + std::to_string(pos) + ":");
  check_cache(cache, c, pos, 1);
  Forward f{w_, inv_freq_, opt_.mlp_chunk};
  return f.run(&token, 1, pos, SparsePolicy::dense(), cache, nullptr, false, nullptr);
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
