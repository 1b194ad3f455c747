#include "engine/cpu_local.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <string>

#include "engine/audit.h"
#include "engine/distributed_estimate.h"
#include "kernels/edge_check.h"

namespace mprefill {
namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// "what at layer L[ head H]" for the edge check.
std::string at(const char* what, int layer, int head) {
  std::string s = std::string("engine: ") + what + " at layer " + std::to_string(layer);
  if (head >= 0) s += " head " + std::to_string(head);
  return s;
}

// Adds the time of a kernel call to *ms (when stats are kept).
template <class F>
void timed(double* ms, F&& f) {
  const auto t = Clock::now();
  f();
  if (ms) *ms += ms_since(t);
}

}  // namespace

VsEstimateParams one_head_vs_params(const float* q, int64_t q_stride, const float* k,
                                    int64_t k_stride, int head_dim, int64_t n, float scale) {
  VsCallShape s;
  s.num_heads = s.num_kv_heads = 1;
  s.head_dim = head_dim;
  s.n_last = static_cast<int>(std::min<int64_t>(kBlock, n));
  s.seq_len = n;
  s.q_row = q_stride;
  s.k_row = k_stride;
  s.scale = scale;
  return vs_call_params(s, q + (n - s.n_last) * q_stride, k, 0, static_cast<int>(n));
}

cpu::BlockSparseEstimateParams one_head_bs_params(const float* q, int64_t q_stride, const float* k,
                                                  int64_t k_stride, int head_dim, int64_t n,
                                                  float scale) {
  cpu::BlockSparseEstimateParams e;
  e.q = q;
  e.k = k;
  e.q_row_stride = q_stride;
  e.q_head_stride = head_dim;
  e.k_row_stride = k_stride;
  e.k_head_stride = head_dim;
  e.seq_len = n;
  e.num_heads = e.num_kv_heads = 1;
  e.head_dim = head_dim;
  e.scale = scale;
  return e;
}

LocalAttention::LocalAttention(const LocalAttentionParams& p) : p_(p) {
  const int64_t kvd = p_.config->kv_dim();
  if (!p_.cache) {
    if (p_.pos0 != 0) throw std::runtime_error("engine: a forward without a KV cache starts at 0");
    k_.resize(static_cast<size_t>(p_.n * kvd));
    v_.resize(k_.size());
  } else if (p_.cache->dtype == DType::kBF16) {
    widen_ = true;
    k_.resize(static_cast<size_t>((p_.pos0 + p_.n) * kvd));
    v_.resize(k_.size());
  }
}

const float* LocalAttention::keys(int layer) const {
  return p_.cache && !widen_ ? p_.cache->k[layer].data() : k_.data();
}
const float* LocalAttention::values(int layer) const {
  return p_.cache && !widen_ ? p_.cache->v[layer].data() : v_.data();
}

void LocalAttention::kv_rows(int layer, float** k, float** v) {
  const int64_t at = p_.pos0 * p_.config->kv_dim();
  if (widen_) p_.cache->read_rows(layer, 0, p_.pos0, k_.data(), v_.data());
  *k = const_cast<float*>(keys(layer)) + at;
  *v = const_cast<float*>(values(layer)) + at;
}

void LocalAttention::head(int l, int h, const AttentionParams& ph, const HeadPattern& hp,
                          HeadPlan* hplan) {
  const ModelConfig& c = *p_.config;
  PrefillStats* st = p_.stats;
  double* att_ms = st ? &st->attention_ms : nullptr;
  double* est_ms = st ? &st->estimate_ms : nullptr;
  const int64_t N = p_.pos0 + p_.n;
  const bool estimate = !p_.plan || p_.fill_plan;
  switch (hp.kind) {
    case PatternKind::kDense:
      timed(att_ms, [&] {
        MPREFILL_EDGE_CHECK(cpu::attention_dense(ph), at("attention_dense", l, h), "");
      });
      break;
    case PatternKind::kAShape: {
      AShapeParams a;
      a.n_init = &hp.a;
      a.n_local = &hp.b;
      timed(att_ms, [&] {
        MPREFILL_EDGE_CHECK(cpu::attention_ashape(ph, a), at("attention_ashape", l, h), "");
      });
      break;
    }
    case PatternKind::kVerticalSlash: {
      VsIndex ix;
      timed(est_ms, [&] {
        if (estimate) {
          const VsEstimateParams e = one_head_vs_params(static_cast<const float*>(ph.q), c.q_dim(),
                                                        static_cast<const float*>(ph.k), c.kv_dim(),
                                                        c.head_dim, N, ph.scale);
          std::vector<VsSelection> sel;
          MPREFILL_EDGE_CHECK(cpu::vs_estimate(e, &hp.a, &hp.b, &sel, &hp.tau),
                              at("vs_estimate", l, h), "");
          if (sel.size() != 1)
            throw std::runtime_error("engine: vs_estimate returned " + std::to_string(sel.size()) +
                                     " selections for one head");
          hplan->vs = std::move(sel[0]);
        }
        ix = cpu::vs_build_index({hplan->vs}, N);
      });
      timed(att_ms, [&] {
        MPREFILL_EDGE_CHECK(cpu::attention_vs(ph, view(ix), 0), at("attention_vs", l, h), "");
      });
      break;
    }
    case PatternKind::kBlockSparse: {
      timed(est_ms, [&] {
        if (!estimate) return;
        cpu::BlockSparseEstimateParams e = one_head_bs_params(
            static_cast<const float*>(ph.q), c.q_dim(), static_cast<const float*>(ph.k), c.kv_dim(),
            c.head_dim, N, ph.scale);
        e.stride = hp.stride;  // 0: pooled blocks; S: antidiagonal scoring
        BlockSparseIndex bix;
        MPREFILL_EDGE_CHECK(cpu::block_sparse_estimate(e, &hp.a, &bix, &hp.tau),
                            at("block_sparse_estimate", l, h), "");
        hplan->topk = bix.k;
        hplan->blocks = std::move(bix.blocks);
      });
      BlockSparseView bv;
      bv.seq_len = N;
      bv.nblocks = num_blocks(N);
      bv.k = hplan->topk;
      bv.blocks = hplan->blocks.data();
      timed(att_ms, [&] {
        MPREFILL_EDGE_CHECK(cpu::attention_block_sparse(ph, bv, 0),
                            at("attention_block_sparse", l, h), "");
      });
      break;
    }
  }
}

