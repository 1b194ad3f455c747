// Shared model fixtures of the test suites: sparse policies that mix every kind over heads
// and layers, and the GPU suites' small model. C++20 (model/); the CUDA test sources
// (C++17) include tests/testutil.h, not this.
#pragma once
#include <cstdint>
#include <vector>

#include "model/model_config.h"
#include "model/sparse_policy.h"

namespace mprefill::test {

// Per-head mixes of every kind (source "test-mix"): head h of layer l runs
// kinds[(l + h) % kinds.size()], so each layer holds every kind and neighbouring heads (one
// GQA group, one tp or sp rank's heads) run different ones.
SparsePolicy cycled_policy(const ModelConfig& cfg, const std::vector<HeadPattern>& kinds,
                           int64_t dense_below = 0);

// cycled_policy over dense, A-shape, vertical-slash, block-sparse, in that order.
SparsePolicy mixed_policy(const ModelConfig& cfg, HeadPattern ashape, HeadPattern vs,
                          HeadPattern bs, int64_t dense_below = 0);

// The GPU suites' small Llama-shaped model: 2 layers, 4 heads, GQA 2:1, head_dim 128
// (every build has the bf16 / head_dim 128 sparse kernels), hidden 256, vocab 384.
ModelConfig small_gqa_config();

// The GPU suites' per-head mix of a 2-layer, 4-head model: every kind, runs of one kind
// that split GQA groups (layer 0: dense, A-shape, VS, block-sparse; layer 1: VS, VS,
// block-sparse, A-shape). Throws std::invalid_argument for another shape.
SparsePolicy gqa_split_policy(const ModelConfig& cfg);

}  // namespace mprefill::test
