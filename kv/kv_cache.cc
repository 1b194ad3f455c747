#include "kv/kv_cache.h"

#include <stdexcept>

namespace mprefill {

KvCache::KvCache(const ModelConfig& cfg, int64_t cap)
    : n_layers(cfg.n_layers), kv_dim(cfg.kv_dim()), capacity(cap), n_tokens(0) {
  if (cap < 1) throw std::runtime_error("KV cache capacity must be >= 1");
  k.assign(n_layers, std::vector<float>(static_cast<size_t>(cap) * kv_dim));
  v.assign(n_layers, std::vector<float>(static_cast<size_t>(cap) * kv_dim));
}

}  // namespace mprefill
