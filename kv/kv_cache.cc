#include "kv/kv_cache.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace mprefill {

KvCache::KvCache(const ModelConfig& cfg, int64_t cap, DType dt)
    : n_layers(cfg.n_layers), kv_dim(cfg.kv_dim()), capacity(cap), n_tokens(0), dtype(dt) {
  if (cap < 1) throw std::runtime_error("KV cache capacity must be >= 1");
  const size_t n = static_cast<size_t>(cap) * kv_dim;
  if (dt == DType::kF32) {
    k.assign(n_layers, std::vector<float>(n));
    v.assign(n_layers, std::vector<float>(n));
  } else if (dt == DType::kBF16) {
    k16.assign(n_layers, std::vector<uint16_t>(n));
    v16.assign(n_layers, std::vector<uint16_t>(n));
  } else {
    throw std::runtime_error(std::string("KV cache dtype ") + to_string(dt) +
                             " is not f32 or bf16");
  }
}

bool KvCache::has_shape(int layers, int dim) const {
  if (n_layers != layers || kv_dim != dim) return false;
  const size_t n = static_cast<size_t>(layers);
  return dtype == DType::kBF16 ? k16.size() == n && v16.size() == n
                               : k.size() == n && v.size() == n;
}

uint64_t KvCache::bytes() const {
  return uint64_t{2} * static_cast<uint64_t>(n_layers) * static_cast<uint64_t>(capacity) *
         static_cast<uint64_t>(kv_dim) * static_cast<uint64_t>(dtype_size(dtype));
}

void* KvCache::k_data(int l) {
  return dtype == DType::kBF16 ? static_cast<void*>(k16.at(l).data())
                               : static_cast<void*>(k.at(l).data());
}
void* KvCache::v_data(int l) {
  return dtype == DType::kBF16 ? static_cast<void*>(v16.at(l).data())
                               : static_cast<void*>(v.at(l).data());
}

void KvCache::read_rows(int l, int64_t r0, int64_t r1, float* k_out, float* v_out) const {
  const size_t a = static_cast<size_t>(r0) * kv_dim, n = static_cast<size_t>(r1 - r0) * kv_dim;
  if (dtype == DType::kF32) {
    std::copy_n(k.at(l).data() + a, n, k_out);
    std::copy_n(v.at(l).data() + a, n, v_out);
    return;
  }
  const uint16_t* ks = k16.at(l).data() + a;
  const uint16_t* vs = v16.at(l).data() + a;
  for (size_t i = 0; i < n; ++i) {
    k_out[i] = bf16_to_f32(ks[i]);
    v_out[i] = bf16_to_f32(vs[i]);
  }
}

void KvCache::write_rows(int l, int64_t r0, int64_t r1, const float* k_in, const float* v_in) {
  const size_t a = static_cast<size_t>(r0) * kv_dim, n = static_cast<size_t>(r1 - r0) * kv_dim;
  if (dtype == DType::kF32) {
    std::copy_n(k_in, n, k.at(l).data() + a);
    std::copy_n(v_in, n, v.at(l).data() + a);
    return;
  }
  uint16_t* kd = k16.at(l).data() + a;
  uint16_t* vd = v16.at(l).data() + a;
  for (size_t i = 0; i < n; ++i) {
    kd[i] = f32_to_bf16(k_in[i]);
    vd[i] = f32_to_bf16(v_in[i]);
  }
}

KvCache round_to_bf16(const KvCache& src, int64_t capacity) {
  if (src.dtype != DType::kF32) throw std::runtime_error("round_to_bf16: the source is not fp32");
  if (capacity < src.n_tokens)
    throw std::runtime_error("round_to_bf16: capacity " + std::to_string(capacity) + " < " +
                             std::to_string(src.n_tokens) + " tokens");
  KvCache out;
  out.n_layers = src.n_layers;
  out.kv_dim = src.kv_dim;
  out.capacity = capacity;
  out.dtype = DType::kBF16;
  const size_t n = static_cast<size_t>(capacity) * src.kv_dim;
  out.k16.assign(src.n_layers, std::vector<uint16_t>(n));
  out.v16.assign(src.n_layers, std::vector<uint16_t>(n));
  for (int l = 0; l < src.n_layers; ++l)
    out.write_rows(l, 0, src.n_tokens, src.k[l].data(), src.v[l].data());
  out.n_tokens = src.n_tokens;
  return out;
}

}  // namespace mprefill
