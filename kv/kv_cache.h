// The KV cache of one prompt in host memory: what the CPU executors prefill into and
// decode from, and what a decoder assembles from received pages.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/types.h"
#include "model/model_config.h"

namespace mprefill {

// K (after RoPE, global positions) and V of every layer, rows [0, n_tokens) valid, each
// row [kv_dim] (token-major):
//   dtype kF32:  k[l], v[l] are [capacity][kv_dim] fp32 (k16 / v16 empty);
//   dtype kBF16: k16[l], v16[l] are [capacity][kv_dim] bf16 bits (k / v empty): a bf16
//                model's KV at its real size. Readers widen rows to fp32 (read_rows);
//                writers round fp32 rows to nearest even (write_rows).
struct KvCache {
  int n_layers = 0, kv_dim = 0;
  int64_t capacity = 0, n_tokens = 0;
  DType dtype = DType::kF32;
  std::vector<std::vector<float>> k, v;
  std::vector<std::vector<uint16_t>> k16, v16;

  KvCache() = default;
  // dtype kF32 or kBF16 (throws std::runtime_error otherwise, or for capacity < 1).
  KvCache(const ModelConfig& cfg, int64_t capacity, DType dtype = DType::kF32);

  // True when the cache has n_layers layers of kv_dim-wide rows in its dtype's vectors.
  bool has_shape(int n_layers, int kv_dim) const;
  uint64_t bytes() const;  // K + V storage held: 2 x layers x capacity x kv_dim x dtype bytes
  // Layer l's K / V storage (rows of kv_dim values in dtype).
  void* k_data(int layer);
  void* v_data(int layer);
  // Rows [r0, r1) of layer l as fp32 into k_out / v_out ([r1 - r0][kv_dim]).
  void read_rows(int layer, int64_t r0, int64_t r1, float* k_out, float* v_out) const;
  // Stores fp32 rows [r0, r1) of layer l (rounded to bf16 in a bf16 cache).
  void write_rows(int layer, int64_t r0, int64_t r1, const float* k_in, const float* v_in);
};

// A bf16 copy of the first n_tokens rows of an fp32 cache (each value rounded to
// nearest even), with room for `capacity` rows (>= src.n_tokens).
KvCache round_to_bf16(const KvCache& src, int64_t capacity);

}  // namespace mprefill
