// CudaBackend::prefill: checks before any device work, the one workspace, the planned
// indices, then the layers (engine/cuda/layer_forward.h) and the logits.
#include "engine/cuda/cuda_backend.h"

#include <algorithm>
#include <chrono>

#include "engine/cuda/backend_impl.h"
#include "engine/cuda/layer_forward.h"
#include "engine/plan_codec.h"
#include "model/prompt.h"

namespace mprefill::gpu {
namespace {

// Planned indices of this rank's heads, into the per-layer plan buffers.
void upload_plan(const Fail& f, const ModelConfig& c, const Geometry& g, const Setup& S,
                 const Bufs& B, const PrefillPlan& plan) {
  std::vector<int> tmp;
  for (int l = 0; l < c.n_layers; ++l) {
    if (S.plan_vs_ocap[l] > 0) {
      const int cc = std::max(S.plan_vs_ccap[l], 1), oc = S.plan_vs_ocap[l];
      std::vector<int> cols(size_t(g.nh) * cc, 0), offs(size_t(g.nh) * oc, 0), nc(g.nh, 0),
          no(g.nh, 0);
      for (int h = 0; h < g.nh; ++h) {
        const HeadPlan& hp = plan.layers[l][g.head0 + h];
        if (hp.kind != PatternKind::kVerticalSlash || !head_planned(hp)) continue;
        std::copy(hp.vs.columns.begin(), hp.vs.columns.end(), cols.begin() + size_t(h) * cc);
        std::copy(hp.vs.offsets.begin(), hp.vs.offsets.end(), offs.begin() + size_t(h) * oc);
        nc[h] = static_cast<int>(hp.vs.columns.size());
        no[h] = static_cast<int>(hp.vs.offsets.size());
      }
      f.ck(cudaMemcpy(B.pv_cols[l], cols.data(), cols.size() * 4, cudaMemcpyHostToDevice), "plan");
      f.ck(cudaMemcpy(B.pv_offs[l], offs.data(), offs.size() * 4, cudaMemcpyHostToDevice), "plan");
      f.ck(cudaMemcpy(B.pv_nc[l], nc.data(), nc.size() * 4, cudaMemcpyHostToDevice), "plan");
      f.ck(cudaMemcpy(B.pv_no[l], no.data(), no.size() * 4, cudaMemcpyHostToDevice), "plan");
    }
    if (S.plan_bs_k[l] > 0) {
      const int K = S.plan_bs_k[l];
      tmp.assign(size_t(g.nh) * S.nb * K, -1);
      for (int h = 0; h < g.nh; ++h) {
        const HeadPlan& hp = plan.layers[l][g.head0 + h];
        if (hp.kind != PatternKind::kBlockSparse || !head_planned(hp)) continue;
        for (int64_t b = 0; b < S.nb; ++b)
          for (int j = 0; j < hp.topk; ++j)
            tmp[(size_t(h) * S.nb + b) * K + j] = hp.blocks[b * hp.topk + j];
      }
      f.ck(cudaMemcpy(B.pb_blocks[l], tmp.data(), tmp.size() * 4, cudaMemcpyHostToDevice), "plan");
    }
  }
}

// Max / mean over the sp ranks of causal 64x64 tiles (the zigzag balance).
double sp_imbalance(const std::vector<TokenRanges>& layout) {
  double mx = 0, sum = 0;
  for (const TokenRanges& r : layout) {
    const double t = double(causal_tiles(r));
    mx = std::max(mx, t);
    sum += t;
  }
  return sum > 0 ? mx / (sum / layout.size()) : 1.0;
}

}  // namespace

MemoryPlan CudaBackend::plan_memory(int64_t n, const SparsePolicy& policy) const {
  const Fail& f = impl_->fail;
  if (n < 1) f.raise("a prompt has at least one token");
  policy.check_model(cfg_);
  return measure(make_setup(cfg_, impl_->geo, opt_, n, policy, nullptr, PrefillOptions{}, f), cfg_,
                 impl_->geo, opt_, weight_bytes_, f);
}

std::vector<float> CudaBackend::prefill(const std::vector<int>& ids, const SparsePolicy& policy,
                                        KvSink* sink, PrefillPlan* plan_inout,
                                        CudaPrefillStats* stats, const PrefillOptions& popt) {
  const auto t_start = std::chrono::steady_clock::now();
  const ModelConfig& c = cfg_;
  Impl& I = *impl_;
  const Fail& f = I.fail;
  const Geometry& g = I.geo;
  // ---- validation (before any device work)
  try {
    check_prompt_ids(c, ids);
  } catch (const std::exception& e) {
    f.raise(e.what());
  }
  const int64_t n = static_cast<int64_t>(ids.size());
  policy.check_model(c);
  const bool reuse = plan_inout && !plan_inout->empty();
  if (reuse) {
    PlanCheck rules;
    rules.allow_unplanned = true;  // unplanned sparse heads are estimated here
    rules.ascending_blocks = false;
    rules.diagonal_block = true;
    rules.prefix = f.who;
    check_prefill_plan(*plan_inout, policy, c, n, rules);
  }
  const bool fill_plan = plan_inout && !reuse;
  const Setup S = make_setup(c, g, opt_, n, policy, reuse ? plan_inout : nullptr, popt, f);

  // ---- the one allocation, carved in a fixed order (sizing pass, then for real)
  const MemoryPlan mp = measure(S, c, g, opt_, weight_bytes_, f);
  if (!mp.fits) f.raise("refused: " + mp.describe());
  void* base = nullptr;
  f.ck(cudaMalloc(&base, mp.workspace - S.sp_est_scratch),
       "allocating the prefill workspace (" + mp.describe() + ")");
  struct Free {
    void* p;
    ~Free() { cudaFree(p); }
  } free_guard{base};
  Bufs B{};
  Sizes sz;
  Carver real;
  real.base = static_cast<char*>(base);
  carve_all(real, S, c, g, B, sz);
  size_t free_after = 0, total_b = 0;
  cudaMemGetInfo(&free_after, &total_b);

  // ---- ids (and global positions) of this rank's rows, planned indices
  cudaStream_t st = I.st;
  if (g.sp == 1) {
    f.ck(cudaMemcpyAsync(B.ids, ids.data(), n * sizeof(int), cudaMemcpyHostToDevice, st),
         "uploading ids");
  } else {
    std::vector<int> ids_l;
    std::vector<int64_t> pos_l;
    for (auto [b, e] : S.layout[g.sp_rank])
      for (int64_t p = b; p < e; ++p) {
        ids_l.push_back(ids[p]);
        pos_l.push_back(p);
      }
    // Pageable sources: the copies are staged before the calls return.
    f.ck(cudaMemcpyAsync(B.ids, ids_l.data(), S.nl * 4, cudaMemcpyHostToDevice, st),
         "uploading ids");
    f.ck(cudaMemcpyAsync(B.pos, pos_l.data(), S.nl * 8, cudaMemcpyHostToDevice, st),
         "uploading positions");
  }
  if (reuse) upload_plan(f, c, g, S, B, *plan_inout);
  if (fill_plan) {
    plan_inout->seq_len = n;
    plan_inout->layers.assign(c.n_layers, std::vector<HeadPlan>(c.n_heads));
  }

  CudaPrefillStats stl;
  CudaPrefillStats& ST = stats ? *stats : stl;
  ST = CudaPrefillStats{};
  ST.tokens = n;
  ST.all_dense = S.all_dense;
  ST.plan_reused = reuse;
  ST.memory = mp;
  ST.peak_device_bytes = total_b - free_after;
  ST.layers.assign(c.n_layers, LayerTimes{});
  ST.sp_layout = S.layout;
  ST.local_tokens = S.nl;
  ST.sp_imbalance = sp_imbalance(S.layout);

  // ---- forward
  LayerForward::Inputs in{&c, &I, &S, &B, &opt_, &policy, plan_inout, fill_plan, &popt, sink, &ST};
  LayerForward fw(in);
  fw.embed();
  for (int l = 0; l < c.n_layers; ++l) fw.layer(l);
  std::vector<float> logits = fw.logits(world_);
  if (sink) sink->finish();
  fw.collect_times();
  ST.total_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_start).count();
  return logits;
}

}  // namespace mprefill::gpu
