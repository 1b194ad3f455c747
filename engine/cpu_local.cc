#include "engine/cpu_local.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <string>

#include "engine/distributed_estimate.h"
#include "kernels/edge_check.h"

namespace mprefill {
namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
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

void LocalAttention::attend(int l, const float* q, float* att) {
  const ModelConfig& c = *p_.config;
  const int hd = c.head_dim;
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

  p.num_heads = c.n_heads;
  p.num_kv_heads = c.n_kv_heads;
  const auto t = Clock::now();
  MPREFILL_EDGE_CHECK(cpu::attention_dense(p),
                      "engine: attention_dense at layer " + std::to_string(l), "");
  if (st) {
    st->attention_ms += ms_since(t);
    st->heads_by_kind[0] += c.n_heads;
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
