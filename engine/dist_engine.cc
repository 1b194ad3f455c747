// Distributed CPU prefill: tensor parallel over KV-head groups x sequence parallel over
// token shards (engine/dist_engine.h).
//
// Per layer on rank (sp s, tp t), x = the residual rows of s's token ranges (replicated
// over the tp ranks of s), the layer forward of engine/cpu_layer.h (the one Engine runs)
// with t's slices (engine/cpu_shard.h):
//   xb = rmsnorm(x); q, k, v = xb * W{q,k,v}_t^T (column-parallel: t's head rows); RoPE at
//   global positions; attention (Ring below): indices of t's heads (given, or estimated
//   over the sp ranks of t), sparse ring attention over the sp ranks of t; y = att *
//   Wo_t^T (row-parallel: t's head columns), all-reduce over tp, x += y; MLP in token
//   chunks with t's slice of the FFN rows (gate / up) and columns (down), partial outputs
//   summed by one all-reduce over tp per layer; K / V of (t's kv heads, s's ranges) to
//   the sink.
// The last position's owner computes the logits (vocab rows split over tp, all-gather),
// then broadcasts them over its sp group, so every rank returns them.
#include "engine/dist_engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <memory>
#include <stdexcept>
#include <utility>

#include "engine/audit.h"
#include "engine/cpu_layer.h"
#include "engine/cpu_shard.h"
#include "engine/distributed_estimate.h"
#include "engine/plan_codec.h"
#include "engine/ring_attention.h"
#include "kernels/cpu/cpu.h"
#include "kernels/edge_check.h"
#include "model/prompt.h"
#include "model/safetensors.h"
#include "model/weight_source.h"

namespace mprefill {
namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

constexpr int64_t kKeepFullBytes = int64_t{2} << 30;

}  // namespace

struct DistEngine::Impl {
  comm::Communicator* world = nullptr;
  std::unique_ptr<comm::Communicator> tp_comm, sp_comm;
  DistTopology topo;
  EngineOptions opt;
  DistOptions dopt;
  int rank = 0, tp_rank = 0, sp_rank = 0;
  TpPlan placement;
  LocalWeights w;
  // tp 1 over an in-memory model (llama2.c, random:, or borrowed): the forward reads it in
  // place and w holds the head lists only (no copy of the weights).
  const ModelWeights* whole = nullptr;
  // Kept for re-placing the heads per prefill: an HF checkpoint (mmap, no copy) or a
  // full in-memory model up to kKeepFullBytes (any size when `whole` points into it);
  // null otherwise (placement stays fixed).
  std::unique_ptr<WeightSource> src;
  std::vector<double> inv_freq;

  void init(comm::Communicator* comm, DistTopology t, const EngineOptions& o,
            const DistOptions& dist, const std::function<std::unique_ptr<WeightSource>()>& open);
  // The forward's view of this rank's weights.
  std::vector<CpuLayer> layer_views() const {
    std::vector<CpuLayer> v;
    for (int l = 0; l < w.cfg.n_layers; ++l)
      v.push_back(whole ? whole_layer(w.cfg, whole->layers[l])
                        : cpu_layer(w.layers[l], w.f1 - w.f0));
    return v;
  }
  const float* embed() const { return whole ? whole->embed.data.data() : w.embed.data(); }
  const float* final_norm() const {
    return whole ? whole->final_norm.data.data() : w.final_norm.data();
  }
  const float* lm_rows() const {  // [v1 - v0][hidden]
    return whole ? whole->output_matrix().data.data() : w.lm_rows.data();
  }

  std::string who() const {
    // The single-process Engine runs this over the one-rank group (comm/self_comm.h).
    if (world && std::string(world->backend()) == "self") return "engine";
    return "dist engine rank " + std::to_string(rank) + " (sp " + std::to_string(sp_rank) +
           ", tp " + std::to_string(tp_rank) + ")";
  }
  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error(who() + ": " + what);
  }
  void tp_all_reduce(float* buf, int64_t count) {
    if (topo.tp == 1 || count == 0) return;
    MPREFILL_EDGE_CHECK(tp_comm->all_reduce(buf, buf, static_cast<size_t>(count), DType::kF32,
                                            comm::ReduceOp::kSum, nullptr),
                        who() + ": all_reduce over tp", tp_comm->last_error());
  }

  // The attention of a prefill: indices of this rank's heads, the sparse sp ring, the
  // audit, the KV export (defined below).
  class Ring;

  DistPrefillResult prefill(const std::vector<int>& ids, const SparsePolicy& policy, KvSink* sink,
                            PrefillPlan* plan_inout, const LayerProgressFn& progress,
                            const AuditOptions& audit, const std::vector<TokenRanges>* sp_layout,
                            const TpPlan* tp_placement);
  // Steps of prefill: the tp re-placement of the KV-head groups, the sp layout, the
  // logits of the last position (on every rank), the balance figures, the estimated plan
  // gathered over the world (identical on every rank).
  void replace_heads(const SparsePolicy& policy, int64_t n, const TpPlan* given,
                     DistPrefillResult* res);
  void choose_layout(const SparsePolicy& policy, int64_t n, const PrefillPlan* fixed,
                     const std::vector<TokenRanges>* given, DistPrefillResult* res) const;
  std::vector<float> last_logits(const std::vector<float>& x, int64_t n,
                                 const std::vector<TokenRanges>& layout);
  void balance(const std::vector<int64_t>& tiles_layer, const SparsePolicy& policy, int64_t n,
               DistPrefillResult* res);
  void gather_plan(const std::vector<std::vector<HeadPlan>>& est_plans, const SparsePolicy& policy,
                   int64_t n, PrefillPlan* out);
  // The audit of layer l (engine/audit.h), collective; appends to out (same on every rank).
  // q [pos.size()][local q heads * head_dim], k / v [pos.size()][local kv heads * head_dim].
  void audit_layer_dist(int l, const SparsePolicy& policy, int64_t n, const TokenRanges& mine,
                        const std::vector<int64_t>& pos, const float* q, const float* k,
                        const float* v, const std::vector<HeadPlan>& local,
                        const std::vector<HeadPattern>& pats, const AuditOptions& audit,
                        std::vector<HeadAuditResult>* out);
};

