// The single-process dense case of the CPU layer forward (engine/cpu_layer.h): every head
// on this process, K / V rows kept in a KV cache. Engine's decode steps and the pattern
// search's capture run local_forward(); prefills (Engine's too) run the same layer forward
// in DistEngine, whose attention is the sparse sp ring.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "engine/cpu_layer.h"
#include "engine/engine.h"
#include "kernels/cpu/cpu.h"

namespace mprefill {

// Estimator inputs of one head: q rows of stride q_stride, k rows of stride k_stride,
// head_dim values at each, n tokens (positions 0..n-1). The vertical-slash form reads the
// last min(64, n) query rows.
VsEstimateParams one_head_vs_params(const float* q, int64_t q_stride, const float* k,
                                    int64_t k_stride, int head_dim, int64_t n, float scale);
cpu::BlockSparseEstimateParams one_head_bs_params(const float* q, int64_t q_stride, const float* k,
                                                  int64_t k_stride, int head_dim, int64_t n,
                                                  float scale);

struct LocalAttentionParams {
  const ModelConfig* config = nullptr;
  int64_t n = 0;     // rows of this forward
  int64_t pos0 = 0;  // their first position; > 0: a decode step (dense over the cache)
  // K / V rows go to rows [pos0, pos0 + n) of cache->k[l] / v[l]. Null: to one buffer of
  // n rows reused by every layer (pos0 must be 0; the capture of a long prompt). A bf16
  // cache (a bf16 model's decoder) is read widened into one fp32 layer buffer, and the
  // new rows are stored rounded to bf16 before the attention reads them back.
  KvCache* cache = nullptr;
  PrefillStats* stats = nullptr;  // may be null: attention_ms, gemm_ms, mlp_ms added
  // Called with each layer's q [n][q_dim], k / v [pos0 + n][kv_dim] (after RoPE) before
  // its attention; may be empty.
  std::function<void(int layer, const float* q, const float* k, const float* v)> observe;
};

class LocalAttention final : public CpuAttention {
 public:
  explicit LocalAttention(const LocalAttentionParams& p);
  void kv_rows(int layer, float** k, float** v) override;
  void attend(int layer, const float* q, float* att) override;

 private:
  LocalAttentionParams p_;
  std::vector<float> k_, v_;  // the reused layer buffer: no cache, or a bf16 one
  bool widen_ = false;        // the cache is bf16: layers go through k_ / v_
  const float* keys(int layer) const;
  const float* values(int layer) const;
};

// The whole model's forward of rows ids[0, n) at positions [a.pos0, a.pos0 + n) with
// LocalAttention(a) (a.n == n); returns the logits of the last row. Shapes, ids and cache
// are the caller's to check.
std::vector<float> local_forward(const ModelWeights& w, const std::vector<double>& inv_freq,
                                 int64_t mlp_chunk, const int* ids, const LocalAttentionParams& a);

}  // namespace mprefill
