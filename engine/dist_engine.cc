// Distributed CPU prefill: tensor parallel over KV-head groups x sequence parallel over
// token shards (engine/dist_engine.h).
//
// Per layer on rank (sp s, tp t), x = the residual rows of s's token ranges (replicated
// over the tp ranks of s):
//   xb = rmsnorm(x); q, k, v = xb * W{q,k,v}_t^T (column-parallel: t's head rows); RoPE at
//   global positions; indices of t's heads (given, or estimated over the sp ranks of t);
//   sparse ring attention over the sp ranks of t; y = att * Wo_t^T (row-parallel: t's
//   head columns), all-reduce over tp, x += y; MLP in token chunks with t's slice of the
//   FFN rows (gate / up) and columns (down), partial outputs summed by one all-reduce over
//   tp per layer; K / V of (t's kv heads, s's ranges) to the sink.
// The last position's owner computes the logits (vocab rows split over tp, all-gather),
// then broadcasts them over its sp group, so every rank returns them.
#include "engine/dist_engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <stdexcept>

#include "kernels/cpu/cpu.h"
#include "model/prompt.h"
#include "model/safetensors.h"
#include "model/weight_source.h"
#include "engine/audit.h"
#include "engine/distributed_estimate.h"
#include "engine/plan_codec.h"
#include "engine/ring_attention.h"

namespace mprefill {
namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

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

// The attention slices of one layer for the given kv heads (ascending): rows of Wq / Wk /
// Wv (and biases) of their heads, columns of Wo.
void load_attention(const WeightSource& src, const std::vector<int>& kv_heads, int l,
                    LocalLayer* out) {
  const ModelConfig& c = src.config();
  const ModelWeights* fw = src.full();
  const LayerWeights* L = fw ? &fw->layers[l] : nullptr;
  const std::string p = "model.layers." + std::to_string(l) + ".";
  const int64_t H = c.hidden, hd = c.head_dim, Q = c.q_dim(), KV = c.kv_dim();
  const int group = c.n_heads / c.n_kv_heads;
  LocalLayer& o = *out;
  o.q_heads.clear();
  o.wq.clear();
  o.wk.clear();
  o.wv.clear();
  o.bq.clear();
  o.bk.clear();
  o.bv.clear();
  o.kv_heads = kv_heads;
  for (int g : o.kv_heads)
    for (int j = 0; j < group; ++j) o.q_heads.push_back(g * group + j);
  for (int h : o.q_heads)
    src.rows(p + "self_attn.q_proj.weight", L ? &L->wq : nullptr, Q, H, h * hd, hd, &o.wq);
  for (int g : o.kv_heads) {
    src.rows(p + "self_attn.k_proj.weight", L ? &L->wk : nullptr, KV, H, g * hd, hd, &o.wk);
    src.rows(p + "self_attn.v_proj.weight", L ? &L->wv : nullptr, KV, H, g * hd, hd, &o.wv);
  }
  if (c.qkv_bias) {  // 1-D and small: read whole, keep this rank's heads
    const std::vector<float> bq = src.whole(p + "self_attn.q_proj.bias", L ? &L->bq : nullptr, {Q});
    const std::vector<float> bk =
        src.whole(p + "self_attn.k_proj.bias", L ? &L->bk : nullptr, {KV});
    const std::vector<float> bv =
        src.whole(p + "self_attn.v_proj.bias", L ? &L->bv : nullptr, {KV});
    for (int h : o.q_heads) o.bq.insert(o.bq.end(), bq.begin() + h * hd, bq.begin() + (h + 1) * hd);
    for (int g : o.kv_heads) {
      o.bk.insert(o.bk.end(), bk.begin() + g * hd, bk.begin() + (g + 1) * hd);
      o.bv.insert(o.bv.end(), bv.begin() + g * hd, bv.begin() + (g + 1) * hd);
    }
  }
  // Wo: the columns of each local query head, interleaved into [H][nq * hd].
  const int64_t nq = static_cast<int64_t>(o.q_heads.size());
  o.wo.resize(static_cast<size_t>(H * nq * hd));
  for (int64_t i = 0; i < nq; ++i) {
    const std::vector<float> blk =
        src.cols(p + "self_attn.o_proj.weight", L ? &L->wo : nullptr, H, Q, o.q_heads[i] * hd, hd);
    for (int64_t r = 0; r < H; ++r)
      std::copy_n(blk.begin() + r * hd, hd, o.wo.begin() + r * nq * hd + i * hd);
  }
}

LocalWeights load_local(const WeightSource& src, const TpPlan& placement, int tp_rank) {
  const ModelConfig& c = src.config();
  const ModelWeights* fw = src.full();
  const int64_t H = c.hidden, F = c.intermediate, V = c.vocab, tp = placement.tp;
  LocalWeights w;
  w.cfg = c;
  w.embed = src.whole("model.embed_tokens.weight", fw ? &fw->embed : nullptr, {V, H});
  w.final_norm = src.whole("model.norm.weight", fw ? &fw->final_norm : nullptr, {H});
  const int64_t vchunk = (V + tp - 1) / tp;
  w.v0 = std::min(V, tp_rank * vchunk);
  w.v1 = std::min(V, w.v0 + vchunk);
  if (c.tie_word_embeddings || (fw && fw->lm_head.empty())) {
    w.lm_rows.assign(w.embed.begin() + w.v0 * H, w.embed.begin() + w.v1 * H);
  } else {
    src.rows("lm_head.weight", fw ? &fw->lm_head : nullptr, V, H, w.v0, w.v1 - w.v0, &w.lm_rows);
  }
  w.f0 = F * tp_rank / tp;
  w.f1 = F * (tp_rank + 1) / tp;
  w.layers.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights* L = fw ? &fw->layers[l] : nullptr;
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LocalLayer& o = w.layers[l];
    load_attention(src, placement.kv_heads[l][tp_rank], l, &o);
    o.attn_norm = src.whole(p + "input_layernorm.weight", L ? &L->attn_norm : nullptr, {H});
    o.ffn_norm = src.whole(p + "post_attention_layernorm.weight", L ? &L->ffn_norm : nullptr, {H});
    src.rows(p + "mlp.gate_proj.weight", L ? &L->w_gate : nullptr, F, H, w.f0, w.f1 - w.f0,
             &o.gate);
    src.rows(p + "mlp.up_proj.weight", L ? &L->w_up : nullptr, F, H, w.f0, w.f1 - w.f0, &o.up);
    o.down =
        src.cols(p + "mlp.down_proj.weight", L ? &L->w_down : nullptr, H, F, w.f0, w.f1 - w.f0);
  }
  if (!c.tie_word_embeddings && !fw && !src.has("lm_head.weight", nullptr))
    throw std::runtime_error(
        "tensor lm_head.weight not found (config.json has "
        "tie_word_embeddings false)");
  return w;
}