DistEngine::DistEngine(comm::Communicator* world, const std::string& model_path, DistTopology topo,
                       EngineOptions opt, DistOptions dist)
    : impl_(std::make_unique<Impl>()) {
  impl_->init(world, topo, opt, dist, [&] { return std::make_unique<WeightSource>(model_path); });
}

DistEngine::DistEngine(comm::Communicator* world, const ModelWeights& w, DistTopology topo,
                       EngineOptions opt, DistOptions dist)
    : impl_(std::make_unique<Impl>()) {
  impl_->init(world, topo, opt, dist, [&] { return std::make_unique<WeightSource>(w); });
}

void DistEngine::Impl::init(comm::Communicator* comm, DistTopology t, const EngineOptions& o,
                            const DistOptions& dist,
                            const std::function<std::unique_ptr<WeightSource>()>& open) {
  if (!comm) throw std::runtime_error("dist engine: no communicator");
  world = comm;
  topo = t;
  opt = o;
  dopt = dist;
  rank = world->rank();
  if (topo.tp < 1 || topo.sp < 1)
    throw std::runtime_error("dist engine rank " + std::to_string(rank) + ": tp " +
                             std::to_string(topo.tp) + " and sp " + std::to_string(topo.sp) +
                             " must be >= 1");
  if (world->size() != topo.tp * topo.sp)
    throw std::runtime_error("dist engine rank " + std::to_string(rank) + ": the group has " +
                             std::to_string(world->size()) + " ranks, tp " +
                             std::to_string(topo.tp) + " x sp " + std::to_string(topo.sp) +
                             " needs " + std::to_string(topo.tp * topo.sp));
  if (opt.mlp_chunk < 1) fail("mlp_chunk must be >= 1");
  tp_rank = rank % topo.tp;
  sp_rank = rank / topo.tp;

  std::unique_ptr<WeightSource> s = open();
  const ModelConfig& c = s->config();
  if (c.n_kv_heads % topo.tp != 0)
    fail("tensor parallel size " + std::to_string(topo.tp) + " must divide the " +
         std::to_string(c.n_kv_heads) + " KV heads of the model");
  dist.placement_policy.check_model(c);
  placement = place_kv_heads(c, dist.placement_policy, dist.placement_tokens, topo.tp, nullptr,
                             /*any=*/true, dist.tp_replace_threshold);
  if (topo.tp == 1 && s->full()) {
    // One tp rank holds every weight: the forward reads the in-memory model in place.
    whole = s->full();
    w.cfg = c;
    w.v1 = c.vocab;
    w.f1 = c.intermediate;
    w.layers.resize(c.n_layers);
    for (int l = 0; l < c.n_layers; ++l) set_heads(c, placement.kv_heads[l][0], &w.layers[l]);
    src = std::move(s);
  } else {
    w = load_local(*s, placement, tp_rank);
    if (!s->full() || s->full_bytes() <= kKeepFullBytes) src = std::move(s);
  }
  inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling);

  // tp group: same sp rank, ordered by tp rank; sp group: same tp rank, by sp rank.
  tp_comm = world->split(sp_rank, tp_rank);
  MPREFILL_EDGE_CHECK(tp_comm ? Status::kOk : Status::kCommError,
                      who() + ": split of the tp communicator", world->last_error());
  sp_comm = world->split(tp_rank, sp_rank);
  MPREFILL_EDGE_CHECK(sp_comm ? Status::kOk : Status::kCommError,
                      who() + ": split of the sp communicator", world->last_error());
}

DistEngine::~DistEngine() = default;

