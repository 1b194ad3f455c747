// An Assignment turned into what the executor runs, checked before any work: the prompt,
// the coordinator's sparse policy (Assignment.policy; the worker never opens a path a
// client named) and its plan (Assignment.plan: the token layout of every sp rank, which the
// executor runs; the only runtime change is the sparse-aware re-balance inside it).
// Every error is one line naming what does not match; the same on every rank.
#pragma once
#include <cstdint>
#include <vector>

#include "engine/dist_engine.h"
#include "engine/executor.h"
#include "model/model_config.h"
#include "model/parallel_plan.h"
#include "model/sampler.h"
#include "model/sparse_policy.h"
#include "proto/wire.h"

namespace mprefill::worker {

namespace v1 = ::mprefill::v1;

struct JobSpec {
  uint64_t id = 0;
  std::vector<int> ids;
  SparsePolicy policy;
  std::vector<TokenRanges> sp_layout;  // the coordinator's plan, checked
  TpPlan tp_placement;  // its KV heads per (layer, tp rank), checked; empty: none sent
  AuditOptions audit;
  SamplerOptions sampling;
};

// Assignment.policy as a SparsePolicy fitted to cfg. Without one (a coordinator that sent
// none) only the names "dense" / "auto" of options.sparse resolve; a config path is refused.
SparsePolicy decode_policy(const v1::Assignment& job, const ModelConfig& cfg);

// Assignment.plan's token layout. Throws std::runtime_error "shard plan: ..." when the plan
// is missing, its tp x sp is not the group's, or its shards are not a layout of the n
// prompt tokens (model/parallel_plan.h check_sp_layout).
std::vector<TokenRanges> decode_shard_plan(const v1::ShardPlan& plan, DistTopology group,
                                           int64_t n);

// Assignment.plan's KV-head placement (empty kv_heads when it sends none). Throws
// std::runtime_error "shard plan: ..." unless it places cfg's KV heads of every layer on
// the tp ranks (model/parallel_plan.h check_tp_placement).
TpPlan decode_tp_placement(const v1::ShardPlan& plan, const ModelConfig& cfg, int tp);

// All of the above plus the prompt ids' range (check_prompt_ids).
JobSpec decode_assignment(const v1::Assignment& job, const ModelConfig& cfg, DistTopology group);

}  // namespace mprefill::worker