constexpr int64_t kKeepFullBytes = int64_t{2} << 30;

// Expected tiles per (layer, tp rank) of a placement under a policy at n tokens.
TpPlan placement_cost(const TpPlan& placement, const ModelConfig& c, const SparsePolicy& policy,
                      int64_t n) {
  const int group = c.n_heads / c.n_kv_heads;
  TpPlan cost = placement;
  for (size_t l = 0; l < placement.kv_heads.size(); ++l)
    for (int r = 0; r < placement.tp; ++r) {
      double sum = 0;
      for (int g : placement.kv_heads[l][r])
        for (int j = 0; j < group; ++j)
          sum += expected_tiles(policy.at(static_cast<int>(l), g * group + j, n), n);
      cost.cost[l][r] = sum;
    }
  return cost;
}

// Expected 64x64 tiles of query block b under a head pattern (planning weights, as
// expected_tiles per block).
double expected_block_tiles(const HeadPattern& p, int64_t b, int64_t n) {
  const int64_t causal = b + 1;
  auto cdiv = [](int64_t a, int64_t d) { return (a + d - 1) / d; };
  switch (p.kind) {
    case PatternKind::kDense:
      return static_cast<double>(causal);
    case PatternKind::kAShape:
      return static_cast<double>(std::min(causal, cdiv(p.a, kBlock) + cdiv(p.b, kBlock) + 1));
    case PatternKind::kVerticalSlash:
      return static_cast<double>(std::min<int64_t>(
          causal, clamp_slash_budget(p.b, n) + cdiv(clamp_vertical_budget(p.a, n), kBlock)));
    case PatternKind::kBlockSparse:
      return static_cast<double>(std::min<int64_t>(causal, p.a));
  }
  return 0;
}