const ModelConfig& DistEngine::config() const { return impl_->w.cfg; }
DistTopology DistEngine::topology() const { return impl_->topo; }
int DistEngine::rank() const { return impl_->rank; }
int DistEngine::tp_rank() const { return impl_->tp_rank; }
int DistEngine::sp_rank() const { return impl_->sp_rank; }
const TpPlan& DistEngine::placement() const { return impl_->placement; }
bool DistEngine::can_replace_heads() const { return impl_->topo.tp <= 1 || impl_->src; }

DistPrefillResult DistEngine::prefill(const std::vector<int>& ids, const SparsePolicy& policy,
                                      KvSink* sink, PrefillPlan* plan_inout,
                                      const LayerProgressFn& progress, const AuditOptions& audit,
                                      const std::vector<TokenRanges>* sp_layout,
                                      const TpPlan* tp_placement) {
  return impl_->prefill(ids, policy, sink, plan_inout, progress, audit, sp_layout, tp_placement);
}

void DistEngine::Impl::audit_layer_dist(int l, const SparsePolicy& policy, int64_t n,
                                        const TokenRanges& mine, const std::vector<int64_t>& pos,
                                        const float* q, const float* k, const float* v,
                                        const std::vector<HeadPlan>& local,
                                        const std::vector<HeadPattern>& pats,
                                        const AuditOptions& audit,
                                        std::vector<HeadAuditResult>* out) {
  const ModelConfig& c = w.cfg;
  const LocalLayer& lw = w.layers[l];
  const int hd = c.head_dim, group = c.n_heads / c.n_kv_heads;
  const int64_t QL = int64_t{static_cast<int>(lw.q_heads.size())} * hd;
  const int64_t KL = int64_t{static_cast<int>(lw.kv_heads.size())} * hd;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  const std::vector<int> heads = audit_heads(policy, l, c.n_heads, n, audit);
  if (heads.empty()) return;
  const std::vector<int64_t> blocks = audit_blocks(n, l, audit);
  // Sampled heads of this tp rank (same on every sp rank of it): index into lw.q_heads.
  std::vector<int> mine_h;  // model head ids
  std::vector<int> mine_i;  // local index
  for (int h : heads) {
    auto it = std::find(lw.q_heads.begin(), lw.q_heads.end(), h);
    if (it == lw.q_heads.end()) continue;
    mine_h.push_back(h);
    mine_i.push_back(static_cast<int>(it - lw.q_heads.begin()));
  }
  std::vector<int64_t> rows;
  for (int64_t b : blocks)
    for (int64_t r = b * kBlock; r < std::min(n, (b + 1) * kBlock); ++r) rows.push_back(r);
  const int64_t R = static_cast<int64_t>(rows.size());
  const int nm = static_cast<int>(mine_h.size());

  // q rows of the sampled heads, summed over sp: each row has one owner, the rest write 0.
  std::vector<float> qrows(static_cast<size_t>(nm * R * hd), 0.f);
  {
    int64_t li = 0;  // local row of the range start
    for (auto [b, e] : mine) {
      for (int64_t i = 0; i < R; ++i) {
        if (rows[i] < b || rows[i] >= e) continue;
        const int64_t lr = li + rows[i] - b;
        for (int j = 0; j < nm; ++j)
          std::copy_n(q + lr * QL + int64_t{mine_i[j]} * hd, hd,
                      qrows.data() + (int64_t{j} * R + i) * hd);
      }
      li += e - b;
    }
  }
  if (topo.sp > 1 && !qrows.empty())
    MPREFILL_EDGE_CHECK(sp_comm->all_reduce(qrows.data(), qrows.data(), qrows.size(), DType::kF32,
                                            comm::ReduceOp::kSum, nullptr),
                        who() + ": all_reduce of the audit rows over sp", sp_comm->last_error());

  // Partials of this rank's key shard, gathered over sp (doubles moved as 8-byte words).
  const int64_t per_row = 3 + 2 * int64_t{hd};
  std::vector<double> enc(static_cast<size_t>(nm * R * per_row));
  std::vector<AuditRows> ars;
  for (int j = 0; j < nm; ++j) {
    ars.push_back(audit_rows(local[mine_i[j]], pats[mine_i[j]], n, blocks));
    // The head's kv head within this rank's kv heads.
    const auto kv_it = std::find(lw.kv_heads.begin(), lw.kv_heads.end(), mine_h[j] / group);
    const int64_t kv_off = int64_t{static_cast<int>(kv_it - lw.kv_heads.begin())} * hd;
    const std::vector<RowPartial> parts =
        audit_partials(ars.back(), qrows.data() + int64_t{j} * R * hd, k + kv_off, v + kv_off, KL,
                       pos.data(), static_cast<int64_t>(pos.size()), hd, scale);
    for (int64_t i = 0; i < R; ++i)
      encode_partial(parts[i], hd, enc.data() + (int64_t{j} * R + i) * per_row);
  }
  std::vector<double> all(enc.size() * static_cast<size_t>(topo.sp));
  if (!enc.empty())
    MPREFILL_EDGE_CHECK(
        sp_comm->all_gather(enc.data(), all.data(), enc.size(), DType::kI64, nullptr),
        who() + ": all_gather of the audit partials over sp", sp_comm->last_error());

  // Figures of this tp rank's heads, then of every head over tp (NaN: not this rank's).
  constexpr int kFig = 4;  // recall, max error, fro error, rows
  std::vector<double> fig(heads.size() * kFig, std::nan(""));
  for (int j = 0; j < nm; ++j) {
    std::vector<RowPartial> merged(R);
    for (int s = 0; s < topo.sp; ++s)
      for (int64_t i = 0; i < R; ++i)
        merged[i].merge(decode_partial(
            all.data() + static_cast<size_t>(s) * enc.size() + (int64_t{j} * R + i) * per_row, hd));
    const HeadAuditResult r = audit_result(l, mine_h[j], pats[mine_i[j]], merged);
    const size_t at = std::find(heads.begin(), heads.end(), mine_h[j]) - heads.begin();
    fig[at * kFig + 0] = r.recall;
    fig[at * kFig + 1] = r.output_rel_error;
    fig[at * kFig + 2] = r.output_rel_error_fro;
    fig[at * kFig + 3] = static_cast<double>(r.rows);
  }
  std::vector<double> figs(fig.size() * static_cast<size_t>(topo.tp));
  MPREFILL_EDGE_CHECK(
      tp_comm->all_gather(fig.data(), figs.data(), fig.size(), DType::kI64, nullptr),
      who() + ": all_gather of the audit figures over tp", tp_comm->last_error());
  for (size_t i = 0; i < heads.size(); ++i) {
    HeadAuditResult r;
    r.layer = l;
    r.head = heads[i];
    r.pattern = policy.at(l, heads[i], n);
    bool found = false;
    for (int t = 0; t < topo.tp && !found; ++t) {
      const double* f = figs.data() + static_cast<size_t>(t) * fig.size() + i * kFig;
      if (std::isnan(f[3])) continue;
      r.recall = f[0];
      r.output_rel_error = f[1];
      r.output_rel_error_fro = f[2];
      r.rows = static_cast<int64_t>(f[3]);
      found = true;
    }
    if (!found)
      fail("audit: no tp rank holds layer " + std::to_string(l) + " head " +
           std::to_string(heads[i]));
    out->push_back(r);
  }
}

