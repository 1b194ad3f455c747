#include "engine/executor.h"

#include <stdexcept>
#include <utility>

namespace mprefill {

const char* to_string(Backend b) { return b == Backend::kCuda ? "cuda" : "cpu"; }

Backend parse_backend(const std::string& s) {
  if (s == "cpu") return Backend::kCpu;
  if (s == "cuda") return Backend::kCuda;
  throw std::invalid_argument("device must be cpu or cuda, got '" + s + "'");
}

void check_request(const Executor& e, const PrefillRequest& req) {
  const std::string who =
      std::string(e.name()) + " executor (rank " + std::to_string(e.rank()) + "): ";
  if (!req.ids) throw std::runtime_error(who + "the request has no prompt ids");
  const ExecutorCaps c = e.caps();
  if (req.audit.enabled() && !c.audit)
    throw std::runtime_error(who +
                             "the head audit (audit_heads) is not supported; it runs on "
                             "--device cpu groups");
  if (req.plan && !req.plan->empty() && !c.fixed_plan)
    throw std::runtime_error(who + "fixed sparse indices (a filled plan) are not supported");
  if (req.policy)
    check_policy(c, *req.policy, static_cast<int64_t>(req.ids->size()), req.plan, who);
  if (!req.sp_layout.empty()) {
    const int64_t n = static_cast<int64_t>(req.ids->size());
    const int sp = e.topology().sp;
    try {
      check_sp_layout(req.sp_layout, n, sp);
    } catch (const std::exception& x) {
      throw std::runtime_error(who + x.what());
    }
    if (!c.sp_layout && req.sp_layout != plan_sequence_parallel(n, sp))
      throw std::runtime_error(who +
                               "a token layout other than the zigzag split is not supported; "
                               "it runs on --device cpu groups");
  }
  if (!req.tp_placement.kv_heads.empty()) {
    try {
      check_tp_placement(req.tp_placement, e.config(), e.topology().tp);
    } catch (const std::exception& x) {
      throw std::runtime_error(who + x.what());
    }
    if (!c.any_tp_placement && !is_contiguous(req.tp_placement, e.config()))
      throw std::runtime_error(who +
                               "a KV-head placement other than the contiguous one is not "
                               "supported (its groups did not advertise tp_any_placement)");
  }
}

void check_policy(const ExecutorCaps& c, const SparsePolicy& policy, int64_t n,
                  const PrefillPlan* plan, const std::string& who) {
  if (policy.all_dense(n) || (c.adaptive_blocks && c.antidiagonal_blocks)) return;
  for (int l = 0; l < policy.n_layers; ++l)
    for (int h = 0; h < policy.n_heads; ++h) {
      const HeadPattern hp = policy.at(l, h, n);
      if (hp.kind != PatternKind::kBlockSparse) continue;
      const bool given = plan && static_cast<size_t>(l) < plan->layers.size() &&
                         static_cast<size_t>(h) < plan->layers[l].size() &&
                         !plan->layers[l][h].blocks.empty();
      if (given) continue;
      if (hp.antidiagonal() && !c.antidiagonal_blocks)
        throw std::runtime_error(who + "sparse policy " + policy.source +
                                 ": antidiagonal block scores (stride) are not supported (no "
                                 "antidiagonal estimator on this backend yet); use --device "
                                 "cpu or the pooled block score");
      if (hp.adaptive() && !c.adaptive_blocks)
        throw std::runtime_error(who + "sparse policy " + policy.source +
                                 ": adaptive block-sparse heads (tau) are not supported (no "
                                 "block-mass selection on this backend yet); use --device "
                                 "cpu, a fixed top-k or vertical-slash heads");
    }
}

namespace {

// The CPU backend: DistEngine for every topology (one process is tp1 x sp1; each layer's
// KV leaves as soon as the layer is done, on every shape).
class CpuExecutor final : public Executor {
 public:
  CpuExecutor(const ExecutorSpec& spec, comm::Communicator* world)
      : engine_(world, spec.model, spec.topo) {}

  const ModelConfig& config() const override { return engine_.config(); }
  DistTopology topology() const override { return engine_.topology(); }
  int rank() const override { return engine_.rank(); }
  Backend backend() const override { return Backend::kCpu; }
  ExecutorCaps caps() const override {
    ExecutorCaps c;
    c.audit = true;
    c.fixed_plan = true;
    c.abort_mid_prefill = true;
    c.sp_layout = true;
    c.adaptive_blocks = true;
    c.antidiagonal_blocks = true;
    c.any_tp_placement = engine_.can_replace_heads();
    return c;
  }
  const char* name() const override { return "cpu-dist"; }

  PrefillResult prefill(const PrefillRequest& req, KvSink* sink) override {
    check_request(*this, req);
    const SparsePolicy dense = SparsePolicy::dense();
    PrefillPlan plan;
    if (req.plan) plan = *req.plan;
    DistPrefillResult r = engine_.prefill(
        *req.ids, req.policy ? *req.policy : dense, sink, req.plan ? &plan : nullptr, req.progress,
        req.audit, &req.sp_layout, req.tp_placement.kv_heads.empty() ? nullptr : &req.tp_placement);
    PrefillResult out;
    out.logits = std::move(r.logits);
    const PrefillStats& s = r.stats;
    out.tokens = s.tokens;
    out.all_dense = s.all_dense;
    for (int k = 0; k < 4; ++k) out.heads_by_kind[k] = s.heads_by_kind[k];
    out.total_ms = s.total_ms;
    out.gemm_ms = s.gemm_ms;
    out.attention_ms = s.attention_ms;
    out.estimate_ms = s.estimate_ms;
    out.ring_wait_ms = r.ring_wait_ms;
    out.measured = true;
    out.kv_dtype = DType::kF32;
    out.kv_bytes_exported = r.kv_bytes_exported;
    out.sp_layout = std::move(r.sp_layout);
    out.sp_rebalanced = r.sp_rebalanced;
    out.sp_imbalance = r.sp_imbalance;
    out.tp_imbalance = r.tp_imbalance;
    out.tp_placement.tp = engine_.topology().tp;
    out.tp_placement.kv_heads = engine_.placement().kv_heads;
    out.tp_replaced = r.tp_replaced;
    out.tp_replace_ms = r.tp_replace_ms;
    out.sp_imbalance_planned = r.sp_imbalance_zigzag;
    out.tiles_computed = r.tiles_computed;
    out.audit = s.audit;
    out.audit_ms = s.audit_ms;
    return out;
  }

 private:
  DistEngine engine_;
};

}  // namespace

std::unique_ptr<Executor> make_cpu_executor(const ExecutorSpec& spec, comm::Communicator* world) {
  if (!world) throw std::runtime_error("cpu executor: no communicator for the group");
  return std::make_unique<CpuExecutor>(spec, world);
}

}  // namespace mprefill