void LocalAttention::attend(int l, const float* q, float* att) {
  const ModelConfig& c = *p_.config;
  const int hd = c.head_dim, group = c.n_heads / c.n_kv_heads;
  const int64_t n = p_.n, pos0 = p_.pos0, N = pos0 + n;
  if (widen_) {  // store the new rows in bf16; attend to what the cache holds
    float* kn = k_.data() + pos0 * c.kv_dim();
    float* vn = v_.data() + pos0 * c.kv_dim();
    p_.cache->write_rows(l, pos0, N, kn, vn);
    p_.cache->read_rows(l, pos0, N, kn, vn);
  }
  const float* K = keys(l);
  const float* V = values(l);
  if (p_.observe) p_.observe(l, q, K, V);
  PrefillStats* st = p_.stats;
  PrefillPlan* plan = p_.plan;
  AttentionParams p;
  p.q = q;
  p.k = K;
  p.v = V;
  p.o = att;
  p.q_row_stride = p.o_row_stride = c.q_dim();
  p.k_row_stride = p.v_row_stride = c.kv_dim();
  p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = hd;
  p.n_q = static_cast<int>(n);
  p.n_k = static_cast<int>(N);
  p.head_dim = hd;
  p.q_pos0 = pos0;
  p.k_pos0 = 0;
  p.causal = true;
  p.scale = 1.f / std::sqrt(static_cast<float>(hd));
  p.dtype = DType::kF32;

  const SparsePolicy dense = SparsePolicy::dense();
  const SparsePolicy& policy = p_.policy ? *p_.policy : dense;
  if (plan && p_.fill_plan) plan->layers[l].assign(c.n_heads, HeadPlan{});
  if (pos0 > 0 || policy.all_dense(N)) {
    p.num_heads = c.n_heads;
    p.num_kv_heads = c.n_kv_heads;
    timed(st ? &st->attention_ms : nullptr,
          [&] { MPREFILL_EDGE_CHECK(cpu::attention_dense(p), at("attention_dense", l, -1), ""); });
    if (st) st->heads_by_kind[0] += c.n_heads;
  } else {
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
      head(l, h, ph, hp, &hplan);
    }
  }
  if (p_.audit && p_.audit->enabled() && pos0 == 0 && plan && st) {
    const auto ta = Clock::now();
    audit_layer(l, c, policy, plan->layers[l], q, c.q_dim(), K, V, c.kv_dim(), n, *p_.audit,
                &st->audit);
    st->audit_ms += ms_since(ta);
  }
}

std::vector<float> local_forward(const ModelWeights& w, const std::vector<double>& inv_freq,
                                 int64_t mlp_chunk, const int* ids, const LocalAttentionParams& a) {
  const ModelConfig& c = w.config;
  std::vector<CpuLayer> layers;
  for (const LayerWeights& L : w.layers) layers.push_back(whole_layer(c, L));
  LocalAttention att(a);
  CpuForwardParams f;
  f.shape = cpu_shape(c, inv_freq, mlp_chunk);
  f.layers = layers.data();
  f.n_layers = c.n_layers;
  f.embed = w.embed.data.data();
  f.vocab = c.vocab;
  f.ids = ids;
  f.n = a.n;
  f.pos0 = a.pos0;
  f.attention = &att;
  f.stats = a.stats;
  const std::vector<float> x = cpu_forward(f);
  std::vector<float> logits(static_cast<size_t>(c.vocab));
  cpu_logits(f.shape, x.data() + (a.n - 1) * c.hidden, w.final_norm.data.data(),
             w.output_matrix().data.data(), c.vocab, logits.data());
  return logits;
}

}  // namespace mprefill