// What one prefill's attention works with on this rank (prefill fills it).
struct RingJob {
  const SparsePolicy* policy = nullptr;
  int64_t n = 0;
  const PrefillPlan* fixed = nullptr;  // the given plan, or null: estimate
  bool all_dense = false;
  bool keep_plans = false;          // keep the estimated indices (est_plans)
  std::vector<TokenRanges> layout;  // every sp rank's ranges, as the ring sees them
  TokenRanges exported;             // this rank's ranges as the KV slices name them
  std::vector<int64_t> pos;         // global position of each local row
  KvSink* sink = nullptr;
  const LayerProgressFn* progress = nullptr;
  const AuditOptions* audit = nullptr;
  PrefillStats* stats = nullptr;
};

// Layer-by-layer state of one prefill on this rank (CpuAttention of cpu_forward).
class DistEngine::Impl::Ring final : public CpuAttention {
 public:
  Ring(Impl& m, const RingJob& job)
      : m_(m),
        j_(job),
        policy_(*job.policy),
        n_(job.n),
        mine_(job.layout[m.sp_rank]),
        pos_(job.pos) {
    est_plans.resize(m.w.cfg.n_layers);
    tiles_layer.assign(m.w.cfg.n_layers, 0);
  }

  void kv_rows(int l, float** k, float** v) override {
    const int64_t kl =
        int64_t{static_cast<int>(m_.w.layers[l].kv_heads.size())} * m_.w.cfg.head_dim;
    k_.assign(static_cast<size_t>(pos_.size() * kl), 0.f);
    v_.assign(k_.size(), 0.f);
    *k = k_.data();
    *v = v_.data();
  }

  void attend(int l, const float* q, float* att) override {
    const ModelConfig& c = m_.w.cfg;
    const LocalLayer& lw = m_.w.layers[l];
    const int nq = static_cast<int>(lw.q_heads.size()), nkv = static_cast<int>(lw.kv_heads.size());
    const float scale = 1.f / std::sqrt(static_cast<float>(c.head_dim));
    auto t = Clock::now();
    std::vector<HeadPattern> pats(nq);
    std::vector<HeadPlan> local(nq);
    for (int i = 0; i < nq; ++i) {
      pats[i] = j_.all_dense ? HeadPattern::dense() : policy_.at(l, lw.q_heads[i], n_);
      local[i].kind = pats[i].kind;
    }
    if (j_.fixed) {
      for (int i = 0; i < nq; ++i) local[i] = j_.fixed->layers[l][lw.q_heads[i]];
    } else {
      estimate(l, q, scale, pats, &local);
    }
    std::vector<const HeadPlan*> plan_ptrs;
    for (const auto& hp : local) plan_ptrs.push_back(&hp);
    HeadMaskSet ms;
    ms.build(plan_ptrs, pats, n_);
    j_.stats->estimate_ms += ms_since(t);

    t = Clock::now();
    RingStats rs;
    std::string err;
    MPREFILL_EDGE_CHECK(
        ring_attention_sparse_cpu(*m_.sp_comm, j_.layout, n_, q, k_.data(), v_.data(), att, nullptr,
                                  nq, nkv, c.head_dim, scale, ms.masks.data(), &rs, &err),
        m_.who() + ": ring attention at layer " + std::to_string(l), err);
    tiles_layer[l] = rs.tiles;
    ring_compute_ms += rs.compute_ms;
    ring_wait_ms += rs.wait_ms;
    ring_bytes_sent += rs.bytes_sent;
    j_.stats->attention_ms += ms_since(t);
    if (j_.audit->enabled() && !j_.all_dense) {
      t = Clock::now();
      m_.audit_layer_dist(l, policy_, n_, mine_, pos_, q, k_.data(), v_.data(), local, pats,
                          *j_.audit, &j_.stats->audit);
      j_.stats->audit_ms += ms_since(t);
    }
    if (j_.keep_plans) est_plans[l] = std::move(local);
  }

