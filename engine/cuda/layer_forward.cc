#include "engine/cuda/layer_forward.h"

#include <algorithm>
#include <cmath>

#include "kernels/cuda/flash/flash.h"
#include "kernels/cuda/sparse/sparse_attention.h"

namespace mprefill::gpu {

LayerForward::LayerForward(const Inputs& in)
    : c(*in.cfg),
      I(*in.impl),
      g(in.impl->geo),
      S(*in.setup),
      B(*in.bufs),
      f(in.impl->fail),
      st(in.impl->st),
      timing(in.popt->timing),
      opt_(*in.opt),
      policy_(*in.policy),
      plan_(in.plan),
      fill_plan_(in.fill_plan),
      popt_(*in.popt),
      sink_(in.sink),
      ST(*in.stats),
      hd_(in.cfg->head_dim),
      scale_(1.f / std::sqrt(static_cast<float>(in.cfg->head_dim))) {
  vb_.resize(g.nh);
  sb_.resize(g.nh);
  tau_.resize(g.nh);
  topk_.resize(g.nh);
  views_.resize(std::max(S.max_pieces, 1));
  for (int h = 0; h < g.nkv; ++h) kv_heads_.push_back(g.kv0 + h);
  kv_tokens_ = S.layout[g.sp_rank];
  if (g.sp > 1) {
    ring_.layout.assign(S.layout.begin(), S.layout.end());
    ring_.skip_causal = opt_.skip_causal_kv;
    bool estimates = false;
    for (const auto& layer : S.pieces)
      for (const Piece& p : layer)
        estimates |=
            (p.kind == PatternKind::kVerticalSlash || p.kind == PatternKind::kBlockSparse) &&
            (!p.planned || popt_.estimate_with_plan);
    // Collective per call: every sp rank of this tp slice has the same pieces.
    if (estimates)
      est_ = std::make_unique<SpEstimator>(I.sp_comm.get(), S.layout, g.sp_rank, S.n, st, f.who);
  }
  if (timing) {
    const int64_t chunks = (S.nl + S.chunk - 1) / S.chunk;
    const size_t need = 4 + size_t(c.n_layers) * (10 + 4 * S.max_pieces + 4 * chunks);
    while (I.events.size() < need) {
      cudaEvent_t e;
      f.ck(cudaEventCreate(&e), "creating timing events");
      I.events.push_back(e);
    }
    marks_.reserve(need);
    f.ck(cudaEventRecord(I.events[0], st), "timing");
    marks_.push_back({-1, -1});
  }
}

LayerForward::~LayerForward() = default;

// ---------------------------------------------------------------- timing and helpers

void LayerForward::mark(int cat, int layer) {
  if (!timing) return;
  if (marks_.size() >= I.events.size()) f.raise("timing event pool exhausted");
  f.ck(cudaEventRecord(I.events[marks_.size()], st), "timing");
  marks_.push_back({cat, layer});
}

size_t LayerForward::time_mark(cudaStream_t on) {
  while (I.time_events.size() <= n_time_) {
    cudaEvent_t e;
    f.ck(cudaEventCreate(&e), "creating timing events");
    I.time_events.push_back(e);
  }
  f.ck(cudaEventRecord(I.time_events[n_time_], on), "timing");
  return n_time_++;
}

cudaEvent_t LayerForward::sync_event() {
  const size_t i = n_sync++ % 64;
  while (I.sync_events.size() <= i) {
    cudaEvent_t e;
    f.ck(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "creating events");
    I.sync_events.push_back(e);
  }
  return I.sync_events[i];
}

void LayerForward::gemm(const void* x, const void* w, const void* bias, void* y, DType yt,
                        int64_t m, int64_t in, int64_t out, bool acc, int l) {
  f.ok(cuda::gemm_xwt(I.gemm, x, w, DType::kBF16, bias, y, yt, m, in, out, acc, B.gemm_ws,
                      cuda::gemm_workspace_size(), st),
       "gemm", l);
}

// Row-parallel partial sums of x meet in one fp32 all-reduce (tp > 1 only).
void LayerForward::all_reduce_x(int l) {
  if (g.tp == 1) return;
  const size_t a = timing ? time_mark(st) : 0;
  f.cok(I.tp_comm->all_reduce(B.x, B.x, size_t(S.nl) * c.hidden, DType::kF32, comm::ReduceOp::kSum,
                              st),
        *I.tp_comm, "tp all-reduce at layer " + std::to_string(l));
  if (timing) spans.push_back({2, a, time_mark(st)});
  mark(kRest, l);
}

void LayerForward::embed() {
  f.ok(cuda::embedding(I.embed, DType::kBF16, c.vocab, c.hidden, B.ids, S.nl, B.x, DType::kF32, st),
       "embedding");
  mark(kHead, -1);
}

// ---------------------------------------------------------------- one layer

void LayerForward::layer(int l) {
  qkv_rope_export(l);
  attention(l);
  // x += attn Wo^T (row-parallel at tp > 1: tp rank 0 alone keeps the residual).
  const DevLayer& L = I.layers[l];
  if (g.tp > 1 && g.tp_rank != 0)
    f.ck(cudaMemsetAsync(B.x, 0, size_t(S.nl) * c.hidden * 4, st), "zero");
  gemm(B.xb, L.wo, nullptr, B.x, DType::kF32, S.nl, g.ql, c.hidden, true, l);
  mark(kGemm, l);
  all_reduce_x(l);
  mlp(l);
  all_reduce_x(l);
}

void LayerForward::qkv_rope_export(int l) {
  const DevLayer& L = I.layers[l];
  const int64_t H = c.hidden, nl = S.nl, ql = g.ql, kvl = g.kvl;
  f.ok(cuda::rmsnorm(B.x, DType::kF32, H, L.attn_norm, DType::kF32, B.xb, DType::kBF16, H, nl, H,
                     c.rms_eps, st),
       "rmsnorm", l);
  mark(kRest, l);
  gemm(B.xb, L.wqkv, L.bqkv, B.q, DType::kBF16, nl, H, ql, false, l);
  gemm(B.xb, L.wqkv + ql * H, L.bqkv ? L.bqkv + ql : nullptr, B.k, DType::kBF16, nl, H, kvl, false,
       l);
  gemm(B.xb, L.wqkv + (ql + kvl) * H, L.bqkv ? L.bqkv + ql + kvl : nullptr, B.v, DType::kBF16, nl,
       H, kvl, false, l);
  mark(kGemm, l);
  // Global positions: B.pos at sp > 1, 0 .. n-1 (null) at sp 1.
  f.ok(
      cuda::rope(B.q, DType::kBF16, nl, g.nh, hd_, ql, hd_, B.pos, 0, I.inv_freq, c.rope_style, st),
      "rope q", l);
  f.ok(cuda::rope(B.k, DType::kBF16, nl, g.nkv, hd_, kvl, hd_, B.pos, 0, I.inv_freq, c.rope_style,
                  st),
       "rope k", l);
  mark(kRest, l);
  // KV of this layer is final: export first, so an asynchronous sink overlaps attention.
  if (sink_) {
    KvSlice s;
    s.layer = l;
    s.kv_heads = kv_heads_;
    s.tokens = kv_tokens_;
    s.head_dim = hd_;
    s.dtype = DType::kBF16;
    s.k = B.k;
    s.v = B.v;
    s.on_device = true;
    s.stream = st;
    sink_->put(s);
    ST.kv_bytes_exported += 2 * s.bytes_per_tensor();
    mark(kExport, l);
  }
}

void LayerForward::attention(int l) {
  const std::vector<Piece>& pieces = S.pieces[l];
  qlast_ready_ = false;
  IndexCursor cur;
  for (size_t pi = 0; pi < pieces.size(); ++pi) {
    const Piece& p = pieces[pi];
    ++ST.attention_calls;
    ST.heads_by_kind[static_cast<int>(p.kind)] += p.nh;
    if (fill_plan_)
      for (int i = 0; i < p.nh; ++i) plan_->layers[l][g.head0 + p.h0 + i].kind = p.kind;
    if (g.sp == 1) cur = IndexCursor{};  // one piece's index at a time
    views_[pi] = PieceView{};
    if (p.kind == PatternKind::kVerticalSlash) index_vs(l, p, cur, views_[pi]);
    if (p.kind == PatternKind::kBlockSparse) index_bs(l, p, cur, views_[pi]);
    if (g.sp == 1) {
      attention_local(l, p, views_[pi]);
      mark(kAttn, l);
    }
  }
  if (S.all_dense) {
    int64_t tiles = 0;  // causal 64x64 tiles of this rank's rows over all keys
    for (auto [qb, qe] : kv_tokens_) {
      for (int64_t b = qb / kBlock; b * kBlock < qe; ++b)
        tiles += std::min(qe - 1, b * kBlock + kBlock - 1) / kBlock + 1;
    }
    ST.attention_tiles += tiles * g.nh;
  }
  if (g.sp > 1) {
    ring_attention(l, pieces);
    mark(kAttn, l);
  }
}

// Selections of a vertical-slash piece estimated on this rank (sp 1) or globally over the
// sp ranks, into the estimation buffers.
void LayerForward::estimate_vs(int l, const Piece& p, cuda::index::VsSelectionsDevice& sel) {
  const int64_t n = S.n;
  for (int i = 0; i < p.nh; ++i) {
    const HeadPattern hp = policy_.at(l, g.head0 + p.h0 + i, n);
    vb_[i] = clamp_vertical_budget(hp.a, n);
    sb_[i] = clamp_slash_budget(hp.b, n);
    tau_[i] = hp.tau;
  }
  sel.columns = B.sel_cols;
  sel.offsets = B.sel_offs;
  sel.n_columns = B.sel_nc;
  sel.n_offsets = B.sel_no;
  sel.col_capacity = std::max(S.vs_col_cap, 1);
  sel.off_capacity = std::max(S.vs_off_cap, 1);
  const uint16_t* k = B.k + size_t(p.kv0) * hd_;
  if (g.sp > 1) {
    if (!qlast_ready_) est_->gather_last_rows(B.q, g.ql, B.q_last);
    qlast_ready_ = true;
    est_->vertical_slash(B.q_last + size_t(p.h0) * hd_, g.ql, k, g.kvl, p.nh, p.nkv, hd_, scale_,
                         vb_.data(), sb_.data(), sel, l, tau_.data());
    return;
  }
  const VsEstimateParams e = vs_call_params(
      vs_shape(g, n, S.n_last, p.nh, p.nkv, hd_, scale_),
      B.q + (size_t(n) - S.n_last) * g.ql + size_t(p.h0) * hd_, k, 0, static_cast<int>(n));
  f.ck(cudaMemsetAsync(B.col_score, 0, size_t(p.nh) * n * 4, st), "clear scores");
  f.ck(cudaMemsetAsync(B.slash_score, 0, size_t(p.nh) * n * 4, st), "clear scores");
  f.ok(cuda::index::vs_row_stats(e, B.row_max, B.row_sum, B.est_ws, S.est_ws, st), "vs_row_stats",
       l);
  f.ok(cuda::index::vs_scores(e, B.row_max, B.row_sum, B.col_score, B.slash_score, B.est_ws,
                              S.est_ws, st),
       "vs_scores", l);
  for (int h0 = 0; h0 < p.nh; h0 += cuda::index::kMaxHeadsPerCall) {
    const int m = std::min(cuda::index::kMaxHeadsPerCall, p.nh - h0);
    cuda::index::VsSelectionsDevice part = sel;
    part.num_heads = m;
    part.columns += size_t(h0) * sel.col_capacity;
    part.offsets += size_t(h0) * sel.off_capacity;
    part.n_columns += h0;
    part.n_offsets += h0;
    f.ok(cuda::index::vs_select(B.col_score + size_t(h0) * n, B.slash_score + size_t(h0) * n,
                                vb_.data() + h0, sb_.data() + h0, &part, B.est_ws, S.est_ws, st,
                                tau_.data() + h0),
         "vs_select", l);
  }
}

// Estimated selections into the plan (tests; slow: a download per piece).
void LayerForward::download_vs(int l, const Piece& p, const cuda::index::VsSelectionsDevice& sel) {
  std::vector<int> nc(p.nh), no(p.nh), cols(size_t(p.nh) * sel.col_capacity),
      offs(size_t(p.nh) * sel.off_capacity);
  f.ck(cudaMemcpyAsync(nc.data(), sel.n_columns, p.nh * 4, cudaMemcpyDeviceToHost, st), "d2h");
  f.ck(cudaMemcpyAsync(no.data(), sel.n_offsets, p.nh * 4, cudaMemcpyDeviceToHost, st), "d2h");
  f.ck(cudaMemcpyAsync(cols.data(), sel.columns, cols.size() * 4, cudaMemcpyDeviceToHost, st),
       "d2h");
  f.ck(cudaMemcpyAsync(offs.data(), sel.offsets, offs.size() * 4, cudaMemcpyDeviceToHost, st),
       "d2h");
  f.ck(cudaStreamSynchronize(st), "downloading selections");
  for (int i = 0; i < p.nh; ++i) {
    HeadPlan& hp = plan_->layers[l][g.head0 + p.h0 + i];
    hp.kind = PatternKind::kVerticalSlash;
    const int* cb = cols.data() + size_t(i) * sel.col_capacity;
    const int* ob = offs.data() + size_t(i) * sel.off_capacity;
    hp.vs.columns.assign(cb, cb + nc[i]);
    hp.vs.offsets.assign(ob, ob + no[i]);
  }
}

void LayerForward::index_vs(int l, const Piece& p, IndexCursor& cur, PieceView& out) {
  cuda::index::VsSelectionsDevice sel;
  sel.seq_len = S.n;
  sel.num_heads = p.nh;
  if (!p.planned || popt_.estimate_with_plan) {
    estimate_vs(l, p, sel);
    if (fill_plan_) download_vs(l, p, sel);
  }
  if (p.planned) {
    const int cc = std::max(S.plan_vs_ccap[l], 1), oc = S.plan_vs_ocap[l];
    sel.columns = B.pv_cols[l] + size_t(p.h0) * cc;
    sel.offsets = B.pv_offs[l] + size_t(p.h0) * oc;
    sel.n_columns = B.pv_nc[l] + p.h0;
    sel.n_offsets = B.pv_no[l] + p.h0;
    sel.col_capacity = cc;
    sel.off_capacity = oc;
  }
  int64_t* rp = B.range_ptr + cur.ptr;
  int64_t* cp = B.col_ptr + cur.ptr;
  f.ok(cuda::index::vs_index_count(sel, rp, cp, B.est_ws, S.est_ws, st), "vs_index_count", l);
  const size_t last = size_t(p.nh) * S.nb;
  f.ck(cudaMemcpyAsync(I.pinned, rp + last, 8, cudaMemcpyDeviceToHost, st), "d2h");
  f.ck(cudaMemcpyAsync(I.pinned + 1, cp + last, 8, cudaMemcpyDeviceToHost, st), "d2h");
  f.ck(cudaStreamSynchronize(st), "reading the index size");
  const int64_t nr = I.pinned[0], ncol = I.pinned[1];
  ST.vs_index_entries_max = std::max(ST.vs_index_entries_max, nr + ncol);
  if (nr > S.range_cap - cur.ranges || ncol > S.col_cap - cur.cols)
    f.raise("layer " + std::to_string(l) + " vertical-slash index has " + std::to_string(nr) +
            " ranges and " + std::to_string(ncol) + " columns, over the capacity of " +
            std::to_string(S.range_cap - cur.ranges) + " / " +
            std::to_string(S.col_cap - cur.cols) + " (raise CudaOptions::vs_index_max_bytes)");
  int* lo = B.range_lo + cur.ranges;
  int* hi = B.range_hi + cur.ranges;
  int* col = B.col + cur.cols;  // non-null even when no column is gathered (the kernels check)
  f.ok(cuda::index::vs_index_fill(sel, rp, cp, lo, hi, col, B.est_ws, S.est_ws, st),
       "vs_index_fill", l);
  mark(kEst, l);
  cur.ptr += last + 1;
  cur.ranges += nr;
  cur.cols += ncol;
  out.vs.seq_len = S.n;
  out.vs.nblocks = S.nb;
  out.vs.range_ptr = rp;
  out.vs.range_lo = lo;
  out.vs.range_hi = hi;
  out.vs.col_ptr = cp;
  out.vs.col = col;
}

void LayerForward::download_bs(int l, const Piece& p, const int* blocks, int kmax) {
  std::vector<int> host(size_t(p.nh) * S.nb * kmax);
  f.ck(cudaMemcpyAsync(host.data(), blocks, host.size() * 4, cudaMemcpyDeviceToHost, st), "d2h");
  f.ck(cudaStreamSynchronize(st), "downloading block lists");
  for (int i = 0; i < p.nh; ++i) {
    HeadPlan& hp = plan_->layers[l][g.head0 + p.h0 + i];
    hp.kind = PatternKind::kBlockSparse;
    hp.topk = topk_[i];
    hp.blocks.assign(size_t(S.nb) * topk_[i], -1);
    for (int64_t b = 0; b < S.nb; ++b)
      for (int j = 0; j < topk_[i]; ++j)
        hp.blocks[b * topk_[i] + j] = host[(size_t(i) * S.nb + b) * kmax + j];
  }
}

void LayerForward::index_bs(int l, const Piece& p, IndexCursor& cur, PieceView& out) {
  out.bs.seq_len = S.n;
  out.bs.nblocks = S.nb;
  if (!p.planned || popt_.estimate_with_plan) {
    int kmax = 0;
    for (int i = 0; i < p.nh; ++i) {
      topk_[i] = policy_.at(l, g.head0 + p.h0 + i, S.n).a;
      kmax = std::max(kmax, topk_[i]);
    }
    int* blocks = B.bs_blocks + cur.blocks;
    const uint16_t* q = B.q + size_t(p.h0) * hd_;
    const uint16_t* k = B.k + size_t(p.kv0) * hd_;
    if (g.sp > 1) {
      est_->block_sparse(q, g.ql, k, g.kvl, p.nh, p.nkv, hd_, scale_, topk_.data(), blocks, kmax,
                         l);
    } else {
      const auto e = bs_estimate_params(g, S.n, p.nh, p.nkv, hd_, scale_, q, k);
      f.ok(
          cuda::index::block_sparse_estimate(e, topk_.data(), blocks, kmax, B.est_ws, S.est_ws, st),
          "block_sparse_estimate", l);
    }
    cur.blocks += int64_t(p.nh) * S.nb * kmax;
    out.bs.k = kmax;
    out.bs.blocks = blocks;
    if (fill_plan_) download_bs(l, p, blocks, kmax);
  }
  if (p.planned) {
    out.bs.k = S.plan_bs_k[l];
    out.bs.blocks = B.pb_blocks[l] + size_t(p.h0) * S.nb * out.bs.k;
  }
  mark(kEst, l);
}

void LayerForward::launch(const Piece& p, const PieceView& x, AttentionParams ap, int l,
                          const char* what) {
  ap.num_heads = p.nh;
  ap.num_kv_heads = p.nkv;
  switch (p.kind) {
    case PatternKind::kDense:
      f.ok(cuda::flash_attention_fwd(ap, st), std::string(what) + "dense attention", l);
      break;
    case PatternKind::kAShape:
      f.ok(cuda::ashape_attention_fwd(ap, p.a, p.b, st), std::string(what) + "A-shape attention",
           l);
      break;
    case PatternKind::kVerticalSlash:
      f.ok(cuda::vs_attention_fwd(ap, x.vs, 0, st), std::string(what) + "vertical-slash attention",
           l);
      break;
    case PatternKind::kBlockSparse:
      f.ok(cuda::block_sparse_attention_fwd(ap, x.bs, 0, st),
           std::string(what) + "block-sparse attention", l);
      break;
  }
}

// sp 1: all rows against all keys, the output straight into Wo's input.
void LayerForward::attention_local(int l, const Piece& p, const PieceView& x) {
  AttentionParams ap;
  ap.q = B.q + size_t(p.h0) * hd_;
  ap.k = B.k + size_t(p.kv0) * hd_;
  ap.v = B.v + size_t(p.kv0) * hd_;
  ap.o = B.xb + size_t(p.h0) * hd_;
  ap.q_row_stride = g.ql;
  ap.o_row_stride = g.ql;
  ap.k_row_stride = ap.v_row_stride = g.kvl;
  ap.q_head_stride = ap.k_head_stride = ap.v_head_stride = ap.o_head_stride = hd_;
  ap.n_q = ap.n_k = static_cast<int>(S.n);
  ap.head_dim = hd_;
  ap.causal = true;
  ap.scale = scale_;
  ap.dtype = DType::kBF16;
  launch(p, x, ap, l, "");
}

// x += Wd (silu(Wg h) * Wu h) over token chunks (h = ffn_norm(x)); at tp > 1 the down
// projection's partial sums of ranks other than tp 0 start from zero.
void LayerForward::mlp(int l) {
  const DevLayer& L = I.layers[l];
  const int64_t H = c.hidden, nf = g.nf;
  const bool zero_partial = g.tp > 1 && g.tp_rank != 0;
  for (int64_t t0 = 0; t0 < S.nl; t0 += S.chunk) {
    const int64_t m = std::min(S.chunk, S.nl - t0);
    float* xr = B.x + size_t(t0) * H;
    f.ok(cuda::rmsnorm(xr, DType::kF32, H, L.ffn_norm, DType::kF32, B.mlp_h, DType::kBF16, H, m, H,
                       c.rms_eps, st),
         "rmsnorm", l);
    if (zero_partial) f.ck(cudaMemsetAsync(xr, 0, size_t(m) * H * 4, st), "zero");
    mark(kRest, l);
    gemm(B.mlp_h, L.wgu, nullptr, B.gu, DType::kBF16, m, H, 2 * nf, false, l);
    mark(kGemm, l);
    f.ok(cuda::swiglu(B.gu, B.gu + nf, DType::kBF16, 2 * nf, B.act, DType::kBF16, nf, m, nf, st),
         "swiglu", l);
    mark(kRest, l);
    gemm(B.act, L.wdown, nullptr, xr, DType::kF32, m, nf, H, true, l);
    mark(kGemm, l);
  }
}

// ---------------------------------------------------------------- logits and timing

std::vector<float> LayerForward::logits(comm::Communicator* world) {
  const int64_t n = S.n, H = c.hidden;
  int owner = -1;
  int64_t owner_row = 0;
  for (int r = 0; r < g.sp && owner < 0; ++r) {
    int64_t off = 0;
    for (auto [b, e] : S.layout[r]) {
      if (b <= n - 1 && n - 1 < e) {
        owner = r;
        owner_row = off + (n - 1 - b);
      }
      off += e - b;
    }
  }
  if (owner == g.sp_rank) {
    f.ok(cuda::rmsnorm(B.x + size_t(owner_row) * H, DType::kF32, H, I.final_norm, DType::kF32,
                       B.last, DType::kBF16, H, 1, H, c.rms_eps, st),
         "final rmsnorm");
    gemm(B.last, I.lm_head, nullptr, B.logits, DType::kF32, 1, H, c.vocab, false, -1);
  }
  const bool group = world && world->size() > 1;
  if (group)
    f.cok(world->broadcast(B.logits, c.vocab, DType::kF32, owner * g.tp, st), *world,
          "logits broadcast");
  mark(kHead, -1);
  std::vector<float> out(c.vocab);
  f.ck(cudaMemcpyAsync(out.data(), B.logits, out.size() * 4, cudaMemcpyDeviceToHost, st),
       "downloading logits");
  if (group) {
    f.cok(world->synchronize(st), *world, "prefill");  // bounded wait
    if (I.sp_comm) f.cok(I.sp_comm->synchronize(I.comm_st), *I.sp_comm, "ring");
  } else {
    f.ck(cudaStreamSynchronize(st), "prefill");
  }
  return out;
}

void LayerForward::collect_times() {
  if (est_) ST.estimate_bytes_sent = est_->comm_bytes();
  if (!timing) return;
  for (size_t i = 1; i < marks_.size(); ++i) {
    float ms = 0;
    f.ck(cudaEventElapsedTime(&ms, I.events[i - 1], I.events[i]), "timing");
    const Mark& m = marks_[i];
    if (m.layer < 0) {
      ST.head_ms += ms;
      continue;
    }
    LayerTimes& t = ST.layers[m.layer];
    double* to[] = {&t.gemm_ms, &t.attention_ms, &t.estimate_ms, &t.kv_export_ms, &t.rest_ms};
    *to[m.cat <= kRest ? m.cat : kRest] += ms;
  }
  for (const LayerTimes& t : ST.layers) {
    ST.sum.gemm_ms += t.gemm_ms;
    ST.sum.attention_ms += t.attention_ms;
    ST.sum.estimate_ms += t.estimate_ms;
    ST.sum.kv_export_ms += t.kv_export_ms;
    ST.sum.rest_ms += t.rest_ms;
  }
  for (const Span& s : spans) {
    float ms = 0;
    f.ck(cudaEventElapsedTime(&ms, I.time_events[s.a], I.time_events[s.b]), "timing");
    double* to[4] = {&ST.ring_compute_ms, &ST.ring_wait_ms, &ST.allreduce_ms, &ST.ring_transfer_ms};
    *to[s.kind] += ms;
  }
}

}  // namespace mprefill::gpu
