// Model fingerprint: the shape plus a digest of the weights, computed the same way by
// worker ranks and decoders (the coordinator compares them to pair a worker group with a
// decoder). The digest hashes the fp32 tensors as loaded (format-independent: the same
// weights from a llama2.c .bin and from safetensors agree) together with the
// architecture fields (ModelConfig::fingerprint()). It identifies, it does not protect.
#pragma once
#include <cstdint>
#include <string>

#include "model/weights.h"

namespace mprefill {

struct ModelFingerprint {
  std::string name;  // model_name_from_path()
  int n_layers = 0, hidden = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, vocab = 0;
  int64_t max_position = 0;
  std::string weights_digest;    // 32 hex digits
  DType kv_dtype = DType::kF32;  // model_kv_dtype(): the dtype of every KV page of this model

  bool operator==(const ModelFingerprint& o) const = default;
  std::string to_string() const;  // "stories15M L6 H288 h6/6x48 V32000 kv bf16 digest 1a2b..."
};

// 128-bit digest (hex) of every tensor's shape and bytes, in a fixed order, and of the
// architecture fields. Reads all weights once (~8 GB/s per core with SSE4.2).
std::string weights_digest(const ModelWeights& w);

// "stories15M" for ".../stories15M.bin" or ".../stories15M/", "random:tiny:1" as given.
std::string model_name_from_path(const std::string& path);

ModelFingerprint model_fingerprint(const ModelWeights& w, const std::string& name);

// Equal to model_fingerprint(load_model(path), model_name_from_path(path)), read from the
// files tensor by tensor in reads of about chunk_bytes (HF directory: rows converted to
// fp32 as the loader does; llama2.c .bin: the fp32 arrays), so memory stays O(chunk).
// "random:..." specs have no file: generated whole. Throws as load_model does.
ModelFingerprint model_fingerprint_of_path(const std::string& path,
                                           int64_t chunk_bytes = int64_t{64} << 20);

}  // namespace mprefill