  void layer_done(int l) override {
    const ModelConfig& c = m_.w.cfg;
    if (j_.sink) {
      KvSlice s;
      s.layer = l;
      s.kv_heads = m_.w.layers[l].kv_heads;
      s.tokens = j_.exported;
      s.head_dim = c.head_dim;
      s.dtype = DType::kF32;
      s.k = k_.data();
      s.v = v_.data();
      j_.sink->put(s);
      kv_bytes_exported += 2 * s.bytes_per_tensor();
    }
    if (*j_.progress) (*j_.progress)(l, c.n_layers);
  }

  std::vector<std::vector<HeadPlan>> est_plans;  // this rank's heads, when estimated
  std::vector<int64_t> tiles_layer;
  double ring_compute_ms = 0, ring_wait_ms = 0;
  int64_t ring_bytes_sent = 0, kv_bytes_exported = 0;

 private:
  // Indices of this rank's vertical-slash and block-sparse heads, estimated over the sp
  // ranks. Heads of one kind (and block score) are estimated together: packed q of those
  // heads and the k of each one's kv head (repeated), so every head is its own kv head.
  void estimate(int l, const float* q, float scale, const std::vector<HeadPattern>& pats,
                std::vector<HeadPlan>* local) const {
    const ModelConfig& c = m_.w.cfg;
    const LocalLayer& lw = m_.w.layers[l];
    const int hd = c.head_dim, group = c.n_heads / c.n_kv_heads;
    const int nq = static_cast<int>(lw.q_heads.size());
    const int64_t QL = int64_t{nq} * hd, KL = int64_t{static_cast<int>(lw.kv_heads.size())} * hd;
    const int64_t n_local = static_cast<int64_t>(pos_.size()), nb = num_blocks(n_);
    std::vector<std::pair<PatternKind, int>> groups;  // (kind, block score stride), VS first
    for (const HeadPattern& p : pats)
      if (p.kind == PatternKind::kVerticalSlash || p.kind == PatternKind::kBlockSparse)
        groups.emplace_back(p.kind, p.stride);
    std::sort(groups.begin(), groups.end());
    groups.erase(std::unique(groups.begin(), groups.end()), groups.end());
    for (const auto& [kind, stride] : groups) {
      std::vector<int> sel;
      for (int i = 0; i < nq; ++i)
        if (pats[i].kind == kind && pats[i].stride == stride) sel.push_back(i);
      const int ns = static_cast<int>(sel.size());
      std::vector<float> qs(static_cast<size_t>(n_local * ns * hd)), ks(qs.size());
      for (int64_t r = 0; r < n_local; ++r)
        for (int j = 0; j < ns; ++j) {
          std::copy_n(q + r * QL + int64_t{sel[j]} * hd, hd, qs.data() + (r * ns + j) * hd);
          std::copy_n(k_.data() + r * KL + int64_t{sel[j] / group} * hd, hd,
                      ks.data() + (r * ns + j) * hd);
        }
      std::vector<int> a(ns), b(ns);
      std::vector<double> tau(ns);
      for (int j = 0; j < ns; ++j) {
        a[j] = pats[sel[j]].a;
        b[j] = pats[sel[j]].b;
        tau[j] = pats[sel[j]].tau;
      }
      std::string err;
      if (kind == PatternKind::kVerticalSlash) {
        std::vector<VsSelection> out;
        MPREFILL_EDGE_CHECK(
            vs_estimate_distributed(*m_.sp_comm, mine_, n_, qs.data(), ks.data(), ns, ns, hd, scale,
                                    a.data(), b.data(), &out, &err, nullptr, tau.data()),
            m_.who() + ": vertical-slash estimation at layer " + std::to_string(l), err);
        for (int j = 0; j < ns; ++j) (*local)[sel[j]].vs = std::move(out[j]);
      } else {
        BlockSparseIndex bix;
        MPREFILL_EDGE_CHECK(
            block_sparse_estimate_distributed(*m_.sp_comm, mine_, n_, qs.data(), ks.data(), ns, ns,
                                              hd, scale, a.data(), &bix, &err, tau.data(), stride),
            m_.who() + ": block-sparse estimation at layer " + std::to_string(l), err);
        for (int j = 0; j < ns; ++j) {
          HeadPlan& hp = (*local)[sel[j]];
          hp.topk = a[j];
          hp.blocks.resize(static_cast<size_t>(nb * a[j]));
          for (int64_t qb = 0; qb < nb; ++qb)
            std::copy_n(bix.blocks.begin() + (int64_t{j} * nb + qb) * bix.k, a[j],
                        hp.blocks.begin() + qb * a[j]);
        }
      }
    }
  }

