// Conversion of llama2.c checkpoints to Hugging Face directories (config.json +
// model.safetensors), and the per-head row permutation of wq/wk between the two RoPE
// conventions.
//
// Within one head of head_dim d, adjacent-pair RoPE rotates (x[2i], x[2i+1]) and
// rotate-half RoPE rotates (x[i], x[i + d/2]), both by angle pos * theta^(-2i/d). With
//   HF row i       <- llama2.c row 2i       (i < d/2)
//   HF row d/2 + i <- llama2.c row 2i + 1
// the projections satisfy (W_hf x)[i] = (W_l2c x)[2i] and (W_hf x)[d/2+i] = (W_l2c x)[2i+1],
// so rotate-half(W_hf x) is the same permutation of adjacent-pair(W_l2c x); applied to
// both q and k it leaves every attention score q.k unchanged.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/types.h"
#include "model/weights.h"

namespace mprefill {

// w: [n_heads * head_dim][cols] rows in one convention -> the other (head_dim even).
std::vector<float> permute_rows_adjacent_to_half(const float* w, int n_heads, int head_dim,
                                                 int64_t cols);
std::vector<float> permute_rows_half_to_adjacent(const float* w, int n_heads, int head_dim,
                                                 int64_t cols);

// Permutes wq, wk (and bq, bk) of every layer of an adjacent-pair model in place and
// sets config.rope_style = kRotateHalf. Throws if the model is already rotate-half.
void convert_to_rotate_half(ModelWeights& w);

// config.json text for a rotate-half model (torch_dtype from `dtype`).
std::string hf_config_json(const ModelConfig& c, DType dtype);

// Writes config.json and model.safetensors (HF names; lm_head only when untied) into an
// existing directory. The model must use rotate-half RoPE. dtype: kF32 or kBF16.
void save_hf_dir(const ModelWeights& w, const std::string& dir, DType dtype);

struct ConvertOptions {
  DType dtype = DType::kF32;  // of model.safetensors: kF32 (lossless) or kBF16
  bool force = false;         // allow writing into a non-empty directory
};

// llama2.c .bin -> HF directory (created if needed). Refuses a non-empty out_dir unless
// force. Throws std::runtime_error with one clear line.
void convert_llama2c_to_hf(const std::string& bin_path, const std::string& out_dir,
                           const ConvertOptions& opt);

}  // namespace mprefill
