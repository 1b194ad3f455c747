// llama2.c legacy checkpoint (.bin): little-endian, header of 7 int32
//   dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
// (vocab_size > 0: classifier shared with the token embedding; < 0: a separate
// classifier [|vocab|][dim] follows the freq_cis arrays), then fp32 arrays:
//   tok_embeddings [vocab][dim], rms_att [L][dim], wq [L][dim][dim],
//   wk [L][kv_dim][dim], wv [L][kv_dim][dim], wo [L][dim][dim], rms_ffn [L][dim],
//   w1 [L][hidden][dim], w2 [L][dim][hidden], w3 [L][hidden][dim], rms_final [dim],
//   freq_cis_real [seq_len][head_dim/2], freq_cis_imag [seq_len][head_dim/2],
//   (wcls [vocab][dim] if vocab_size < 0).
// RoPE of this format rotates adjacent pairs (2i, 2i+1) inside each head.
// load_llama2c (model/weights.h) returns config.rope_style = kAdjacentPairs.
#pragma once
#include <cstdint>
#include <string>

#include "model/model_config.h"

namespace mprefill {

struct Llama2cHeader {
  int32_t dim = 0, hidden_dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, vocab_size = 0,
          seq_len = 0;
  bool shared_classifier() const { return vocab_size > 0; }
  int64_t vocab() const { return vocab_size < 0 ? -int64_t{vocab_size} : vocab_size; }
  int64_t head_dim() const { return dim / n_heads; }
  int64_t kv_dim() const { return head_dim() * n_kv_heads; }
};

constexpr uint64_t kLlama2cHeaderBytes = 7 * 4;

// Decodes the 28 header bytes and checks the values make sense (positive sizes,
// dim % n_heads == 0, even head_dim, n_heads % n_kv_heads == 0, bounded sizes).
// Throws std::runtime_error naming `path` and the bad field.
Llama2cHeader parse_llama2c_header(const void* bytes, const std::string& path);
// Exact file size in bytes implied by a (valid) header, classifier included.
uint64_t llama2c_file_size(const Llama2cHeader& h);
// arch llama, head_dim = dim / n_heads, rope_theta 10000, rms_eps 1e-5, adjacent-pair
// RoPE, tie = vocab_size > 0, max_position = seq_len, bos 1, eos 2.
ModelConfig llama2c_config(const Llama2cHeader& h);

}  // namespace mprefill