  Impl& m_;
  const RingJob& j_;
  const SparsePolicy& policy_;
  const int64_t n_;
  const TokenRanges& mine_;
  const std::vector<int64_t>& pos_;
  std::vector<float> k_, v_;  // this layer's K / V rows of this rank
};

// Runs the given placement (the coordinator's plan), else re-places the KV-head groups for
// this policy and length when the current placement's expected max/mean is over the
// threshold and a better one exists (place_kv_heads). Only the attention slices of the
// layers whose heads move on this rank are re-read.
void DistEngine::Impl::replace_heads(const SparsePolicy& policy, int64_t n, const TpPlan* given,
                                     DistPrefillResult* res) {
  const ModelConfig& c = w.cfg;
  if (given) {
    try {
      check_tp_placement(*given, c, topo.tp);
    } catch (const std::exception& e) {
      fail(e.what());
    }
  }
  if (topo.tp <= 1) return;
  TpPlan want;
  if (given)
    want = *given;
  else if (src && dopt.replace_heads_per_prefill)
    want = place_kv_heads(c, policy, n, topo.tp, &placement, true, dopt.tp_replace_threshold);
  else
    return;
  if (want.kv_heads == placement.kv_heads) return;
  if (!src) {
    int l = 0;
    while (want.kv_heads[l] == placement.kv_heads[l]) ++l;
    fail("KV-head placement: layer " + std::to_string(l) +
         " moves heads between tp ranks, but this group cannot re-read attention slices (a "
         "llama2.c or random model over 2 GiB is not kept in memory); it runs the contiguous "
         "placement only");
  }
  const auto t = Clock::now();
  for (int l = 0; l < c.n_layers; ++l)
    if (want.kv_heads[l][tp_rank] != placement.kv_heads[l][tp_rank])
      load_attention(*src, want.kv_heads[l][tp_rank], l, &w.layers[l]);
  placement = placement_cost(want, c, policy, n);  // costs under this prefill's policy
  res->tp_replaced = true;
  res->tp_replace_ms = ms_since(t);
}

// The given layout (the coordinator's plan) or the zigzag, or the weighted split when it is
// off by more than the threshold (the one runtime change to the plan, reported in
// sp_rebalanced). Block weights: the tiles of the fixed plan's masks, else the policy's
// expected tiles per block.
void DistEngine::Impl::choose_layout(const SparsePolicy& policy, int64_t n,
                                     const PrefillPlan* fixed,
                                     const std::vector<TokenRanges>* given,
                                     DistPrefillResult* res) const {
  const ModelConfig& c = w.cfg;
  if (given && !given->empty()) check_sp_layout(*given, n, topo.sp);
  if (topo.sp == 1) {  // one rank: nothing to balance
    res->sp_layout = given && !given->empty() ? *given : plan_sequence_parallel(n, 1);
    return;
  }
  const int64_t nb = num_blocks(n);
  const bool all_dense = policy.all_dense(n);
  std::vector<double> bw(static_cast<size_t>(nb), 0.0);
  if (fixed && !all_dense) {
    // One head's mask at a time: a vertical-slash index is O(blocks * (v + s)), a whole
    // layer's of them at 1M tokens would be gigabytes. The layer loop builds the masks of
    // this rank's heads again when it gets there (keeping them from here would hold every
    // layer's at once).
    for (int l = 0; l < c.n_layers; ++l)
      for (int h = 0; h < c.n_heads; ++h) {
        HeadMaskSet ms;
        ms.build({&fixed->layers[l][h]}, {policy.at(l, h, n)}, n);
        for (int64_t b = 0; b < nb; ++b)
          bw[b] += static_cast<double>(mask_tiles(ms.masks[0], b, 0, n, n));
      }
  } else {
    for (int l = 0; l < c.n_layers; ++l)
      for (int h = 0; h < c.n_heads; ++h) {
        const HeadPattern p = all_dense ? HeadPattern::dense() : policy.at(l, h, n);
        for (int64_t b = 0; b < nb; ++b) bw[b] += expected_block_tiles(p, b, n);
      }
  }
  // The caller's layout (the coordinator's plan, checked above), else zigzag.
  std::vector<TokenRanges> layout =
      given && !given->empty() ? *given : plan_sequence_parallel(n, topo.sp);
  res->sp_imbalance_zigzag = layout_imbalance(layout, bw);
  res->sp_imbalance_predicted = res->sp_imbalance_zigzag;
  if (res->sp_imbalance_zigzag > dopt.sp_rebalance_threshold) {
    std::vector<TokenRanges> cand = plan_sequence_parallel_weighted(n, topo.sp, bw);
    const double imb = layout_imbalance(cand, bw);
    if (imb < res->sp_imbalance_zigzag) {
      layout = std::move(cand);
      res->sp_rebalanced = true;
      res->sp_imbalance_predicted = imb;
    }
  }
  res->sp_layout = std::move(layout);
}

