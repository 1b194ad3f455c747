// Where a rank's weight slices come from: an HF directory read slice by slice (only the
// requested rows / columns are converted to fp32; the file is memory-mapped), or a full
// in-memory model (llama2.c .bin and random: are loaded whole, then sliced; HF is the
// format of large models). Tensor names are HF's ("model.layers.3.self_attn.q_proj.weight");
// the in-memory form is addressed through the matching Tensor pointer.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/model_config.h"
#include "model/safetensors.h"
#include "model/weights.h"

namespace mprefill {

class WeightSource {
 public:
  // model_path as in load_model(): an HF directory is opened, anything else loaded whole.
  explicit WeightSource(const std::string& model_path);
  // A model already in memory (borrowed: must outlive this source).
  explicit WeightSource(const ModelWeights& borrowed);
  ~WeightSource();

  const ModelConfig& config() const { return cfg_; }

  // Rows [r0, r0 + nr) of a [R][C] tensor, appended to dst.
  void rows(const std::string& hf_name, const Tensor* t, int64_t R, int64_t C, int64_t r0,
            int64_t nr, std::vector<float>* dst) const;
  // Columns [c0, c0 + nc) of a [R][C] tensor, as [R][nc].
  std::vector<float> cols(const std::string& hf_name, const Tensor* t, int64_t R, int64_t C,
                          int64_t c0, int64_t nc) const;
  // A whole 1-D / 2-D tensor.
  std::vector<float> whole(const std::string& hf_name, const Tensor* t,
                           const std::vector<int64_t>& shape) const;
  bool has(const std::string& hf_name, const Tensor* t) const;

  // The in-memory model (null for an HF directory).
  const ModelWeights* full() const { return full_; }
  // Bytes of the in-memory model's matrices (0 for an HF directory).
  int64_t full_bytes() const;
  // Untied LM head: the checkpoint has lm_head.weight (HF) / a non-empty lm_head.
  bool has_lm_head() const;

 private:
  ModelConfig cfg_;
  std::unique_ptr<SafetensorsCheckpoint> ck_;
  std::unique_ptr<ModelWeights> owned_;
  const ModelWeights* full_ = nullptr;
};

}  // namespace mprefill
