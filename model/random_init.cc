// Deterministic random weights of a model shape, for tests and benchmarks.
//
// Every tensor has its own stream: seed_t = mix(seed, FNV-1a(tensor name)); element
// chunks of kChunk values draw from std::mt19937_64(mix(seed_t, chunk)) through a
// Box-Muller transform written here (std::normal_distribution differs between standard
// libraries). Values therefore depend only on (seed, name, index), not on the thread
// count or on which other tensors exist.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numbers>
#include <random>
#include <stdexcept>
#include <string>

#include "kernels/cpu/parallel.h"
#include "model/weights.h"

namespace mprefill {
namespace {

constexpr int64_t kChunk = 1 << 16;  // even: Box-Muller yields pairs
constexpr double kMaxGiB = 16.0;     // fp32 host weights of the CPU engine
constexpr double kStd = 0.02;
constexpr double kNormNoise = 0.02;

uint64_t mix(uint64_t a, uint64_t b) {  // splitmix64 finaliser of a combination
  uint64_t z = a + 0x9e3779b97f4a7c15ull * (b + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

// t <- mean + sd * N(0, 1), shape as given.
void fill_normal(Tensor& t, std::vector<int64_t> shape, const std::string& name, uint64_t seed,
                 double mean, double sd) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  t.shape = std::move(shape);
  t.data.assign(static_cast<size_t>(n), 0.f);
  const uint64_t tseed = mix(seed, fnv1a(name));
  float* out = t.data.data();
  cpu::parallel_for((n + kChunk - 1) / kChunk, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      std::mt19937_64 g(mix(tseed, static_cast<uint64_t>(c)));
      const int64_t i1 = std::min(n, (c + 1) * kChunk);
      for (int64_t i = c * kChunk; i < i1; i += 2) {
        const double u1 = (static_cast<double>(g() >> 11) + 1.0) * 0x1p-53;  // (0, 1]
        const double u2 = static_cast<double>(g() >> 11) * 0x1p-53;          // [0, 1)
        const double r = std::sqrt(-2.0 * std::log(u1)), a = 2.0 * std::numbers::pi * u2;
        out[i] = static_cast<float>(mean + sd * r * std::cos(a));
        if (i + 1 < i1) out[i + 1] = static_cast<float>(mean + sd * r * std::sin(a));
      }
    }
  });
}

}  // namespace

ModelWeights random_model(const ModelConfig& cfg, uint64_t seed) {
  cfg.validate();
  const int64_t h = cfg.hidden, q = cfg.q_dim(), kv = cfg.kv_dim(), f = cfg.intermediate;
  const int64_t per_layer =
      2 * h + q * h + 2 * kv * h + h * q + 3 * f * h + (cfg.qkv_bias ? q + 2 * kv : 0);
  const int64_t total = static_cast<int64_t>(cfg.vocab) * h * (cfg.tie_word_embeddings ? 1 : 2) +
                        cfg.n_layers * per_layer + h;
  const double gib = static_cast<double>(total) * 4.0 / (1024.0 * 1024.0 * 1024.0);
  if (gib > kMaxGiB) {
    char msg[256];
    std::snprintf(msg, sizeof msg,
                  "random_model: this shape has %.2f G parameters = %.1f GiB of fp32 weights, "
                  "over the CPU engine's limit of %.0f GiB",
                  static_cast<double>(total) / 1e9, gib, kMaxGiB);
    throw std::runtime_error(msg);
  }

  // Residual-branch output projections get std / sqrt(2 L) so that the residual stream
  // grows by O(1) over the 2 L branches.
  const double out_std = kStd / std::sqrt(2.0 * cfg.n_layers);
  ModelWeights m;
  m.config = cfg;
  fill_normal(m.embed, {cfg.vocab, h}, "embed", seed, 0.0, kStd);
  m.layers.resize(cfg.n_layers);
  for (int l = 0; l < cfg.n_layers; ++l) {
    LayerWeights& w = m.layers[l];
    const std::string p = "layers." + std::to_string(l) + ".";
    fill_normal(w.attn_norm, {h}, p + "attn_norm", seed, 1.0, kNormNoise);
    fill_normal(w.wq, {q, h}, p + "wq", seed, 0.0, kStd);
    fill_normal(w.wk, {kv, h}, p + "wk", seed, 0.0, kStd);
    fill_normal(w.wv, {kv, h}, p + "wv", seed, 0.0, kStd);
    fill_normal(w.wo, {h, q}, p + "wo", seed, 0.0, out_std);
    if (cfg.qkv_bias) {
      fill_normal(w.bq, {q}, p + "bq", seed, 0.0, kStd);
      fill_normal(w.bk, {kv}, p + "bk", seed, 0.0, kStd);
      fill_normal(w.bv, {kv}, p + "bv", seed, 0.0, kStd);
    }
    fill_normal(w.ffn_norm, {h}, p + "ffn_norm", seed, 1.0, kNormNoise);
    fill_normal(w.w_gate, {f, h}, p + "w_gate", seed, 0.0, kStd);
    fill_normal(w.w_up, {f, h}, p + "w_up", seed, 0.0, kStd);
    fill_normal(w.w_down, {h, f}, p + "w_down", seed, 0.0, out_std);
  }
  fill_normal(m.final_norm, {h}, "final_norm", seed, 1.0, kNormNoise);
  if (!cfg.tie_word_embeddings) fill_normal(m.lm_head, {cfg.vocab, h}, "lm_head", seed, 0.0, kStd);
  return m;
}

}  // namespace mprefill