// Position n - 1's sp owner computes the logits (vocab rows split over tp, all-gathered)
// and broadcasts them over sp.
std::vector<float> DistEngine::Impl::last_logits(const std::vector<float>& x, int64_t n,
                                                 const std::vector<TokenRanges>& layout) {
  const ModelConfig& c = w.cfg;
  const int64_t H = c.hidden;
  int owner = -1;
  for (int s = 0; s < topo.sp; ++s)
    for (auto [b, e] : layout[s])
      if (b <= n - 1 && n - 1 < e) owner = s;
  const int64_t vchunk = (c.vocab + topo.tp - 1) / topo.tp;
  std::vector<float> logits(static_cast<size_t>(vchunk * topo.tp), 0.f);
  if (owner == sp_rank) {
    std::vector<float> part(static_cast<size_t>(vchunk), 0.f);
    const int64_t n_local = static_cast<int64_t>(x.size()) / H;
    cpu_logits(cpu_shape(c, inv_freq, opt.mlp_chunk), x.data() + (n_local - 1) * H, final_norm(),
               lm_rows(), w.v1 - w.v0, part.data());
    MPREFILL_EDGE_CHECK(
        tp_comm->all_gather(part.data(), logits.data(), part.size(), DType::kF32, nullptr),
        who() + ": all_gather of the logits over tp", tp_comm->last_error());
  }
  if (topo.sp > 1)
    MPREFILL_EDGE_CHECK(
        sp_comm->broadcast(logits.data(), logits.size(), DType::kF32, owner, nullptr),
        who() + ": broadcast of the logits over sp", sp_comm->last_error());
  logits.resize(c.vocab);
  return logits;
}

// Tiles of every (rank, layer): sum over layers of the max over ranks / of the mean.
void DistEngine::Impl::balance(const std::vector<int64_t>& tiles_layer, const SparsePolicy& policy,
                               int64_t n, DistPrefillResult* res) {
  const int L = w.cfg.n_layers;
  std::vector<int64_t> all(static_cast<size_t>(world->size()) * L);
  MPREFILL_EDGE_CHECK(world->all_gather(tiles_layer.data(), all.data(), L, DType::kI64, nullptr),
                      who() + ": all_gather of the tile counts", world->last_error());
  for (int64_t tl : tiles_layer) res->tiles_computed += tl;
  double sp_max = 0, sp_mean = 0, tp_max = 0, tp_mean = 0;
  for (int l = 0; l < L; ++l) {
    std::vector<double> per_sp(topo.sp, 0.0), per_tp(topo.tp, 0.0);
    for (int r = 0; r < world->size(); ++r) {
      per_sp[r / topo.tp] += static_cast<double>(all[static_cast<size_t>(r) * L + l]);
      per_tp[r % topo.tp] += static_cast<double>(all[static_cast<size_t>(r) * L + l]);
    }
    sp_max += *std::max_element(per_sp.begin(), per_sp.end());
    tp_max += *std::max_element(per_tp.begin(), per_tp.end());
    for (double v : per_sp) sp_mean += v / topo.sp;
    for (double v : per_tp) tp_mean += v / topo.tp;
  }
  res->sp_imbalance = sp_mean > 0 ? sp_max / sp_mean : 1.0;
  res->tp_imbalance_tiles = tp_mean > 0 ? tp_max / tp_mean : 1.0;
  // Expected cost of the placement under this prefill's policy.
  res->tp_imbalance = placement_cost(placement, w.cfg, policy, n).imbalance();
}

