// A token layout as ShardPlan.sp_shards and back: the one codec of the coordinator's plan
// (coordinator/planner.h make_shard_plan), the worker's check of it and its executed plan
// (worker/assignment.h), and the tests. Plain types: a layout is [sp rank] -> global
// [begin, end) token ranges (model/parallel_plan.h std::vector<TokenRanges>); proto/
// includes no other folder. Nothing is checked here (worker/assignment.h checks).
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "worker.pb.h"

namespace mprefill::wire {

namespace v1 = ::mprefill::v1;

using ShardLayout = std::vector<std::vector<std::pair<int64_t, int64_t>>>;

// [layer][tp rank] -> KV heads (model/parallel_plan.h TpPlan::kv_heads).
using TpHeads = std::vector<std::vector<std::vector<int>>>;

// tp, sp and one sp shard per entry of layout (tp_heads left empty).
inline v1::ShardPlan encode_shard_layout(const ShardLayout& layout, int tp, int sp) {
  v1::ShardPlan plan;
  plan.set_tp(tp);
  plan.set_sp(sp);
  for (const auto& ranges : layout) {
    auto* shard = plan.add_sp_shards();
    for (const auto& [b, e] : ranges) {
      auto* r = shard->add_ranges();
      r->set_begin(b);
      r->set_end(e);
    }
  }
  return plan;
}

// The sp shards' ranges as sent.
inline ShardLayout decode_shard_layout(const v1::ShardPlan& plan) {
  ShardLayout layout;
  for (const auto& shard : plan.sp_shards()) {
    auto& ranges = layout.emplace_back();
    for (const auto& r : shard.ranges()) ranges.emplace_back(r.begin(), r.end());
  }
  return layout;
}

// Appends the placement as tp_heads ([layer * tp + tp rank]).
inline void encode_tp_heads(const TpHeads& heads, v1::ShardPlan* plan) {
  for (const auto& layer : heads)
    for (const auto& rank : layer) {
      auto* t = plan->add_tp_heads();
      for (int h : rank) t->add_kv_heads(h);
    }
}

// tp_heads as [layer][tp rank] (empty when none were sent); the last layer is short when
// the count is not a multiple of tp (the worker's check names it).
inline TpHeads decode_tp_heads(const v1::ShardPlan& plan) {
  TpHeads heads;
  const int tp = plan.tp() > 0 ? plan.tp() : 1;
  for (int i = 0; i < plan.tp_heads_size(); ++i) {
    if (i % tp == 0) heads.emplace_back();
    const auto& h = plan.tp_heads(i).kv_heads();
    heads.back().emplace_back(h.begin(), h.end());
  }
  return heads;
}

}  // namespace mprefill::wire
