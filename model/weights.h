// Model weights on the host in fp32 (the CPU reference engine's format), loaded from
// an HF directory (safetensors, possibly sharded), a llama2.c .bin, or random init.
// Matrices are row-major [out][in], as in both checkpoint formats.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/types.h"
#include "model/model_config.h"

namespace mprefill {

class SafetensorsCheckpoint;

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
  int64_t numel() const;
  bool empty() const { return data.empty(); }
};

struct LayerWeights {
  Tensor attn_norm;             // [hidden]
  Tensor wq, wk, wv, wo;        // [q_dim][hidden], [kv_dim][hidden] x2, [hidden][q_dim]
  Tensor bq, bk, bv;            // Qwen2 only: [q_dim], [kv_dim], [kv_dim]
  Tensor ffn_norm;              // [hidden]
  Tensor w_gate, w_up, w_down;  // [ffn][hidden], [ffn][hidden], [hidden][ffn]
};

struct ModelWeights {
  ModelConfig config;
  Tensor embed;  // [vocab][hidden]
  std::vector<LayerWeights> layers;
  Tensor final_norm;  // [hidden]
  Tensor lm_head;     // [vocab][hidden]; empty when tied to embed
  // The checkpoint's weight dtype (the data above is fp32 whatever it is): kBF16 for an
  // HF directory whose matrices are all stored bf16, else kF32 (llama2.c, random, fp32 or
  // mixed checkpoints). It decides the model's KV dtype (model_kv_dtype).
  DType stored_dtype = DType::kF32;
  const Tensor& output_matrix() const { return lm_head.empty() ? embed : lm_head; }
};

// Slice of rows [row0, row0 + rows) of a 2-D tensor, for tensor parallelism.
struct RowSlice {
  int64_t row0 = 0, rows = -1;  // rows < 0: all
};

// Load a model from a path: a directory with config.json (+ model.safetensors or
// model.safetensors.index.json), a llama2.c .bin file, or "random:NAME[:SEED]" (random
// weights of named_shape(NAME)). Throws with a clear message.
ModelWeights load_model(const std::string& path);
ModelWeights load_llama2c(const std::string& bin_path);
ModelWeights load_hf_dir(const std::string& dir);
// The weight dtype of an HF checkpoint: kBF16 when every 2-D tensor (the matrices) is
// stored BF16, else kF32. One rule for the loader and the fingerprint of a path.
DType checkpoint_dtype(const SafetensorsCheckpoint& ck);
// The KV cache dtype of a model, decided here only: bf16 for bf16 checkpoints, fp32 for
// the rest. Every KV contract (worker and decoder) takes it from the fingerprint.
inline DType model_kv_dtype(DType stored_dtype) {
  return stored_dtype == DType::kBF16 ? DType::kBF16 : DType::kF32;
}
// Deterministic random weights of a config (normal * 0.02, norms near 1).
ModelWeights random_model(const ModelConfig& cfg, uint64_t seed);

}  // namespace mprefill
