// The KV cache of one prompt in host memory: what the CPU executors prefill into and
// decode from, and what a decoder assembles from received pages.
#pragma once
#include <cstdint>
#include <vector>

#include "model/model_config.h"

namespace mprefill {

// K (after RoPE, global positions) and V of every layer: k[l], v[l] are
// [capacity][kv_dim] fp32, rows [0, n_tokens) valid.
struct KvCache {
  int n_layers = 0, kv_dim = 0;
  int64_t capacity = 0, n_tokens = 0;
  std::vector<std::vector<float>> k, v;

  KvCache() = default;
  KvCache(const ModelConfig& cfg, int64_t capacity);
};

}  // namespace mprefill