// Masks of a set of heads with their index storage.
struct MaskSet {
  std::vector<HeadMask> masks;
  std::vector<VsIndex> vs;  // one per vertical-slash head (stable: reserved up front)

  void build(const std::vector<const HeadPlan*>& plans, const std::vector<HeadPattern>& pats,
             int64_t n) {
    masks.assign(plans.size(), {});
    vs.clear();
    vs.reserve(plans.size());
    for (size_t i = 0; i < plans.size(); ++i) {
      HeadMask& m = masks[i];
      m.kind = plans[i]->kind;
      if (m.kind == PatternKind::kAShape) {
        m.n_init = pats[i].a;
        m.n_local = pats[i].b;
      } else if (m.kind == PatternKind::kVerticalSlash) {
        vs.push_back(cpu::vs_build_index({plans[i]->vs}, n));
        m.vs = view(vs.back());
        m.vs_head = 0;
      } else if (m.kind == PatternKind::kBlockSparse) {
        m.bs.seq_len = n;
        m.bs.nblocks = num_blocks(n);
        m.bs.k = plans[i]->topk;
        m.bs.blocks = plans[i]->blocks.data();
        m.bs_head = 0;
      }
    }
  }
};

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
  // Kept for re-placing the heads per prefill: an HF checkpoint (mmap, no copy) or a
  // full in-memory model up to kKeepFullBytes; null otherwise (placement stays fixed).
  std::unique_ptr<WeightSource> src;
  std::vector<double> inv_freq;

  std::string who() const {
    return "dist engine rank " + std::to_string(rank) + " (sp " + std::to_string(sp_rank) +
           ", tp " + std::to_string(tp_rank) + ")";
  }
  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error(who() + ": " + what);
  }
  void check(comm::Communicator& c, Status s, const char* what) const {
    if (s != Status::kOk) fail(std::string(what) + ": " + c.last_error());
  }
  void check_kernel(Status s, const char* what, int layer) const {
    if (s != Status::kOk)
      fail(std::string(what) + " failed at layer " + std::to_string(layer) + ": " + to_string(s));
  }
  void tp_all_reduce(std::vector<float>& buf) {
    if (topo.tp == 1 || buf.empty()) return;
    check(*tp_comm,
          tp_comm->all_reduce(buf.data(), buf.data(), buf.size(), DType::kF32, comm::ReduceOp::kSum,
                              nullptr),
          "all_reduce over tp");
  }

  DistPrefillResult prefill(const std::vector<int>& ids, const SparsePolicy& policy, KvSink* sink,
                            PrefillPlan* plan_inout, const LayerProgressFn& progress,
                            const AuditOptions& audit, const std::vector<TokenRanges>* sp_layout);
  // The audit of layer l (engine/audit.h), collective; appends to out (same on every rank).
  void audit_layer_dist(int l, const SparsePolicy& policy, int64_t n, const TokenRanges& mine,
                        const std::vector<int64_t>& pos, const std::vector<float>& q,
                        const std::vector<float>& k, const std::vector<float>& v,
                        const std::vector<HeadPlan>& local, const std::vector<HeadPattern>& pats,
                        const AuditOptions& audit, std::vector<HeadAuditResult>* out);
};

