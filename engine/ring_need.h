// Which KV blocks of the sp ring pass-KV some receiver actually reads (issue 4 item 3: "do
// not send KV blocks that no receiver needs when that saves time"). Host analysis of a
// filled PrefillPlan at 64-token block granularity, the unit a sparse kernel loads: in the
// ring of engine/cuda/cuda_backend.h the shard of sp rank src travels src -> src+1 ->
// ... -> src-1 (sp - 1 hops); hop k needs the key blocks read by any of the ranks it still
// reaches (src+k .. src+sp-1), over every query head of the tp rank's KV-head group.
// Per query head: dense / A-shape heads need every causal key block (conservative);
// vertical-slash heads the blocks of their columns (those before the receiver's last query)
// and, per offset o, the blocks of [qa - o, qe - 1 - o] for each receiver range [qa, qe);
// block-sparse heads their listed blocks. Skipping could at most save the blocks counted as
// sent but not needed.
#pragma once
#include <cstdint>
#include <vector>

#include "model/model_config.h"
#include "model/parallel_plan.h"
#include "model/sparse_policy.h"
#include "engine/engine.h"

namespace mprefill {

struct RingNeed {
  int64_t sent_blocks = 0;    // KV blocks sent over all hops, layers and tp ranks
  int64_t needed_blocks = 0;  // of those, blocks some downstream receiver reads
  double needed_fraction() const {
    return sent_blocks ? double(needed_blocks) / double(sent_blocks) : 1.0;
  }
};

// plan: filled for every vertical-slash / block-sparse head of policy at n tokens.
// Throws std::runtime_error on a plan that does not match the shapes.
RingNeed ring_kv_need(const PrefillPlan& plan, const SparsePolicy& policy, const ModelConfig& cfg,
                      const std::vector<TokenRanges>& layout, int64_t n, int tp);

}  // namespace mprefill
