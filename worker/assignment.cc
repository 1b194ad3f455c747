#include "worker/assignment.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "model/prompt.h"
#include "proto/shard_plan.h"

namespace mprefill::worker {

SparsePolicy decode_policy(const v1::Assignment& job, const ModelConfig& cfg) {
  const v1::JobOptions& o = job.options();
  const int64_t dense_below = o.has_dense_below() ? o.dense_below() : kDefaultDenseBelow;
  if (!job.has_policy()) {
    const std::string name = o.sparse().empty() ? "dense" : o.sparse();
    if (!is_builtin_sparse_spec(name))
      throw std::runtime_error("sparse policy '" + name +
                               "': the assignment carries no resolved policy (the coordinator "
                               "resolves configs; the worker opens no path a client named)");
    return load_sparse_policy(name, cfg, dense_below);
  }
  const v1::SparsePolicyTable& t = job.policy();
  SparsePolicy p;
  p.source = t.source().empty() ? "dense" : t.source();
  p.n_layers = t.n_layers();
  p.n_heads = t.n_heads();
  p.dense_below = t.dense_below();
  const int64_t cells = int64_t{t.n_layers()} * t.n_heads();
  if (t.n_layers() < 0 || t.n_heads() < 0 || t.kind_size() != cells || t.a_size() != cells ||
      t.b_size() != cells || (t.tau_size() != 0 && t.tau_size() != cells) ||
      (t.stride_size() != 0 && t.stride_size() != cells) || t.dense_below() < 0)
    throw std::runtime_error("sparse policy '" + p.source + "': the table of " +
                             std::to_string(t.n_layers()) + " layers x " +
                             std::to_string(t.n_heads()) + " heads has " +
                             std::to_string(t.kind_size()) + " patterns (malformed)");
  p.heads.reserve(static_cast<size_t>(cells));
  for (int64_t i = 0; i < cells; ++i) {
    const int k = t.kind(static_cast<int>(i));
    if (k < 0 || k > static_cast<int>(PatternKind::kBlockSparse))
      throw std::runtime_error("sparse policy '" + p.source + "': pattern kind " +
                               std::to_string(k) + " is not one of 0..3");
    const double tau = t.tau_size() ? t.tau(static_cast<int>(i)) : 0.0;
    if (!(tau == 0 || (tau > 0 && tau <= 1)))
      throw std::runtime_error("sparse policy '" + p.source + "': tau " + std::to_string(tau) +
                               " is not 0 or in (0, 1]");
    const int stride = t.stride_size() ? t.stride(static_cast<int>(i)) : 0;
    if (stride != 0 &&
        (k != static_cast<int>(PatternKind::kBlockSparse) || !valid_antidiag_stride(stride)))
      throw std::runtime_error("sparse policy '" + p.source + "': stride " +
                               std::to_string(stride) +
                               " is not 0 or a divisor of 64 on a block-sparse head");
    p.heads.push_back(HeadPattern{static_cast<PatternKind>(k), t.a(static_cast<int>(i)),
                                  t.b(static_cast<int>(i)), tau, stride});
  }
  p.check_model(cfg);
  return p;
}

std::vector<TokenRanges> decode_shard_plan(const v1::ShardPlan& plan, DistTopology group,
                                           int64_t n) {
  if (plan.tp() == 0 && plan.sp() == 0 && plan.sp_shards_size() == 0)
    throw std::runtime_error("shard plan: the assignment carries none (the coordinator plans)");
  if (plan.tp() != group.tp || plan.sp() != group.sp)
    throw std::runtime_error("shard plan: tp " + std::to_string(plan.tp()) + " x sp " +
                             std::to_string(plan.sp()) + " does not match this group's tp " +
                             std::to_string(group.tp) + " x sp " + std::to_string(group.sp));
  std::vector<TokenRanges> layout = wire::decode_shard_layout(plan);
  try {
    check_sp_layout(layout, n, group.sp);
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string("shard plan: ") + e.what());
  }
  return layout;
}

TpPlan decode_tp_placement(const v1::ShardPlan& plan, const ModelConfig& cfg, int tp) {
  TpPlan p;
  p.tp = tp;
  if (plan.tp_heads_size() == 0) return p;
  p.kv_heads = wire::decode_tp_heads(plan);
  try {
    check_tp_placement(p, cfg, tp);
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string("shard plan: ") + e.what());
  }
  return p;
}

JobSpec decode_assignment(const v1::Assignment& job, const ModelConfig& cfg, DistTopology group) {
  JobSpec s;
  s.id = job.job_id();
  s.ids.assign(job.token_ids().begin(), job.token_ids().end());
  check_prompt_ids(cfg, s.ids);
  s.policy = decode_policy(job, cfg);
  s.sp_layout = decode_shard_plan(job.plan(), group, static_cast<int64_t>(s.ids.size()));
  s.tp_placement = decode_tp_placement(job.plan(), cfg, group.tp);
  const v1::JobOptions& o = job.options();
  s.audit.heads_per_layer = std::max(0, o.audit_heads());
  s.sampling.temperature = o.sampling().temperature();
  s.sampling.top_p = o.sampling().top_p() > 0.f ? o.sampling().top_p() : 1.f;
  s.sampling.seed = o.sampling().seed();
  return s;
}

}  // namespace mprefill::worker
