#include "engine/cpu_layer.h"

#include <algorithm>
#include <chrono>

#include "engine/engine.h"
#include "kernels/cpu/cpu.h"

namespace mprefill {
namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

const float* data_or_null(const Tensor& t) { return t.empty() ? nullptr : t.data.data(); }

}  // namespace

CpuLayer whole_layer(const ModelConfig& c, const LayerWeights& L) {
  CpuLayer o;
  o.attn_norm = L.attn_norm.data.data();
  o.ffn_norm = L.ffn_norm.data.data();
  o.wq = L.wq.data.data();
  o.wk = L.wk.data.data();
  o.wv = L.wv.data.data();
  o.bq = data_or_null(L.bq);
  o.bk = data_or_null(L.bk);
  o.bv = data_or_null(L.bv);
  o.wo = L.wo.data.data();
  o.gate = L.w_gate.data.data();
  o.up = L.w_up.data.data();
  o.down = L.w_down.data.data();
  o.n_q = c.n_heads;
  o.n_kv = c.n_kv_heads;
  o.ffn = c.intermediate;
  return o;
}

CpuShape cpu_shape(const ModelConfig& c, const std::vector<double>& inv_freq, int64_t mlp_chunk) {
  CpuShape s;
  s.hidden = c.hidden;
  s.head_dim = c.head_dim;
  s.rms_eps = c.rms_eps;
  s.rope_style = c.rope_style;
  s.inv_freq = &inv_freq;
  s.mlp_chunk = mlp_chunk;
  return s;
}

void cpu_layer_qkv(const CpuShape& s, const CpuLayer& L, const float* x, int64_t n,
                   const int64_t* pos, int64_t pos0, float* xb, float* q, float* k, float* v) {
  if (n <= 0) return;
  const int hd = s.head_dim;
  const int64_t H = s.hidden, QL = L.q_row(hd), KL = L.kv_row(hd);
  cpu::rmsnorm(x, L.attn_norm, xb, n, H, s.rms_eps);
  cpu::gemm_xwt(xb, L.wq, L.bq, q, n, H, QL);
  cpu::gemm_xwt(xb, L.wk, L.bk, k, n, H, KL);
  cpu::gemm_xwt(xb, L.wv, L.bv, v, n, H, KL);
  cpu::rope(q, n, L.n_q, hd, QL, hd, pos, pos0, *s.inv_freq, s.rope_style);
  cpu::rope(k, n, L.n_kv, hd, KL, hd, pos, pos0, *s.inv_freq, s.rope_style);
}

void cpu_layer_out(const CpuShape& s, const CpuLayer& L, const float* att, int64_t n, float* y) {
  if (n <= 0) return;
  cpu::gemm_xwt(att, L.wo, nullptr, y, n, L.q_row(s.head_dim), s.hidden);
}

void cpu_layer_mlp(const CpuShape& s, const CpuLayer& L, const float* x, int64_t n, float* y,
                   float* gate, float* up) {
  const int64_t H = s.hidden, F = L.ffn;
  const int64_t chunk = std::max<int64_t>(1, std::min(s.mlp_chunk, n));
  for (int64_t t0 = 0; t0 < n; t0 += chunk) {
    const int64_t m = std::min(chunk, n - t0);
    float* hr = y + t0 * H;
    cpu::rmsnorm(x + t0 * H, L.ffn_norm, hr, m, H, s.rms_eps);
    cpu::gemm_xwt(hr, L.gate, nullptr, gate, m, H, F);
    cpu::gemm_xwt(hr, L.up, nullptr, up, m, H, F);
    cpu::swiglu(gate, up, gate, m * F);
    cpu::gemm_xwt(gate, L.down, nullptr, hr, m, F, H);  // hr is read only by gate / up
  }
}

void cpu_logits(const CpuShape& s, const float* x_row, const float* final_norm, const float* lm,
                int64_t rows, float* out) {
  std::vector<float> last(static_cast<size_t>(s.hidden));
  cpu::rmsnorm(x_row, final_norm, last.data(), 1, s.hidden, s.rms_eps);
  cpu::gemm_xwt(last.data(), lm, nullptr, out, 1, s.hidden, rows);
}

std::vector<float> cpu_forward(const CpuForwardParams& p) {
  const CpuShape& s = p.shape;
  const int64_t n = p.n, H = s.hidden;
  PrefillStats* st = p.stats;
  std::vector<float> x(static_cast<size_t>(n * H)), xb(x.size()), q, att, gate, up;
  if (n > 0) cpu::embedding(p.embed, p.vocab, H, p.ids, n, x.data());
  const int64_t chunk = std::max<int64_t>(1, std::min(s.mlp_chunk, n));
  auto reduce = [&](std::vector<float>& buf) {
    if (p.reduce) p.reduce(buf.data(), static_cast<int64_t>(buf.size()));
  };

  for (int l = 0; l < p.n_layers; ++l) {
    const CpuLayer& L = p.layers[l];
    q.resize(static_cast<size_t>(n * L.q_row(s.head_dim)));
    att.resize(q.size());
    gate.resize(static_cast<size_t>(chunk * L.ffn));
    up.resize(gate.size());
    float* k = nullptr;
    float* v = nullptr;
    p.attention->kv_rows(l, &k, &v);

    auto t = Clock::now();
    cpu_layer_qkv(s, L, x.data(), n, p.pos, p.pos0, xb.data(), q.data(), k, v);
    if (st) st->gemm_ms += ms_since(t);

    p.attention->attend(l, q.data(), att.data());

    t = Clock::now();
    cpu_layer_out(s, L, att.data(), n, xb.data());
    reduce(xb);
    if (n > 0) cpu::add_inplace(x.data(), xb.data(), n * H);
    if (st) st->gemm_ms += ms_since(t);

    t = Clock::now();
    cpu_layer_mlp(s, L, x.data(), n, xb.data(), gate.data(), up.data());
    reduce(xb);
    if (n > 0) cpu::add_inplace(x.data(), xb.data(), n * H);
    if (st) st->mlp_ms += ms_since(t);

    p.attention->layer_done(l);
  }
  return x;
}

}  // namespace mprefill
