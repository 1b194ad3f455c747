// Per-prefill setup of CudaBackend: the launch pieces of every layer, the sparse-index
// capacities, and the one workspace (sized, then carved) with its MemoryPlan.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "engine/cuda/backend_impl.h"
#include "kernels/cuda/index/index.h"
#include "kernels/cuda/sparse/sparse_attention.h"

namespace mprefill::gpu {
namespace {

double gib(size_t b) { return static_cast<double>(b) / double(size_t{1} << 30); }

// Split this rank's heads of one layer into launches.
std::vector<Piece> make_pieces(const ModelConfig& c, const Geometry& g, const SparsePolicy& policy,
                               const PrefillPlan* plan, int layer, int64_t n) {
  const int group = c.n_heads / c.n_kv_heads;
  std::vector<Piece> out;
  if (policy.all_dense(n)) {
    out.push_back({PatternKind::kDense, 0, g.nh, 0, g.nkv, 0, 0, false});
    return out;
  }
  auto key = [&](int h) {
    const HeadPattern hp = policy.at(layer, g.head0 + h, n);
    Piece p;
    p.kind = hp.kind;
    if (hp.kind == PatternKind::kAShape) {
      p.a = hp.a;
      p.b = hp.b;
    }
    p.planned = plan && !plan->empty() && head_planned(plan->layers[layer][g.head0 + h]);
    return p;
  };
  auto same = [](const Piece& x, const Piece& y) {
    return x.kind == y.kind && x.a == y.a && x.b == y.b && x.planned == y.planned;
  };
  // head0 is a whole number of groups, so local and global heads agree modulo group.
  int h = 0;
  while (h < g.nh) {
    Piece p = key(h);
    int e = h + 1;
    while (e < g.nh && same(key(e), p)) ++e;
    // [h, e) shares the key; cut into a leading partial group, whole groups, a tail.
    int s = h;
    while (s < e) {
      int len;
      if (s % group != 0 || e - s < group) {
        len = std::min(e, (s / group + 1) * group) - s;  // inside one KV group
      } else {
        len = (e - s) / group * group;  // whole groups
      }
      Piece q = p;
      q.h0 = s;
      q.nh = len;
      q.kv0 = s / group;
      q.nkv = (s % group != 0 || len < group) ? 1 : len / group;
      out.push_back(q);
      s += len;
    }
    h = e;
  }
  return out;
}

// Worst-case CSR entries (ranges, columns) of a vertical-slash head with v columns and s
// diagonals over nb blocks: per block b at most min(s, b + 1) ranges (disjoint,
// non-touching, each >= 64 wide) and min(v, 64 (b + 1)) columns.
void vs_worst_case(int v, int s, int64_t nb, int64_t* ranges, int64_t* cols) {
  for (int64_t b = 0; b < nb; ++b) {
    *ranges += std::min<int64_t>(s, b + 1);
    *cols += std::min<int64_t>(v, 64 * (b + 1));
  }
}

// Sparse sizing of one piece: capacities of the estimation and of the index.
void size_piece(const ModelConfig& c, const Geometry& g, const SparsePolicy& policy,
                const PrefillPlan* plan, const PrefillOptions& popt, int l, const Piece& p,
                const Fail& fail, Setup& S, int64_t* r_need, int64_t* c_need) {
  const int64_t n = S.n;
  for (int h = g.head0 + p.h0; h < g.head0 + p.h0 + p.nh; ++h) {
    const HeadPattern hp = policy.at(l, h, n);
    const bool estimate = !p.planned || popt.estimate_with_plan;
    if (p.kind == PatternKind::kVerticalSlash) {
      S.any_vs = true;
      int v = clamp_vertical_budget(hp.a, n), s = clamp_slash_budget(hp.b, n);
      if (p.planned) {
        const VsSelection& sel = plan->layers[l][h].vs;
        v = static_cast<int>(sel.columns.size());
        s = static_cast<int>(sel.offsets.size());
        S.plan_vs_ccap[l] = std::max(S.plan_vs_ccap[l], v);
        S.plan_vs_ocap[l] = std::max(S.plan_vs_ocap[l], s);
      }
      if (estimate) {
        S.vs_col_cap = std::max(S.vs_col_cap, clamp_vertical_budget(hp.a, n));
        S.vs_off_cap = std::max(S.vs_off_cap, clamp_slash_budget(hp.b, n));
      }
      vs_worst_case(v, s, S.nb, r_need, c_need);
    } else if (p.kind == PatternKind::kBlockSparse) {
      S.any_bs = true;
      if (hp.a < 1) fail.raise("block-sparse head needs top-k >= 1");
      if (p.planned) S.plan_bs_k[l] = std::max(S.plan_bs_k[l], plan->layers[l][h].topk);
      if (estimate) S.bs_kmax = std::max(S.bs_kmax, hp.a);
    }
  }
  (void)c;
}

// Workspace of the estimation and index kernels: the largest over the calls this
// prefill makes (local estimators at sp 1; the index build at any sp).
size_t estimation_workspace(const ModelConfig& c, const Geometry& g, const Setup& S) {
  const int hd = c.head_dim;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  size_t ws = 0;
  int max_off_cap = S.vs_off_cap;
  for (int l = 0; l < c.n_layers; ++l) max_off_cap = std::max(max_off_cap, S.plan_vs_ocap[l]);
  if (S.any_vs) {
    if (g.sp == 1) {
      ws = std::max(ws, cuda::index::vs_estimate_workspace_size(
                            vs_call_params(vs_shape(g, S.n, S.n_last, g.nh, g.nkv, hd, scale),
                                           nullptr, nullptr, 0, static_cast<int>(S.n))));
    }
    ws = std::max(ws, cuda::index::vs_select_workspace_size(g.nh, S.n));
    ws = std::max(ws, cuda::index::vs_index_workspace_size(g.nh, S.n, std::max(max_off_cap, 1)));
  }
  if (S.any_bs && g.sp == 1) {
    ws = std::max(ws, cuda::index::block_sparse_estimate_workspace_size(
                          bs_estimate_params(g, S.n, g.nh, g.nkv, hd, scale)));
  }
  return ws;
}

// Upper bound of SpEstimator's grow-on-demand scratch (sp > 1): global column and slash
// scores [heads][N], per-range scores, row statistics of every rank, pooled Q / K blocks
// (fp32), and the larger of its estimation and selection workspaces.
size_t sp_estimator_scratch(const Geometry& g, const Setup& S, int hd) {
  int64_t max_range = 0;
  for (auto [b, e] : S.layout[g.sp_rank]) max_range = std::max(max_range, e - b);
  const VsEstimateParams e = vs_call_params(vs_shape(g, S.n, S.n_last, g.nh, g.nkv, hd, 1.f),
                                            nullptr, nullptr, 0, static_cast<int>(max_range));
  const size_t ws = std::max(
      cuda::index::vs_estimate_workspace_size(e),
      cuda::index::vs_select_workspace_size(std::min(g.nh, cuda::index::kMaxHeadsPerCall), S.n));
  return 4 * (size_t(g.nh) * (2 * S.n + max_range) + size_t(g.nh) * S.n_last * (4 + 2 * g.sp) +
              size_t(S.nb) * hd * (g.nh + g.nkv)) +
         ws;
}

}  // namespace

bool head_planned(const HeadPlan& hp) {
  if (hp.kind == PatternKind::kVerticalSlash) return !hp.vs.offsets.empty();
  if (hp.kind == PatternKind::kBlockSparse) return hp.topk >= 1 && !hp.blocks.empty();
  return false;
}

std::string MemoryPlan::describe() const {
  char buf[640];
  std::snprintf(buf, sizeof buf,
                "prefill of %lld tokens (%lld on this rank) needs %.2f GiB of device workspace "
                "(activations %.2f, MLP chunk %.2f, estimation %.2f, sparse index %.2f, GEMM "
                "%.2f) beside %.2f GiB of resident weights; %.2f GiB available",
                static_cast<long long>(tokens), static_cast<long long>(local_tokens),
                gib(workspace), gib(activations), gib(mlp), gib(estimation), gib(index),
                gib(gemm_workspace), gib(weights), gib(available));
  return buf;
}

Setup make_setup(const ModelConfig& c, const Geometry& g, const CudaOptions& opt, int64_t n,
                 const SparsePolicy& policy, const PrefillPlan* plan, const PrefillOptions& popt,
                 const Fail& fail) {
  Setup S;
  S.n = n;
  S.nb = num_blocks(n);
  S.layout =
      g.sp == 1 ? std::vector<TokenRanges>{TokenRanges{{0, n}}} : plan_sequence_parallel(n, g.sp);
  S.rows.assign(g.sp, 0);
  for (int r = 0; r < g.sp; ++r) {
    for (auto [b, e] : S.layout[r]) S.rows[r] += e - b;
    if (S.rows[r] == 0)
      fail.raise("a prompt of " + std::to_string(n) + " tokens leaves sp rank " +
                 std::to_string(r) + " of " + std::to_string(g.sp) + " without tokens");
    S.nmax = std::max(S.nmax, S.rows[r]);
  }
  S.nl = S.rows[g.sp_rank];
  S.chunk = std::min(opt.mlp_chunk, S.nl);
  S.all_dense = policy.all_dense(n);
  S.n_last = static_cast<int>(std::min<int64_t>(64, n));
  S.pieces.resize(c.n_layers);
  S.plan_vs_ccap.assign(c.n_layers, 0);
  S.plan_vs_ocap.assign(c.n_layers, 0);
  S.plan_bs_k.assign(c.n_layers, 0);
  const int hd = c.head_dim;
  int64_t range_need = 0, col_need = 0;
  for (int l = 0; l < c.n_layers; ++l) {
    S.pieces[l] = make_pieces(c, g, policy, plan, l, n);
    S.max_pieces = std::max<int>(S.max_pieces, S.pieces[l].size());
    int64_t r_layer = 0, c_layer = 0;
    for (const Piece& p : S.pieces[l]) {
      if (p.kind == PatternKind::kDense) continue;
      if (!cuda::sparse_attention_supported(DType::kBF16, hd))
        fail.raise("no bf16 sparse attention kernel for head_dim " + std::to_string(hd) +
                   " in this build (policy " + policy.source + ")");
      int64_t r_need = 0, c_need = 0;
      size_piece(c, g, policy, plan, popt, l, p, fail, S, &r_need, &c_need);
      // sp 1 builds one piece's index at a time; a ring keeps every piece's for its steps.
      r_layer = g.sp == 1 ? std::max(r_layer, r_need) : r_layer + r_need;
      c_layer = g.sp == 1 ? std::max(c_layer, c_need) : c_layer + c_need;
    }
    range_need = std::max(range_need, r_layer);
    col_need = std::max(col_need, c_layer);
  }
  if (S.any_vs && hd != 64 && hd != 128)
    fail.raise("vertical-slash estimation needs head_dim 64 or 128, the model has " +
               std::to_string(hd));
  // CSR capacity: the worst case, capped (half the cap each for ranges and columns).
  S.range_cap = std::min<int64_t>(range_need, opt.vs_index_max_bytes / 2 / 8);
  S.col_cap = std::min<int64_t>(col_need, opt.vs_index_max_bytes / 2 / 4);
  if (S.any_vs) {
    S.range_cap = std::max<int64_t>(S.range_cap, 1);
    S.col_cap = std::max<int64_t>(S.col_cap, 1);
  }
  S.est_ws = estimation_workspace(c, g, S);
  if (g.sp > 1 && (S.any_vs || S.any_bs)) S.sp_est_scratch = sp_estimator_scratch(g, S, hd);
  return S;
}

// Carves every buffer of a prefill from cv (sizing pass when cv.base is null).
void carve_all(Carver& cv, const Setup& S, const ModelConfig& c, const Geometry& g, Bufs& B,
               Sizes& sz) {
  const int64_t n = S.n, nl = S.nl;
  const int n_last = S.n_last;
  const size_t H = c.hidden, QL = g.ql, KVL = g.kvl, NF = g.nf;
  const size_t XB = std::max(H, QL);
  size_t m0 = cv.used;
  B.ids = cv.take<int>(nl);
  B.x = cv.take<float>(nl * H);
  B.xb = cv.take<uint16_t>(nl * XB);
  B.q = cv.take<uint16_t>(nl * QL);
  if (g.sp == 1) {
    B.k = cv.take<uint16_t>(nl * KVL);
    B.v = cv.take<uint16_t>(nl * KVL);
  } else {
    B.pos = cv.take<int64_t>(nl);
    for (auto& s : B.slot) s = cv.take<uint16_t>(2 * size_t(S.nmax) * KVL);
    B.k = B.slot[0];
    B.v = B.slot[0] ? B.slot[0] + size_t(S.nmax) * KVL : nullptr;
    B.part_o = cv.take<uint16_t>(nl * QL);
    B.part_lse = cv.take<float>(size_t(g.nh) * nl);
    B.acc_o = cv.take<float>(nl * QL);
    B.acc_lse = cv.take<float>(size_t(g.nh) * nl);
  }
  B.logits = cv.take<float>(c.vocab);
  B.last = cv.take<uint16_t>(H);
  sz.act = cv.used - m0;
  m0 = cv.used;
  B.mlp_h = cv.take<uint16_t>(S.chunk * H);
  B.gu = cv.take<uint16_t>(S.chunk * 2 * NF);
  B.act = cv.take<uint16_t>(S.chunk * NF);
  sz.mlp = cv.used - m0;
  m0 = cv.used;
  B.gemm_ws = cv.take<char>(cuda::gemm_workspace_size());
  sz.gemm = cv.used - m0;
  m0 = cv.used;
  const size_t nh = g.nh;
  if (S.any_vs) {
    if (g.sp == 1) {
      B.row_max = cv.take<float>(nh * n_last);
      B.row_sum = cv.take<float>(nh * n_last);
      B.col_score = cv.take<float>(nh * n);
      B.slash_score = cv.take<float>(nh * n);
    } else {
      B.q_last = cv.take<uint16_t>(size_t(n_last) * QL);
    }
    B.sel_cols = cv.take<int>(nh * std::max(S.vs_col_cap, 1));
    B.sel_offs = cv.take<int>(nh * std::max(S.vs_off_cap, 1));
    B.sel_nc = cv.take<int>(nh);
    B.sel_no = cv.take<int>(nh);
  }
  if (S.any_bs) B.bs_blocks = cv.take<int>(nh * S.nb * std::max(S.bs_kmax, 1));
  B.est_ws = cv.take<char>(S.est_ws);
  B.pv_cols.assign(c.n_layers, nullptr);
  B.pv_offs.assign(c.n_layers, nullptr);
  B.pv_nc.assign(c.n_layers, nullptr);
  B.pv_no.assign(c.n_layers, nullptr);
  B.pb_blocks.assign(c.n_layers, nullptr);
  for (int l = 0; l < c.n_layers; ++l) {
    if (S.plan_vs_ocap[l] > 0) {
      B.pv_cols[l] = cv.take<int>(nh * std::max(S.plan_vs_ccap[l], 1));
      B.pv_offs[l] = cv.take<int>(nh * S.plan_vs_ocap[l]);
      B.pv_nc[l] = cv.take<int>(nh);
      B.pv_no[l] = cv.take<int>(nh);
    }
    if (S.plan_bs_k[l] > 0) B.pb_blocks[l] = cv.take<int>(nh * S.nb * S.plan_bs_k[l]);
  }
  sz.est = cv.used - m0 + S.sp_est_scratch;
  m0 = cv.used;
  if (S.any_vs) {
    // One row pointer per (head, block) of every piece plus one end per piece.
    const size_t ptrs = nh * S.nb + (g.sp == 1 ? 1 : S.max_pieces);
    B.range_ptr = cv.take<int64_t>(ptrs);
    B.col_ptr = cv.take<int64_t>(ptrs);
    B.range_lo = cv.take<int>(S.range_cap);
    B.range_hi = cv.take<int>(S.range_cap);
    B.col = cv.take<int>(S.col_cap);
  }
  sz.idx = cv.used - m0;
}

// Sizes the workspace of S and compares it with what the device has free now.
MemoryPlan measure(const Setup& S, const ModelConfig& c, const Geometry& g, const CudaOptions& opt,
                   size_t weight_bytes, const Fail& fail) {
  Bufs B{};
  Sizes sz;
  Carver sizing;
  carve_all(sizing, S, c, g, B, sz);
  MemoryPlan mp;
  mp.tokens = S.n;
  mp.local_tokens = S.nl;
  mp.weights = weight_bytes;
  mp.activations = sz.act;
  mp.mlp = sz.mlp;
  mp.estimation = sz.est;
  mp.index = sz.idx;
  mp.gemm_workspace = sz.gemm;
  mp.workspace = sizing.used + S.sp_est_scratch;
  fail.ck(cudaSetDevice(opt.device), "selecting the device");
  size_t free_b = 0, total_b = 0;
  fail.ck(cudaMemGetInfo(&free_b, &total_b), "querying device memory");
  mp.available = opt.memory_limit ? std::min(opt.memory_limit, free_b)
                                  : (free_b > opt.reserve_bytes ? free_b - opt.reserve_bytes : 0);
  mp.fits = mp.workspace <= mp.available;
  return mp;
}

}  // namespace mprefill::gpu
