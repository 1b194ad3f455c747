// This rank's weight slices for DistEngine's CPU forward (engine/dist_engine.h): the
// query / KV heads of its KV-head groups, its FFN rows and LM-head vocab rows, read slice by
// slice from a WeightSource (an HF checkpoint is never read whole).
#pragma once
#include <cstdint>
#include <vector>

#include "engine/cpu_layer.h"
#include "model/parallel_plan.h"
#include "model/weight_source.h"

namespace mprefill {

// This rank's slices of one layer (tp rank t): query heads of t's kv-head groups, the
// FFN rows [f0, f1).
struct LocalLayer {
  std::vector<int> kv_heads, q_heads;  // model ids, ascending
  std::vector<float> attn_norm, ffn_norm;
  std::vector<float> wq, wk, wv;  // [heads * head_dim][hidden]
  std::vector<float> bq, bk, bv;  // empty unless qkv_bias
  std::vector<float> wo;          // [hidden][q heads * head_dim]
  std::vector<float> gate, up;    // [f1 - f0][hidden]
  std::vector<float> down;        // [hidden][f1 - f0]
};

struct LocalWeights {
  ModelConfig cfg;
  std::vector<float> embed;       // [vocab][hidden], full (any token id may come)
  std::vector<float> final_norm;  // [hidden]
  int64_t v0 = 0, v1 = 0;         // LM-head rows of this tp rank
  std::vector<float> lm_rows;     // [v1 - v0][hidden] (a copy when tied)
  int64_t f0 = 0, f1 = 0;
  std::vector<LocalLayer> layers;
};

// The head lists of a layer holding the given kv heads (ascending) and their query heads.
void set_heads(const ModelConfig& c, const std::vector<int>& kv_heads, LocalLayer* out);
// The attention slices of layer l for the given kv heads (ascending): rows of Wq / Wk / Wv
// (and biases) of their heads, columns of Wo; replaces those of *out.
void load_attention(const WeightSource& src, const std::vector<int>& kv_heads, int l,
                    LocalLayer* out);
// Every slice of tp rank tp_rank under a placement of the KV-head groups.
LocalWeights load_local(const WeightSource& src, const TpPlan& placement, int tp_rank);
// The layer-forward view of a layer's slices (ffn: FFN rows held, f1 - f0).
CpuLayer cpu_layer(const LocalLayer& L, int64_t ffn);

}  // namespace mprefill