DistEngine::DistEngine(comm::Communicator* world, const std::string& model_path, DistTopology topo,
                       EngineOptions opt, DistOptions dist)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  if (!world) throw std::runtime_error("dist engine: no communicator");
  m.world = world;
  m.topo = topo;
  m.opt = opt;
  m.dopt = dist;
  m.rank = world->rank();
  if (topo.tp < 1 || topo.sp < 1)
    throw std::runtime_error("dist engine rank " + std::to_string(m.rank) + ": tp " +
                             std::to_string(topo.tp) + " and sp " + std::to_string(topo.sp) +
                             " must be >= 1");
  if (world->size() != topo.tp * topo.sp)
    throw std::runtime_error("dist engine rank " + std::to_string(m.rank) + ": the group has " +
                             std::to_string(world->size()) + " ranks, tp " +
                             std::to_string(topo.tp) + " x sp " + std::to_string(topo.sp) +
                             " needs " + std::to_string(topo.tp * topo.sp));
  if (opt.mlp_chunk < 1) m.fail("mlp_chunk must be >= 1");
  m.tp_rank = m.rank % topo.tp;
  m.sp_rank = m.rank / topo.tp;

  auto src = std::make_unique<WeightSource>(model_path);
  const ModelConfig& c = src->config();
  if (c.n_kv_heads % topo.tp != 0)
    m.fail("tensor parallel size " + std::to_string(topo.tp) + " must divide the " +
           std::to_string(c.n_kv_heads) + " KV heads of the model");
  dist.placement_policy.check_model(c);
  m.placement = plan_tensor_parallel(c, dist.placement_policy, dist.placement_tokens, topo.tp);
  m.w = load_local(*src, m.placement, m.tp_rank);
  if (!src->full() || src->full_bytes() <= kKeepFullBytes) m.src = std::move(src);
  m.inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling);

  // tp group: same sp rank, ordered by tp rank; sp group: same tp rank, by sp rank.
  m.tp_comm = world->split(m.sp_rank, m.tp_rank);
  if (!m.tp_comm) m.fail("split of the tp communicator failed: " + world->last_error());
  m.sp_comm = world->split(m.tp_rank, m.sp_rank);
  if (!m.sp_comm) m.fail("split of the sp communicator failed: " + world->last_error());
}

DistEngine::~DistEngine() = default;

const ModelConfig& DistEngine::config() const { return impl_->w.cfg; }
DistTopology DistEngine::topology() const { return impl_->topo; }
int DistEngine::rank() const { return impl_->rank; }
int DistEngine::tp_rank() const { return impl_->tp_rank; }
int DistEngine::sp_rank() const { return impl_->sp_rank; }
const TpPlan& DistEngine::placement() const { return impl_->placement; }

DistPrefillResult DistEngine::prefill(const std::vector<int>& ids, const SparsePolicy& policy,
                                      KvSink* sink, PrefillPlan* plan_inout,
                                      const LayerProgressFn& progress, const AuditOptions& audit,
                                      const std::vector<TokenRanges>* sp_layout) {
  return impl_->prefill(ids, policy, sink, plan_inout, progress, audit, sp_layout);
}

void DistEngine::Impl::audit_layer_dist(int l, const SparsePolicy& policy, int64_t n,
                                        const TokenRanges& mine, const std::vector<int64_t>& pos,
                                        const std::vector<float>& q, const std::vector<float>& k,
                                        const std::vector<float>& v,
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
          std::copy_n(q.data() + lr * QL + int64_t{mine_i[j]} * hd, hd,
                      qrows.data() + (int64_t{j} * R + i) * hd);
      }
      li += e - b;
    }
  }
  if (topo.sp > 1 && !qrows.empty())
    check(*sp_comm,
          sp_comm->all_reduce(qrows.data(), qrows.data(), qrows.size(), DType::kF32,
                              comm::ReduceOp::kSum, nullptr),
          "all_reduce of the audit rows over sp");

  // Partials of this rank's key shard, gathered over sp (doubles moved as 8-byte words).
  const int64_t per_row = 3 + 2 * int64_t{hd};
  std::vector<double> enc(static_cast<size_t>(nm * R * per_row));
  std::vector<AuditRows> ars;
  for (int j = 0; j < nm; ++j) {
    ars.push_back(audit_rows(local[mine_i[j]], pats[mine_i[j]], n, blocks));
    // The head's kv head within this rank's kv heads.
    const auto kv_it = std::find(lw.kv_heads.begin(), lw.kv_heads.end(), mine_h[j] / group);
    const int64_t kv_off = int64_t{static_cast<int>(kv_it - lw.kv_heads.begin())} * hd;
    const std::vector<RowPartial> parts = audit_partials(
        ars.back(), qrows.data() + int64_t{j} * R * hd, k.data() + kv_off, v.data() + kv_off, KL,
        pos.data(), static_cast<int64_t>(pos.size()), hd, scale);
    for (int64_t i = 0; i < R; ++i)
      encode_partial(parts[i], hd, enc.data() + (int64_t{j} * R + i) * per_row);
  }
  std::vector<double> all(enc.size() * static_cast<size_t>(topo.sp));
  if (!enc.empty())
    check(*sp_comm, sp_comm->all_gather(enc.data(), all.data(), enc.size(), DType::kI64, nullptr),
          "all_gather of the audit partials over sp");

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
  check(*tp_comm, tp_comm->all_gather(fig.data(), figs.data(), fig.size(), DType::kI64, nullptr),
        "all_gather of the audit figures over tp");
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

