// Model architecture description (Llama family), read from an HF config.json, a
// llama2.c header, or a named shape.
#pragma once
#include <cstdint>
#include <string>

#include "kernels/sparse.h"

namespace mprefill {

struct ModelConfig {
  std::string arch = "llama";  // llama | qwen2 | mistral
  int hidden = 0;              // hidden_size
  int intermediate = 0;        // intermediate_size (FFN)
  int n_layers = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;  // hidden / n_heads unless config.json says head_dim
  int vocab = 0;
  int max_position = 0;  // max_position_embeddings (prompt limit without an override)
  float rms_eps = 1e-5f;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  RopeStyle rope_style = RopeStyle::kRotateHalf;  // HF: rotate-half; llama2.c: adjacent
  bool tie_word_embeddings = false;
  bool qkv_bias = false;  // Qwen2
  int bos_id = 1, eos_id = 2;

  int q_dim() const { return n_heads * head_dim; }
  int kv_dim() const { return n_kv_heads * head_dim; }
  // Throws std::runtime_error naming the bad field.
  void validate() const;
  // Stable short hash of the architecture fields (used later as the model fingerprint).
  std::string fingerprint() const;
};

// Parse an HF config.json text. Throws with a message naming the field on error;
// Mistral with a sliding_window set is refused.
ModelConfig parse_hf_config(const std::string& json_text);
// Named shapes for random initialisation: "tiny", "stories15m", "llama3-8b".
ModelConfig named_shape(const std::string& name);

}  // namespace mprefill
