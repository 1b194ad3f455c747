// PrefillPlan as a flat int32 array (to broadcast a fixed plan, or to gather the heads
// that tensor-parallel ranks estimated), and the validation of a reused plan.
//
// Layout: [seq_len lo 31 bits, seq_len hi, n_layers, n_heads, then per (layer, head):
// kind, then by kind: vertical-slash ncols, cols..., noffs, offs...; block-sparse topk,
// nblocks * topk entries; nothing for dense / A-shape].
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "engine/engine.h"

namespace mprefill {

std::vector<int32_t> encode_plan(const PrefillPlan& plan);
// Throws std::runtime_error on a malformed array.
PrefillPlan decode_plan(const std::vector<int32_t>& data);

// One head's entry: appends [kind, payload] to out / reads it at *at.
void encode_head_plan(const HeadPlan& hp, std::vector<int32_t>* out);
HeadPlan decode_head_plan(const std::vector<int32_t>& data, size_t* at);

// What an executor accepts in a given plan beyond the common rules.
struct PlanCheck {
  // Sparse heads may come without indices (the executor estimates them); otherwise a
  // vertical-slash / block-sparse head without indices is an error.
  bool allow_unplanned = false;
  // Block lists: entries ascending, then -1 padding (CPU executors walk them in order).
  bool ascending_blocks = true;
  // Block lists include each query block's own (diagonal) block (the GPU kernels rely on
  // it for the causal edge).
  bool diagonal_block = false;
  std::string prefix;  // prepended to messages, e.g. "cuda engine: "
};

// A reused plan must match the prompt length, the model's layers / heads and the policy's
// kinds, and hold indices the kernels can use without reading out of bounds (vertical-
// slash: ascending columns and descending offsets in [0, N), offset 0 included; block-
// sparse: [blocks][topk] entries in [-1, query block]). Throws std::runtime_error naming
// the layer and head.
void check_prefill_plan(const PrefillPlan& plan, const SparsePolicy& policy, const ModelConfig& cfg,
                        int64_t n, const PlanCheck& rules = {});

}  // namespace mprefill