DistPrefillResult DistEngine::Impl::prefill(const std::vector<int>& ids, const SparsePolicy& policy,
                                            KvSink* sink, PrefillPlan* plan_inout,
                                            const LayerProgressFn& progress,
                                            const AuditOptions& audit,
                                            const std::vector<TokenRanges>* sp_layout) {
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
  const int L = c.n_layers, hd = c.head_dim, group = c.n_heads / c.n_kv_heads;
  const int64_t H = c.hidden, nb = num_blocks(n);
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));

  DistPrefillResult res;
  PrefillStats& st = res.stats;
  st.tokens = n;
  st.all_dense = all_dense;
  st.plan_reused = reuse;
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < c.n_heads; ++h)
      ++st.heads_by_kind[all_dense ? 0 : static_cast<int>(policy.at(l, h, n).kind)];

  // ---- tp placement: re-place the KV-head groups for this policy and length when the
  // current placement's expected max/mean is over the threshold and a better one exists
  // (only the attention slices of the layers that change are re-read).
  if (topo.tp > 1 && src && dopt.replace_heads_per_prefill) {
    const double cur = placement_cost(placement, c, policy, n).imbalance();
    if (cur > dopt.tp_replace_threshold) {
      TpPlan want = plan_tensor_parallel(c, policy, n, topo.tp);
      if (want.imbalance() < cur) {
        const auto t = Clock::now();
        for (int l = 0; l < L; ++l)
          if (want.kv_heads[l][tp_rank] != placement.kv_heads[l][tp_rank])
            load_attention(*src, want.kv_heads[l][tp_rank], l, &w.layers[l]);
        placement = std::move(want);
        res.tp_replaced = true;
        res.tp_replace_ms = ms_since(t);
      }
    }
  }

  // ---- sp layout: the given one or zigzag, or the weighted split when it is off by more
  // than the threshold (the one runtime change to the plan, reported in sp_rebalanced).
  std::vector<double> bw(static_cast<size_t>(nb), 0.0);
  if (reuse && !all_dense) {
    // One head's mask at a time: a vertical-slash index is O(blocks * (v + s)), a whole
    // layer's of them at 1M tokens would be gigabytes. The layer loop builds the masks of
    // this rank's heads again when it gets there (keeping them from here would hold every
    // layer's at once).
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < c.n_heads; ++h) {
        MaskSet ms;
        ms.build({&plan_inout->layers[l][h]}, {policy.at(l, h, n)}, n);
        for (int64_t b = 0; b < nb; ++b)
          bw[b] += static_cast<double>(mask_tiles(ms.masks[0], b, 0, n, n));
      }
  } else {
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < c.n_heads; ++h) {
        const HeadPattern p = all_dense ? HeadPattern::dense() : policy.at(l, h, n);
        for (int64_t b = 0; b < nb; ++b) bw[b] += expected_block_tiles(p, b, n);
      }
  }
  // The caller's layout (the coordinator's plan, checked by check_sp_layout), else zigzag.
  if (sp_layout && !sp_layout->empty()) check_sp_layout(*sp_layout, n, topo.sp);
  std::vector<TokenRanges> layout =
      sp_layout && !sp_layout->empty() ? *sp_layout : plan_sequence_parallel(n, topo.sp);
  res.sp_imbalance_zigzag = layout_imbalance(layout, bw);
  res.sp_imbalance_predicted = res.sp_imbalance_zigzag;
  if (topo.sp > 1 && res.sp_imbalance_zigzag > dopt.sp_rebalance_threshold) {
    std::vector<TokenRanges> cand = plan_sequence_parallel_weighted(n, topo.sp, bw);
    const double imb = layout_imbalance(cand, bw);
    if (imb < res.sp_imbalance_zigzag) {
      layout = std::move(cand);
      res.sp_rebalanced = true;
      res.sp_imbalance_predicted = imb;
    }
  }
  res.sp_layout = layout;
  const TokenRanges& mine = layout[sp_rank];
  int64_t n_local = 0;
  for (auto [b, e] : mine) n_local += e - b;
  std::vector<int64_t> pos;
  std::vector<int> local_ids;
  for (auto [b, e] : mine)
    for (int64_t t = b; t < e; ++t) {
      pos.push_back(t);
      local_ids.push_back(ids[t]);
    }

  // ---- buffers
  const int64_t F_l = w.f1 - w.f0;
  std::vector<float> x(static_cast<size_t>(n_local * H)), xb(x.size()), y(x.size());
  if (n_local > 0) cpu::embedding(w.embed.data(), c.vocab, H, local_ids.data(), n_local, x.data());
  const int64_t chunk = std::max<int64_t>(1, std::min(opt.mlp_chunk, n_local));
  std::vector<float> gate(static_cast<size_t>(chunk * F_l)), up(gate.size());
  std::vector<std::vector<HeadPlan>> est_plans(L);  // this rank's heads, when estimated
  std::vector<int64_t> tiles_layer(L, 0);

  for (int l = 0; l < L; ++l) {
    const LocalLayer& lw = w.layers[l];
    const int nq = static_cast<int>(lw.q_heads.size()), nkv = static_cast<int>(lw.kv_heads.size());
    const int64_t QL = int64_t{nq} * hd, KL = int64_t{nkv} * hd;
    std::vector<float> q(static_cast<size_t>(n_local * QL)), k(static_cast<size_t>(n_local * KL)),
        v(k.size()), att(q.size());

    auto t = Clock::now();
    if (n_local > 0) {
      cpu::rmsnorm(x.data(), lw.attn_norm.data(), xb.data(), n_local, H, c.rms_eps);
      cpu::gemm_xwt(xb.data(), lw.wq.data(), lw.bq.empty() ? nullptr : lw.bq.data(), q.data(),
                    n_local, H, QL);
      cpu::gemm_xwt(xb.data(), lw.wk.data(), lw.bk.empty() ? nullptr : lw.bk.data(), k.data(),
                    n_local, H, KL);
      cpu::gemm_xwt(xb.data(), lw.wv.data(), lw.bv.empty() ? nullptr : lw.bv.data(), v.data(),
                    n_local, H, KL);
      cpu::rope(q.data(), n_local, nq, hd, QL, hd, pos.data(), 0, inv_freq, c.rope_style);
      cpu::rope(k.data(), n_local, nkv, hd, KL, hd, pos.data(), 0, inv_freq, c.rope_style);
    }
    st.gemm_ms += ms_since(t);

    // ---- indices of this rank's heads
    t = Clock::now();
    std::vector<HeadPattern> pats(nq);
    std::vector<HeadPlan> local(nq);
    for (int i = 0; i < nq; ++i) {
      pats[i] = all_dense ? HeadPattern::dense() : policy.at(l, lw.q_heads[i], n);
      local[i].kind = pats[i].kind;
    }
    if (reuse) {
      for (int i = 0; i < nq; ++i) local[i] = plan_inout->layers[l][lw.q_heads[i]];
    } else {
      // Heads of one kind estimated together: packed q of those heads and the k of each
      // one's kv head (repeated), so every head is its own kv head in the call.
      for (PatternKind kind : {PatternKind::kVerticalSlash, PatternKind::kBlockSparse}) {
        std::vector<int> sel;
        for (int i = 0; i < nq; ++i)
          if (pats[i].kind == kind) sel.push_back(i);
        if (sel.empty()) continue;
        const int ns = static_cast<int>(sel.size());
        std::vector<float> qs(static_cast<size_t>(n_local * ns * hd)), ks(qs.size());
        for (int64_t r = 0; r < n_local; ++r)
          for (int j = 0; j < ns; ++j) {
            std::copy_n(q.data() + r * QL + int64_t{sel[j]} * hd, hd,
                        qs.data() + (r * ns + j) * hd);
            std::copy_n(k.data() + r * KL + int64_t{sel[j] / group} * hd, hd,
                        ks.data() + (r * ns + j) * hd);
          }
        std::vector<int> a(ns), b(ns);
        for (int j = 0; j < ns; ++j) {
          a[j] = pats[sel[j]].a;
          b[j] = pats[sel[j]].b;
        }
        std::string err;
        if (kind == PatternKind::kVerticalSlash) {
          std::vector<VsSelection> out;
          const Status s = vs_estimate_distributed(*sp_comm, mine, n, qs.data(), ks.data(), ns, ns,
                                                   hd, scale, a.data(), b.data(), &out, &err);
          if (s != Status::kOk) fail("layer " + std::to_string(l) + ": " + err);
          for (int j = 0; j < ns; ++j) local[sel[j]].vs = std::move(out[j]);
        } else {
          BlockSparseIndex bix;
          const Status s = block_sparse_estimate_distributed(
              *sp_comm, mine, n, qs.data(), ks.data(), ns, ns, hd, scale, a.data(), &bix, &err);
          if (s != Status::kOk) fail("layer " + std::to_string(l) + ": " + err);
          for (int j = 0; j < ns; ++j) {
            HeadPlan& hp = local[sel[j]];
            hp.topk = a[j];
            hp.blocks.resize(static_cast<size_t>(nb * a[j]));
            for (int64_t qb = 0; qb < nb; ++qb)
              std::copy_n(bix.blocks.begin() + (int64_t{j} * nb + qb) * bix.k, a[j],
                          hp.blocks.begin() + qb * a[j]);
          }
        }
      }
    }
    std::vector<const HeadPlan*> plan_ptrs;
    for (const auto& hp : local) plan_ptrs.push_back(&hp);
    MaskSet ms;
    ms.build(plan_ptrs, pats, n);
    st.estimate_ms += ms_since(t);

    // ---- attention over the sp ring
    t = Clock::now();
    {
      RingStats rs;
      std::string err;
      const Status s =
          ring_attention_sparse_cpu(*sp_comm, layout, n, q.data(), k.data(), v.data(), att.data(),
                                    nullptr, nq, nkv, hd, scale, ms.masks.data(), &rs, &err);
      if (s != Status::kOk) fail("layer " + std::to_string(l) + ": " + err);
      tiles_layer[l] = rs.tiles;
      res.ring_compute_ms += rs.compute_ms;
      res.ring_wait_ms += rs.wait_ms;
      res.ring_bytes_sent += rs.bytes_sent;
    }
    st.attention_ms += ms_since(t);
    if (audit.enabled() && !all_dense) {
      t = Clock::now();
      audit_layer_dist(l, policy, n, mine, pos, q, k, v, local, pats, audit, &st.audit);
      st.audit_ms += ms_since(t);
    }
    if (plan_inout && !reuse) est_plans[l] = std::move(local);

    // ---- O projection (row-parallel) + all-reduce over tp
    t = Clock::now();
    if (n_local > 0) cpu::gemm_xwt(att.data(), lw.wo.data(), nullptr, y.data(), n_local, QL, H);
    tp_all_reduce(y);
    if (n_local > 0) cpu::add_inplace(x.data(), y.data(), n_local * H);
    st.gemm_ms += ms_since(t);

    // ---- MLP in token chunks; partial down projections summed over tp once per layer.
    t = Clock::now();
    for (int64_t t0 = 0; t0 < n_local; t0 += chunk) {
      const int64_t m = std::min(chunk, n_local - t0);
      float* hr = xb.data() + t0 * H;
      cpu::rmsnorm(x.data() + t0 * H, lw.ffn_norm.data(), hr, m, H, c.rms_eps);
      cpu::gemm_xwt(hr, lw.gate.data(), nullptr, gate.data(), m, H, F_l);
      cpu::gemm_xwt(hr, lw.up.data(), nullptr, up.data(), m, H, F_l);
      cpu::swiglu(gate.data(), up.data(), gate.data(), m * F_l);
      cpu::gemm_xwt(gate.data(), lw.down.data(), nullptr, y.data() + t0 * H, m, F_l, H);
    }
    tp_all_reduce(y);
    if (n_local > 0) cpu::add_inplace(x.data(), y.data(), n_local * H);
    st.mlp_ms += ms_since(t);

    // ---- KV of (this rank's kv heads, token ranges)
    if (sink) {
      KvSlice s;
      s.layer = l;
      s.kv_heads = lw.kv_heads;
      s.tokens = mine;
      s.head_dim = hd;
      s.dtype = DType::kF32;
      s.k = k.data();
      s.v = v.data();
      sink->put(s);
      res.kv_bytes_exported += 2 * s.bytes_per_tensor();
    }
    if (progress) progress(l, L);
  }

  // ---- logits of position n - 1: its sp owner computes them (vocab split over tp).
  int owner = -1;
  for (int s = 0; s < topo.sp; ++s)
    for (auto [b, e] : layout[s])
      if (b <= n - 1 && n - 1 < e) owner = s;
  const int64_t vchunk = (c.vocab + topo.tp - 1) / topo.tp;
  std::vector<float> logits(static_cast<size_t>(vchunk * topo.tp), 0.f);
  if (owner == sp_rank) {
    std::vector<float> last(H), part(static_cast<size_t>(vchunk), 0.f);
    cpu::rmsnorm(x.data() + (n_local - 1) * H, w.final_norm.data(), last.data(), 1, H, c.rms_eps);
    cpu::gemm_xwt(last.data(), w.lm_rows.data(), nullptr, part.data(), 1, H, w.v1 - w.v0);
    check(*tp_comm,
          tp_comm->all_gather(part.data(), logits.data(), part.size(), DType::kF32, nullptr),
          "all_gather of the logits over tp");
  }
  if (topo.sp > 1)
    check(*sp_comm, sp_comm->broadcast(logits.data(), logits.size(), DType::kF32, owner, nullptr),
          "broadcast of the logits over sp");
  logits.resize(c.vocab);
  res.logits = std::move(logits);

  // ---- balance: tiles of every (rank, layer)
  {
    std::vector<int64_t> all(static_cast<size_t>(world->size()) * L);
    check(*world, world->all_gather(tiles_layer.data(), all.data(), L, DType::kI64, nullptr),
          "all_gather of the tile counts");
    for (int64_t tl : tiles_layer) res.tiles_computed += tl;
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
    res.sp_imbalance = sp_mean > 0 ? sp_max / sp_mean : 1.0;
    res.tp_imbalance_tiles = tp_mean > 0 ? tp_max / tp_mean : 1.0;
    // Expected cost of the placement under this prefill's policy.
    const TpPlan cost = placement_cost(placement, c, policy, n);
    res.tp_imbalance = cost.imbalance();
  }

  // ---- the estimated plan, identical on every rank: each tp rank's heads (from its sp
  // rank 0) gathered over the world.
  if (plan_inout && !reuse) {
    PrefillPlan& out = *plan_inout;
    out.seq_len = n;
    out.layers.assign(L, std::vector<HeadPlan>(c.n_heads));
    if (!all_dense) {
      std::vector<int32_t> mine_enc;
      if (sp_rank == 0)
        for (int l = 0; l < L; ++l)
          for (size_t i = 0; i < est_plans[l].size(); ++i) {
            mine_enc.push_back(l);
            mine_enc.push_back(w.layers[l].q_heads[i]);
            encode_head_plan(est_plans[l][i], &mine_enc);
          }
      int64_t len = static_cast<int64_t>(mine_enc.size()), max_len = 0;
      check(*world,
            world->all_reduce(&len, &max_len, 1, DType::kI64, comm::ReduceOp::kMax, nullptr),
            "all_reduce of the plan size");
      // Padding is a run of -1 (no layer is -1).
      mine_enc.resize(static_cast<size_t>(max_len), -1);
      std::vector<int32_t> all(static_cast<size_t>(max_len) * world->size());
      check(*world, world->all_gather(mine_enc.data(), all.data(), max_len, DType::kI32, nullptr),
            "all_gather of the estimated plan");
      for (int r = 0; r < world->size(); ++r) {
        std::vector<int32_t> part(all.begin() + static_cast<int64_t>(r) * max_len,
                                  all.begin() + static_cast<int64_t>(r + 1) * max_len);
        size_t at = 0;
        while (at + 1 < part.size() && part[at] >= 0) {
          const int l = part[at], h = part[at + 1];
          at += 2;
          if (l >= L || h < 0 || h >= c.n_heads) fail("bad head in the gathered plan");
          out.layers[l][h] = decode_head_plan(part, &at);
        }
      }
      for (int l = 0; l < L; ++l)
        for (int h = 0; h < c.n_heads; ++h)
          out.layers[l][h].kind = policy.at(l, h, n).kind;  // dense / A-shape carry no index
    }
  }

  if (sink) sink->finish();
  st.total_ms = ms_since(t_start);
  return res;
}

}  // namespace mprefill