// Each tp rank's heads (from its sp rank 0) gathered over the world.
void DistEngine::Impl::gather_plan(const std::vector<std::vector<HeadPlan>>& est_plans,
                                   const SparsePolicy& policy, int64_t n, PrefillPlan* out) {
  const ModelConfig& c = w.cfg;
  const int L = c.n_layers;
  out->seq_len = n;
  out->layers.assign(L, std::vector<HeadPlan>(c.n_heads));
  if (policy.all_dense(n)) return;
  std::vector<int32_t> mine_enc;
  if (sp_rank == 0)
    for (int l = 0; l < L; ++l)
      for (size_t i = 0; i < est_plans[l].size(); ++i) {
        mine_enc.push_back(l);
        mine_enc.push_back(w.layers[l].q_heads[i]);
        encode_head_plan(est_plans[l][i], &mine_enc);
      }
  int64_t len = static_cast<int64_t>(mine_enc.size()), max_len = 0;
  MPREFILL_EDGE_CHECK(
      world->all_reduce(&len, &max_len, 1, DType::kI64, comm::ReduceOp::kMax, nullptr),
      who() + ": all_reduce of the plan size", world->last_error());
  // Padding is a run of -1 (no layer is -1).
  mine_enc.resize(static_cast<size_t>(max_len), -1);
  std::vector<int32_t> all(static_cast<size_t>(max_len) * world->size());
  MPREFILL_EDGE_CHECK(world->all_gather(mine_enc.data(), all.data(), max_len, DType::kI32, nullptr),
                      who() + ": all_gather of the estimated plan", world->last_error());
  for (int r = 0; r < world->size(); ++r) {
    std::vector<int32_t> part(all.begin() + static_cast<int64_t>(r) * max_len,
                              all.begin() + static_cast<int64_t>(r + 1) * max_len);
    size_t at = 0;
    while (at + 1 < part.size() && part[at] >= 0) {
      const int l = part[at], h = part[at + 1];
      at += 2;
      if (l >= L || h < 0 || h >= c.n_heads) fail("bad head in the gathered plan");
      out->layers[l][h] = decode_head_plan(part, &at);
    }
  }
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < c.n_heads; ++h)
      out->layers[l][h].kind = policy.at(l, h, n).kind;  // dense / A-shape carry no index
}

DistPrefillResult DistEngine::Impl::prefill(const std::vector<int>& ids, const SparsePolicy& policy,
                                            KvSink* sink, PrefillPlan* plan_inout,
                                            const LayerProgressFn& progress,
                                            const AuditOptions& audit,
                                            const std::vector<TokenRanges>* sp_layout,
                                            const TpPlan* tp_placement) {
  const auto t_start = Clock::now();
  audit.validate();
  const ModelConfig& c = w.cfg;
  const int64_t n = static_cast<int64_t>(ids.size());
  try {
    check_prompt_ids(c, ids);
  } catch (const std::exception& e) {
    fail(e.what());
  }
  policy.check_model(c);
  const bool reuse = plan_inout && !plan_inout->empty();
  if (reuse) check_prefill_plan(*plan_inout, policy, c, n);
  const bool all_dense = policy.all_dense(n);

  DistPrefillResult res;
  PrefillStats& st = res.stats;
  st.tokens = n;
  st.all_dense = all_dense;
  st.plan_reused = reuse;
  replace_heads(policy, n, tp_placement, &res);
  for (int l = 0; l < c.n_layers; ++l)  // this rank's heads under the placement it runs
    for (int h : w.layers[l].q_heads)
      ++st.heads_by_kind[all_dense ? 0 : static_cast<int>(policy.at(l, h, n).kind)];
  choose_layout(policy, n, reuse ? plan_inout : nullptr, sp_layout, &res);
  RingJob job;
  job.policy = &policy;
  job.n = n;
  job.fixed = reuse ? plan_inout : nullptr;
  job.all_dense = all_dense;
  job.keep_plans = plan_inout && !reuse;
  // At sp 1 the rank holds every row in order (check_sp_layout: ascending ranges, each
  // token once): one range, so that its attention is one kernel call per head group,
  // bit-identical to the dense single-process forward (the zigzag's two touching ranges
  // would be two partial results merged by log-sum-exp).
  job.layout = topo.sp == 1 ? std::vector<TokenRanges>{{{0, n}}} : res.sp_layout;
  job.exported = res.sp_layout[sp_rank];
  job.sink = sink;
  job.progress = &progress;
  job.audit = &audit;
  job.stats = &st;
  std::vector<int> local_ids;
  for (auto [b, e] : job.layout[sp_rank])
    for (int64_t t = b; t < e; ++t) {
      job.pos.push_back(t);
      local_ids.push_back(ids[t]);
    }
  Ring ring(*this, job);
  const std::vector<CpuLayer> layers = layer_views();
  CpuForwardParams f;
  f.shape = cpu_shape(c, inv_freq, opt.mlp_chunk);
  f.layers = layers.data();
  f.n_layers = c.n_layers;
  f.embed = embed();
  f.vocab = c.vocab;
  f.ids = local_ids.data();
  f.n = static_cast<int64_t>(local_ids.size());
  f.pos = job.pos.data();
  f.attention = &ring;
  f.reduce = [this](float* buf, int64_t count) { tp_all_reduce(buf, count); };
  f.stats = &st;
  const std::vector<float> x = cpu_forward(f);
  res.ring_compute_ms = ring.ring_compute_ms;
  res.ring_wait_ms = ring.ring_wait_ms;
  res.ring_bytes_sent = ring.ring_bytes_sent;
  res.kv_bytes_exported = ring.kv_bytes_exported;

  res.logits = last_logits(x, n, res.sp_layout);
  balance(ring.tiles_layer, policy, n, &res);
  if (plan_inout && !reuse) gather_plan(ring.est_plans, policy, n, plan_inout);
  if (sink) sink->finish();
  st.total_ms = ms_since(t_start);
  return res;
}

}  // namespace mprefill
