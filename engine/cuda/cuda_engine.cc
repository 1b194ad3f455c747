#include "engine/cuda/cuda_engine.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/flash/flash.h"
#include "kernels/cuda/index/index.h"
#include "kernels/cuda/sparse/sparse_attention.h"
#include "model/prompt.h"
#include "engine/cuda/device_init.h"
#include "engine/plan_codec.h"

namespace mprefill::gpu {
namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

void ck(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess)
    throw std::runtime_error("cuda engine: " + what + ": " + cudaGetErrorString(e));
}

void ok(Status s, const std::string& what, int layer = -1) {
  if (s == Status::kOk) return;
  std::string where = layer >= 0 ? " at layer " + std::to_string(layer) : "";
  std::string detail = cuda::last_error();
  throw std::runtime_error("cuda engine: " + what + " failed" + where + ": " + to_string(s) +
                           (detail.empty() ? "" : " (" + detail + ")"));
}

constexpr size_t kAlign = 256;
size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }
double gib(size_t b) { return static_cast<double>(b) / double(size_t{1} << 30); }

// Bytes carved from one allocation in a fixed order: first a sizing pass (base null),
// then the same calls on the real base.
struct Carver {
  char* base = nullptr;
  size_t used = 0;
  template <class T>
  T* take(size_t count) {
    T* p = base ? reinterpret_cast<T*>(base + used) : nullptr;
    used += align_up(count * sizeof(T));
    return p;
  }
};

// Heads of one layer that one attention launch covers: same kind (and A-shape window,
// and planned-or-not), GQA-consistent (whole KV groups, or inside one group).
struct Piece {
  PatternKind kind = PatternKind::kDense;
  int h0 = 0, nh = 0, kv0 = 0, nkv = 0;
  int a = 0, b = 0;      // A-shape window
  bool planned = false;  // indices come from the plan
};

enum Cat { kGemm = 0, kAttn, kEst, kExport, kRest, kHead };

}  // namespace

std::string MemoryPlan::describe() const {
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "prefill of %lld tokens needs %.2f GiB of device workspace (activations %.2f, "
                "MLP chunk %.2f, estimation %.2f, sparse index %.2f, GEMM %.2f) beside %.2f GiB "
                "of resident weights; %.2f GiB available",
                static_cast<long long>(tokens), gib(workspace), gib(activations), gib(mlp),
                gib(estimation), gib(index), gib(gemm_workspace), gib(weights), gib(available));
  return buf;
}

bool cuda_available() { return cuda::has_gpu(); }

// ---------------------------------------------------------------- device state
struct DevLayer {
  uint16_t* wqkv = nullptr;   // [q_dim + 2 kv_dim][hidden]
  uint16_t* bqkv = nullptr;   // [q_dim + 2 kv_dim] or null
  uint16_t* wo = nullptr;     // [hidden][q_dim]
  uint16_t* wgu = nullptr;    // [2 ffn][hidden]: gate rows, then up rows
  uint16_t* wdown = nullptr;  // [hidden][ffn]
  float* attn_norm = nullptr;
  float* ffn_norm = nullptr;
};

struct CudaEngine::Impl {
  std::vector<void*> allocs;
  uint16_t* embed = nullptr;
  uint16_t* lm_head = nullptr;  // == embed when tied
  float* final_norm = nullptr;
  std::vector<DevLayer> layers;
  double* inv_freq = nullptr;
  cuda::GemmContext* gemm = nullptr;
  int64_t* pinned = nullptr;  // host pinned [4]: index totals read back per call
  std::vector<cudaEvent_t> events;

  template <class T>
  T* alloc(size_t count, const char* what) {
    void* p = nullptr;
    ck(cudaMalloc(&p, std::max<size_t>(count * sizeof(T), 1)),
       std::string("allocating ") + what + " (" + std::to_string(gib(count * sizeof(T))) + " GiB)");
    allocs.push_back(p);
    return static_cast<T*>(p);
  }
  ~Impl() {
    for (cudaEvent_t e : events) cudaEventDestroy(e);
    if (gemm) cuda::gemm_destroy(gemm);
    if (pinned) cudaFreeHost(pinned);
    for (void* p : allocs) cudaFree(p);
  }
};

void CudaEngine::init_common() {
  cfg_.validate();
  if (!cuda::has_gpu()) throw std::runtime_error("cuda engine: no CUDA device is visible");
  ck(cudaSetDevice(opt_.device), "selecting device " + std::to_string(opt_.device));
  if (opt_.mlp_chunk < 1) throw std::runtime_error("cuda engine: mlp_chunk must be >= 1");
  if (!cuda::flash_attention_supported(DType::kBF16, cfg_.head_dim))
    throw std::runtime_error("cuda engine: no bf16 attention kernel for head_dim " +
                             std::to_string(cfg_.head_dim) + " in this build");
  impl_ = std::make_unique<Impl>();
  ck(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "creating the stream");
  ok(cuda::gemm_create(&impl_->gemm), "cuBLASLt setup");
  ck(cudaMallocHost(&impl_->pinned, 4 * sizeof(int64_t)), "pinned host words");
  const std::vector<double> inv = rope_inv_freq(cfg_.head_dim, cfg_.rope_theta, cfg_.rope_scaling);
  impl_->inv_freq = impl_->alloc<double>(inv.size(), "rope frequencies");
  ck(cudaMemcpy(impl_->inv_freq, inv.data(), inv.size() * sizeof(double), cudaMemcpyHostToDevice),
     "uploading rope frequencies");
  const size_t H = cfg_.hidden, F = cfg_.intermediate, Q = cfg_.q_dim(), KV = cfg_.kv_dim();
  const size_t V = cfg_.vocab, QKV = Q + 2 * KV;
  impl_->embed = impl_->alloc<uint16_t>(V * H, "embedding");
  impl_->lm_head =
      cfg_.tie_word_embeddings ? impl_->embed : impl_->alloc<uint16_t>(V * H, "lm_head");
  impl_->final_norm = impl_->alloc<float>(H, "final norm");
  impl_->layers.resize(cfg_.n_layers);
  for (DevLayer& L : impl_->layers) {
    L.wqkv = impl_->alloc<uint16_t>(QKV * H, "wqkv");
    if (cfg_.qkv_bias) L.bqkv = impl_->alloc<uint16_t>(QKV, "bqkv");
    L.wo = impl_->alloc<uint16_t>(H * Q, "wo");
    L.wgu = impl_->alloc<uint16_t>(2 * F * H, "w_gate_up");
    L.wdown = impl_->alloc<uint16_t>(H * F, "w_down");
    L.attn_norm = impl_->alloc<float>(H, "attn_norm");
    L.ffn_norm = impl_->alloc<float>(H, "ffn_norm");
  }
  weight_bytes_ = (V * H * (cfg_.tie_word_embeddings ? 1 : 2) +
                   cfg_.n_layers * (QKV * H + Q * H + 3 * F * H + (cfg_.qkv_bias ? QKV : 0))) *
                      2 +
                  (H + cfg_.n_layers * 2 * H) * 4;
}

namespace {

void upload_bf16(uint16_t* dst, const Tensor& t, int64_t expect, const std::string& name,
                 std::vector<uint16_t>& tmp) {
  if (t.numel() != expect || static_cast<int64_t>(t.data.size()) != expect)
    throw std::runtime_error("cuda engine: weight " + name + " has " +
                             std::to_string(t.data.size()) + " values, expected " +
                             std::to_string(expect));
  tmp.resize(t.data.size());
  for (size_t i = 0; i < tmp.size(); ++i) tmp[i] = f32_to_bf16(t.data[i]);
  ck(cudaMemcpy(dst, tmp.data(), tmp.size() * 2, cudaMemcpyHostToDevice), "uploading " + name);
}

void upload_f32(float* dst, const Tensor& t, int64_t expect, const std::string& name) {
  if (t.numel() != expect || static_cast<int64_t>(t.data.size()) != expect)
    throw std::runtime_error("cuda engine: weight " + name + " has " +
                             std::to_string(t.data.size()) + " values, expected " +
                             std::to_string(expect));
  ck(cudaMemcpy(dst, t.data.data(), t.data.size() * 4, cudaMemcpyHostToDevice),
     "uploading " + name);
}

}  // namespace

CudaEngine::CudaEngine(const ModelWeights& w, CudaEngineOptions opt) : cfg_(w.config), opt_(opt) {
  // Tied embeddings: the host model has no lm_head then.
  cfg_.tie_word_embeddings = w.lm_head.empty();
  init_common();
  if (w.layers.size() != static_cast<size_t>(cfg_.n_layers))
    throw std::runtime_error("cuda engine: model has " + std::to_string(w.layers.size()) +
                             " layers of weights, config says " + std::to_string(cfg_.n_layers));
  const int64_t H = cfg_.hidden, F = cfg_.intermediate, Q = cfg_.q_dim(), KV = cfg_.kv_dim();
  std::vector<uint16_t> tmp;
  upload_bf16(impl_->embed, w.embed, int64_t{cfg_.vocab} * H, "embed", tmp);
  if (!cfg_.tie_word_embeddings)
    upload_bf16(impl_->lm_head, w.lm_head, int64_t{cfg_.vocab} * H, "lm_head", tmp);
  upload_f32(impl_->final_norm, w.final_norm, H, "final_norm");
  for (int l = 0; l < cfg_.n_layers; ++l) {
    const LayerWeights& L = w.layers[l];
    DevLayer& D = impl_->layers[l];
    const std::string p = "layers." + std::to_string(l) + ".";
    upload_bf16(D.wqkv, L.wq, Q * H, p + "wq", tmp);
    upload_bf16(D.wqkv + Q * H, L.wk, KV * H, p + "wk", tmp);
    upload_bf16(D.wqkv + (Q + KV) * H, L.wv, KV * H, p + "wv", tmp);
    if (cfg_.qkv_bias) {
      upload_bf16(D.bqkv, L.bq, Q, p + "bq", tmp);
      upload_bf16(D.bqkv + Q, L.bk, KV, p + "bk", tmp);
      upload_bf16(D.bqkv + Q + KV, L.bv, KV, p + "bv", tmp);
    }
    upload_bf16(D.wo, L.wo, H * Q, p + "wo", tmp);
    upload_bf16(D.wgu, L.w_gate, F * H, p + "w_gate", tmp);
    upload_bf16(D.wgu + F * H, L.w_up, F * H, p + "w_up", tmp);
    upload_bf16(D.wdown, L.w_down, H * F, p + "w_down", tmp);
    upload_f32(D.attn_norm, L.attn_norm, H, p + "attn_norm");
    upload_f32(D.ffn_norm, L.ffn_norm, H, p + "ffn_norm");
  }
}

CudaEngine::CudaEngine(const ModelConfig& cfg, uint64_t seed, CudaEngineOptions opt)
    : cfg_(cfg), opt_(opt) {
  init_common();
  const size_t H = cfg_.hidden, F = cfg_.intermediate, Q = cfg_.q_dim(), KV = cfg_.kv_dim();
  const size_t V = cfg_.vocab, QKV = Q + 2 * KV;
  uint64_t s = seed * 1000003ull + 17;
  auto normal = [&](uint16_t* p, size_t n) {
    ck(fill_normal_bf16(p, n, ++s, 0.02f, stream_), "random init");
  };
  auto norm = [&](float* p, size_t n) {
    ck(fill_near_one_f32(p, n, ++s, 0.05f, stream_), "random init");
  };
  normal(impl_->embed, V * H);
  if (!cfg_.tie_word_embeddings) normal(impl_->lm_head, V * H);
  norm(impl_->final_norm, H);
  for (DevLayer& L : impl_->layers) {
    normal(L.wqkv, QKV * H);
    if (L.bqkv) normal(L.bqkv, QKV);
    normal(L.wo, H * Q);
    normal(L.wgu, 2 * F * H);
    normal(L.wdown, H * F);
    norm(L.attn_norm, H);
    norm(L.ffn_norm, H);
  }
  ck(cudaStreamSynchronize(stream_), "random init");
}

CudaEngine::~CudaEngine() {
  if (stream_) cudaStreamSynchronize(stream_);
  impl_.reset();
  if (stream_) cudaStreamDestroy(stream_);
}

// ---------------------------------------------------------------- prefill
namespace {

// Everything a prefill decides before touching the device.
struct Setup {
  int64_t n = 0, nb = 0, chunk = 0;
  bool all_dense = true;
  std::vector<std::vector<Piece>> pieces;  // [layer]
  // Sparse sizing.
  bool any_vs = false, any_bs = false;
  int vs_col_cap = 0, vs_off_cap = 0;  // estimation selections (clamped budgets, max)
  int bs_kmax = 0;                     // estimation block lists
  int64_t range_cap = 0, col_cap = 0;  // CSR value capacities (entries)
  // Planned indices to upload: per layer, capacities (0: none).
  std::vector<int> plan_vs_ccap, plan_vs_ocap, plan_bs_k;
  size_t est_ws = 0;
  int max_pieces = 0;
  int n_last = 0;
};

bool head_planned(const HeadPlan& hp) {
  if (hp.kind == PatternKind::kVerticalSlash) return !hp.vs.offsets.empty();
  if (hp.kind == PatternKind::kBlockSparse) return hp.topk >= 1 && !hp.blocks.empty();
  return false;
}

// Split heads of one layer into launches.
std::vector<Piece> make_pieces(const ModelConfig& c, const SparsePolicy& policy,
                               const PrefillPlan* plan, int layer, int64_t n) {
  const int group = c.n_heads / c.n_kv_heads;
  std::vector<Piece> out;
  if (policy.all_dense(n)) {
    out.push_back({PatternKind::kDense, 0, c.n_heads, 0, c.n_kv_heads, 0, 0, false});
    return out;
  }
  auto key = [&](int h) {
    const HeadPattern hp = policy.at(layer, h, n);
    Piece p;
    p.kind = hp.kind;
    if (hp.kind == PatternKind::kAShape) {
      p.a = hp.a;
      p.b = hp.b;
    }
    p.planned = plan && !plan->empty() && head_planned(plan->layers[layer][h]);
    return p;
  };
  auto same = [](const Piece& x, const Piece& y) {
    return x.kind == y.kind && x.a == y.a && x.b == y.b && x.planned == y.planned;
  };
  int h = 0;
  while (h < c.n_heads) {
    Piece p = key(h);
    int e = h + 1;
    while (e < c.n_heads && same(key(e), p)) ++e;
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

// Launch pieces, index capacities and the estimation workspace of one prefill; throws
// when the policy needs a kernel this build or this model's head_dim lacks.
Setup make_setup(const ModelConfig& c, const CudaEngineOptions& opt, int64_t n,
                 const SparsePolicy& policy, const PrefillPlan* plan_inout,
                 const PrefillOptions& popt) {
  Setup S;
  S.n = n;
  S.nb = num_blocks(n);
  S.chunk = std::min(opt.mlp_chunk, n);
  S.all_dense = policy.all_dense(n);
  S.pieces.resize(c.n_layers);
  S.plan_vs_ccap.assign(c.n_layers, 0);
  S.plan_vs_ocap.assign(c.n_layers, 0);
  S.plan_bs_k.assign(c.n_layers, 0);
  const int hd = c.head_dim;
  int64_t range_need = 0, col_need = 0;
  for (int l = 0; l < c.n_layers; ++l) {
    S.pieces[l] = make_pieces(c, policy, plan_inout, l, n);
    S.max_pieces = std::max<int>(S.max_pieces, S.pieces[l].size());
    for (const Piece& p : S.pieces[l]) {
      if (p.kind == PatternKind::kDense) continue;
      if (!cuda::sparse_attention_supported(DType::kBF16, hd))
        throw std::runtime_error("cuda engine: no bf16 sparse attention kernel for head_dim " +
                                 std::to_string(hd) + " in this build (policy " + policy.source +
                                 ")");
      int64_t r_need = 0, c_need = 0;
      for (int h = p.h0; h < p.h0 + p.nh; ++h) {
        const HeadPattern hp = policy.at(l, h, n);
        if (p.kind == PatternKind::kVerticalSlash) {
          S.any_vs = true;
          int v = clamp_vertical_budget(hp.a, n), s = clamp_slash_budget(hp.b, n);
          if (p.planned) {
            const VsSelection& sel = plan_inout->layers[l][h].vs;
            v = static_cast<int>(sel.columns.size());
            s = static_cast<int>(sel.offsets.size());
            S.plan_vs_ccap[l] = std::max(S.plan_vs_ccap[l], v);
            S.plan_vs_ocap[l] = std::max(S.plan_vs_ocap[l], s);
          }
          if (!p.planned || popt.estimate_with_plan) {
            S.vs_col_cap = std::max(S.vs_col_cap, clamp_vertical_budget(hp.a, n));
            S.vs_off_cap = std::max(S.vs_off_cap, clamp_slash_budget(hp.b, n));
          }
          // Worst case of the canonical index: per block b at most min(s, b + 1) ranges
          // (disjoint, non-touching, each >= 64 wide) and min(v, 64 (b + 1)) columns.
          for (int64_t b = 0; b < S.nb; ++b) {
            r_need += std::min<int64_t>(s, b + 1);
            c_need += std::min<int64_t>(v, 64 * (b + 1));
          }
        } else if (p.kind == PatternKind::kBlockSparse) {
          S.any_bs = true;
          if (hp.a < 1) throw std::runtime_error("cuda engine: block-sparse head needs top-k >= 1");
          if (p.planned) S.plan_bs_k[l] = std::max(S.plan_bs_k[l], plan_inout->layers[l][h].topk);
          if (!p.planned || popt.estimate_with_plan) S.bs_kmax = std::max(S.bs_kmax, hp.a);
        }
      }
      range_need = std::max(range_need, r_need);
      col_need = std::max(col_need, c_need);
    }
  }
  if (S.any_vs && hd != 64 && hd != 128)
    throw std::runtime_error(
        "cuda engine: vertical-slash estimation needs head_dim 64 or 128, "
        "the model has " +
        std::to_string(hd));
  // CSR capacity: the worst case, capped (half the cap each for ranges and columns).
  S.range_cap = std::min<int64_t>(range_need, opt.vs_index_max_bytes / 2 / 8);
  S.col_cap = std::min<int64_t>(col_need, opt.vs_index_max_bytes / 2 / 4);
  if (S.any_vs) {
    S.range_cap = std::max<int64_t>(S.range_cap, 1);
    S.col_cap = std::max<int64_t>(S.col_cap, 1);
  }

  // Estimation workspace: the largest over the calls this prefill makes.
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const size_t QD = c.q_dim(), KVD = c.kv_dim();
  const int n_last = static_cast<int>(std::min<int64_t>(64, n));
  int max_off_cap = S.vs_off_cap;
  for (int l = 0; l < c.n_layers; ++l) max_off_cap = std::max(max_off_cap, S.plan_vs_ocap[l]);
  if (S.any_vs) {
    VsEstimateParams e;
    e.q_row_stride = QD;
    e.q_head_stride = hd;
    e.k_row_stride = KVD;
    e.k_head_stride = hd;
    e.n_last = n_last;
    e.seq_len = n;
    e.n_k = static_cast<int>(n);
    e.num_heads = c.n_heads;
    e.num_kv_heads = c.n_kv_heads;
    e.head_dim = hd;
    e.scale = scale;
    e.dtype = DType::kBF16;
    S.est_ws = std::max(S.est_ws, cuda::index::vs_estimate_workspace_size(e));
    S.est_ws = std::max(S.est_ws, cuda::index::vs_select_workspace_size(c.n_heads, n));
    S.est_ws = std::max(
        S.est_ws, cuda::index::vs_index_workspace_size(c.n_heads, n, std::max(max_off_cap, 1)));
  }
  if (S.any_bs) {
    cuda::index::BlockSparseEstimateParams e;
    e.q_row_stride = QD;
    e.q_head_stride = hd;
    e.k_row_stride = KVD;
    e.k_head_stride = hd;
    e.seq_len = n;
    e.num_heads = c.n_heads;
    e.num_kv_heads = c.n_kv_heads;
    e.head_dim = hd;
    e.scale = scale;
    e.dtype = DType::kBF16;
    S.est_ws = std::max(S.est_ws, cuda::index::block_sparse_estimate_workspace_size(e));
  }

  S.n_last = n_last;
  return S;
}

struct Bufs {
  int* ids;
  float* x;
  uint16_t *xb, *q, *k, *v, *mlp_h, *gu, *act;
  float* logits;
  uint16_t* last;
  void* gemm_ws;
  // estimation
  float *row_max, *row_sum, *col_score, *slash_score;
  int *sel_cols, *sel_offs, *sel_nc, *sel_no;
  void* est_ws;
  int* bs_blocks;
  // index
  int64_t *range_ptr, *col_ptr;
  int *range_lo, *range_hi, *col;
  // plan uploads, per layer
  std::vector<int*> pv_cols, pv_offs, pv_nc, pv_no, pb_blocks;
};
struct Sizes {
  size_t act = 0, mlp = 0, est = 0, idx = 0, gemm = 0;
};

// Carves every buffer of a prefill from cv (sizing pass when cv.base is null).
void carve_all(Carver& cv, const Setup& S, const ModelConfig& c, Bufs& B, Sizes& sz) {
  const int64_t n = S.n;
  const int n_last = S.n_last;
  const size_t H = c.hidden, F = c.intermediate, QD = c.q_dim(), KVD = c.kv_dim();
  const size_t XB = std::max(H, QD);
  size_t m0 = cv.used;
  B.ids = cv.take<int>(n);
  B.x = cv.take<float>(n * H);
  B.xb = cv.take<uint16_t>(n * XB);
  B.q = cv.take<uint16_t>(n * QD);
  B.k = cv.take<uint16_t>(n * KVD);
  B.v = cv.take<uint16_t>(n * KVD);
  B.logits = cv.take<float>(c.vocab);
  B.last = cv.take<uint16_t>(H);
  sz.act = cv.used - m0;
  m0 = cv.used;
  B.mlp_h = cv.take<uint16_t>(S.chunk * H);
  B.gu = cv.take<uint16_t>(S.chunk * 2 * F);
  B.act = cv.take<uint16_t>(S.chunk * F);
  sz.mlp = cv.used - m0;
  m0 = cv.used;
  B.gemm_ws = cv.take<char>(cuda::gemm_workspace_size());
  sz.gemm = cv.used - m0;
  m0 = cv.used;
  const size_t nh = c.n_heads;
  if (S.any_vs) {
    B.row_max = cv.take<float>(nh * n_last);
    B.row_sum = cv.take<float>(nh * n_last);
    B.col_score = cv.take<float>(nh * n);
    B.slash_score = cv.take<float>(nh * n);
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
  sz.est = cv.used - m0;
  m0 = cv.used;
  if (S.any_vs) {
    B.range_ptr = cv.take<int64_t>(nh * S.nb + 1);
    B.col_ptr = cv.take<int64_t>(nh * S.nb + 1);
    B.range_lo = cv.take<int>(S.range_cap);
    B.range_hi = cv.take<int>(S.range_cap);
    B.col = cv.take<int>(S.col_cap);
  }
  sz.idx = cv.used - m0;
}

}  // namespace

namespace {

// Sizes the workspace of S and compares it with what the device has free now.
MemoryPlan measure(const Setup& S, const ModelConfig& c, const CudaEngineOptions& opt,
                   size_t weight_bytes) {
  Bufs B{};
  Sizes sz;
  Carver sizing;
  carve_all(sizing, S, c, B, sz);
  MemoryPlan mp;
  mp.tokens = S.n;
  mp.weights = weight_bytes;
  mp.activations = sz.act;
  mp.mlp = sz.mlp;
  mp.estimation = sz.est;
  mp.index = sz.idx;
  mp.gemm_workspace = sz.gemm;
  mp.workspace = sizing.used;
  ck(cudaSetDevice(opt.device), "selecting the device");
  size_t free_b = 0, total_b = 0;
  ck(cudaMemGetInfo(&free_b, &total_b), "querying device memory");
  mp.available = opt.memory_limit ? std::min(opt.memory_limit, free_b)
                                  : (free_b > opt.reserve_bytes ? free_b - opt.reserve_bytes : 0);
  mp.fits = mp.workspace <= mp.available;
  return mp;
}

}  // namespace

MemoryPlan CudaEngine::plan_memory(int64_t n, const SparsePolicy& policy) const {
  if (n < 1) throw std::runtime_error("cuda engine: a prompt has at least one token");
  policy.check_model(cfg_);
  return measure(make_setup(cfg_, opt_, n, policy, nullptr, PrefillOptions{}), cfg_, opt_,
                 weight_bytes_);
}

std::vector<float> CudaEngine::prefill(const std::vector<int>& ids, const SparsePolicy& policy,
                                       KvSink* sink, PrefillPlan* plan_inout,
                                       CudaPrefillStats* stats, const PrefillOptions& popt) {
  const auto t_start = Clock::now();
  const ModelConfig& c = cfg_;
  Impl& I = *impl_;
  // ---- validation (before any device work)
  check_prompt_ids(c, ids);
  const int64_t n = static_cast<int64_t>(ids.size());
  policy.check_model(c);
  const bool reuse = plan_inout && !plan_inout->empty();
  if (reuse) {
    PlanCheck rules;
    rules.allow_unplanned = true;  // unplanned sparse heads are estimated here
    rules.ascending_blocks = false;
    rules.diagonal_block = true;
    check_prefill_plan(*plan_inout, policy, c, n, rules);
  }
  const bool fill_plan = plan_inout && !reuse;

  const Setup S = make_setup(c, opt_, n, policy, reuse ? plan_inout : nullptr, popt);
  const int hd = c.head_dim;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const size_t H = c.hidden, F = c.intermediate, QD = c.q_dim(), KVD = c.kv_dim();
  const int n_last = S.n_last;

  // ---- the one allocation, carved in a fixed order (sizing pass, then for real)
  const MemoryPlan mp = measure(S, c, opt_, weight_bytes_);
  if (!mp.fits) throw std::runtime_error("cuda engine: refused: " + mp.describe());

  // ---- allocate, upload ids and planned indices
  void* base = nullptr;
  ck(cudaMalloc(&base, mp.workspace), "allocating the prefill workspace (" + mp.describe() + ")");
  struct Free {
    void* p;
    ~Free() { cudaFree(p); }
  } free_guard{base};
  Bufs B{};
  Sizes sz;
  Carver real;
  real.base = static_cast<char*>(base);
  carve_all(real, S, c, B, sz);
  size_t free_after = 0, total_b = 0;
  cudaMemGetInfo(&free_after, &total_b);
  cudaStream_t st = stream_;
  ck(cudaMemcpyAsync(B.ids, ids.data(), n * sizeof(int), cudaMemcpyHostToDevice, st),
     "uploading ids");
  std::vector<int> host_tmp;
  if (reuse) {
    for (int l = 0; l < c.n_layers; ++l) {
      if (S.plan_vs_ocap[l] > 0) {
        const int cc = std::max(S.plan_vs_ccap[l], 1), oc = S.plan_vs_ocap[l];
        std::vector<int> cols(size_t(c.n_heads) * cc, 0), offs(size_t(c.n_heads) * oc, 0),
            nc(c.n_heads, 0), no(c.n_heads, 0);
        for (int h = 0; h < c.n_heads; ++h) {
          const HeadPlan& hp = plan_inout->layers[l][h];
          if (hp.kind != PatternKind::kVerticalSlash || !head_planned(hp)) continue;
          std::copy(hp.vs.columns.begin(), hp.vs.columns.end(), cols.begin() + size_t(h) * cc);
          std::copy(hp.vs.offsets.begin(), hp.vs.offsets.end(), offs.begin() + size_t(h) * oc);
          nc[h] = static_cast<int>(hp.vs.columns.size());
          no[h] = static_cast<int>(hp.vs.offsets.size());
        }
        ck(cudaMemcpy(B.pv_cols[l], cols.data(), cols.size() * 4, cudaMemcpyHostToDevice), "plan");
        ck(cudaMemcpy(B.pv_offs[l], offs.data(), offs.size() * 4, cudaMemcpyHostToDevice), "plan");
        ck(cudaMemcpy(B.pv_nc[l], nc.data(), nc.size() * 4, cudaMemcpyHostToDevice), "plan");
        ck(cudaMemcpy(B.pv_no[l], no.data(), no.size() * 4, cudaMemcpyHostToDevice), "plan");
      }
      if (S.plan_bs_k[l] > 0) {
        const int K = S.plan_bs_k[l];
        host_tmp.assign(size_t(c.n_heads) * S.nb * K, -1);
        for (int h = 0; h < c.n_heads; ++h) {
          const HeadPlan& hp = plan_inout->layers[l][h];
          if (hp.kind != PatternKind::kBlockSparse || !head_planned(hp)) continue;
          for (int64_t b = 0; b < S.nb; ++b)
            for (int j = 0; j < hp.topk; ++j)
              host_tmp[(size_t(h) * S.nb + b) * K + j] = hp.blocks[b * hp.topk + j];
        }
        ck(cudaMemcpy(B.pb_blocks[l], host_tmp.data(), host_tmp.size() * 4, cudaMemcpyHostToDevice),
           "plan");
      }
    }
  }
  if (fill_plan) {
    plan_inout->seq_len = n;
    plan_inout->layers.assign(c.n_layers, std::vector<HeadPlan>(c.n_heads));
  }

  // ---- timing: events recorded between phases, attributed to the phase that ends
  CudaPrefillStats stl;
  CudaPrefillStats& ST = stats ? *stats : stl;
  ST = CudaPrefillStats{};
  ST.tokens = n;
  ST.all_dense = S.all_dense;
  ST.plan_reused = reuse;
  ST.memory = mp;
  ST.peak_device_bytes = total_b - free_after;
  ST.layers.assign(c.n_layers, LayerTimes{});
  const bool timing = popt.timing;
  struct Mark {
    int cat, layer;
  };
  std::vector<Mark> marks;
  if (timing) {
    const int64_t chunks = (n + S.chunk - 1) / S.chunk;
    const size_t need = 4 + size_t(c.n_layers) * (8 + 4 * S.max_pieces + 4 * chunks);
    while (I.events.size() < need) {
      cudaEvent_t e;
      ck(cudaEventCreate(&e), "creating timing events");
      I.events.push_back(e);
    }
    marks.reserve(need);
    ck(cudaEventRecord(I.events[0], st), "timing");
    marks.push_back({-1, -1});
  }
  auto mark = [&](int cat, int layer) {
    if (!timing) return;
    if (marks.size() >= I.events.size()) throw std::runtime_error("cuda engine: event pool");
    ck(cudaEventRecord(I.events[marks.size()], st), "timing");
    marks.push_back({cat, layer});
  };

  // ---- forward
  const int64_t* no_pos = nullptr;
  ok(cuda::embedding(I.embed, DType::kBF16, c.vocab, H, B.ids, n, B.x, DType::kF32, st),
     "embedding");
  mark(kHead, -1);
  auto gemm = [&](const void* x, const void* w, const void* bias, void* y, DType yt, int64_t m,
                  int64_t in, int64_t out, bool acc, int l) {
    ok(cuda::gemm_xwt(I.gemm, x, w, DType::kBF16, bias, y, yt, m, in, out, acc, B.gemm_ws,
                      cuda::gemm_workspace_size(), st),
       "gemm", l);
  };
  std::vector<int> vb(c.n_heads), sb(c.n_heads), topk(c.n_heads);
  int64_t vs_entries_max = 0;

  for (int l = 0; l < c.n_layers; ++l) {
    const DevLayer& L = I.layers[l];
    ok(cuda::rmsnorm(B.x, DType::kF32, H, L.attn_norm, DType::kF32, B.xb, DType::kBF16, H, n, H,
                     c.rms_eps, st),
       "rmsnorm", l);
    mark(kRest, l);
    gemm(B.xb, L.wqkv, L.bqkv, B.q, DType::kBF16, n, H, QD, false, l);
    gemm(B.xb, L.wqkv + QD * H, L.bqkv ? L.bqkv + QD : nullptr, B.k, DType::kBF16, n, H, KVD, false,
         l);
    gemm(B.xb, L.wqkv + (QD + KVD) * H, L.bqkv ? L.bqkv + QD + KVD : nullptr, B.v, DType::kBF16, n,
         H, KVD, false, l);
    mark(kGemm, l);
    ok(cuda::rope(B.q, DType::kBF16, n, c.n_heads, hd, QD, hd, no_pos, 0, I.inv_freq, c.rope_style,
                  st),
       "rope q", l);
    ok(cuda::rope(B.k, DType::kBF16, n, c.n_kv_heads, hd, KVD, hd, no_pos, 0, I.inv_freq,
                  c.rope_style, st),
       "rope k", l);
    mark(kRest, l);

    // KV of this layer is final: export first, so an asynchronous sink overlaps attention.
    if (sink) {
      KvSlice s;
      s.layer = l;
      for (int h = 0; h < c.n_kv_heads; ++h) s.kv_heads.push_back(h);
      s.tokens = {{0, n}};
      s.head_dim = hd;
      s.dtype = DType::kBF16;
      s.k = B.k;
      s.v = B.v;
      s.on_device = true;
      s.stream = st;
      sink->put(s);
      mark(kExport, l);
    }

    for (const Piece& p : S.pieces[l]) {
      AttentionParams ap;
      ap.q = B.q + size_t(p.h0) * hd;
      ap.k = B.k + size_t(p.kv0) * hd;
      ap.v = B.v + size_t(p.kv0) * hd;
      ap.o = B.xb + size_t(p.h0) * hd;
      ap.q_row_stride = QD;
      ap.o_row_stride = QD;
      ap.k_row_stride = ap.v_row_stride = KVD;
      ap.q_head_stride = ap.k_head_stride = ap.v_head_stride = ap.o_head_stride = hd;
      ap.n_q = ap.n_k = static_cast<int>(n);
      ap.num_heads = p.nh;
      ap.num_kv_heads = p.nkv;
      ap.head_dim = hd;
      ap.causal = true;
      ap.scale = scale;
      ap.dtype = DType::kBF16;
      ++ST.attention_calls;
      ST.heads_by_kind[static_cast<int>(p.kind)] += p.nh;
      switch (p.kind) {
        case PatternKind::kDense:
          ok(cuda::flash_attention_fwd(ap, st), "dense attention", l);
          break;
        case PatternKind::kAShape:
          ok(cuda::ashape_attention_fwd(ap, p.a, p.b, st), "A-shape attention", l);
          break;
        case PatternKind::kVerticalSlash: {
          cuda::index::VsSelectionsDevice sel;
          sel.seq_len = n;
          sel.num_heads = p.nh;
          const bool estimate = !p.planned || popt.estimate_with_plan;
          if (estimate) {
            int vmax = 0, smax = 0;
            for (int i = 0; i < p.nh; ++i) {
              const HeadPattern hp = policy.at(l, p.h0 + i, n);
              vb[i] = clamp_vertical_budget(hp.a, n);
              sb[i] = clamp_slash_budget(hp.b, n);
              vmax = std::max(vmax, vb[i]);
              smax = std::max(smax, sb[i]);
            }
            VsEstimateParams e;
            e.q_last = B.q + (size_t(n) - n_last) * QD + size_t(p.h0) * hd;
            e.k = ap.k;
            e.q_row_stride = QD;
            e.q_head_stride = hd;
            e.k_row_stride = KVD;
            e.k_head_stride = hd;
            e.n_last = n_last;
            e.seq_len = n;
            e.n_k = static_cast<int>(n);
            e.k_pos0 = 0;
            e.num_heads = p.nh;
            e.num_kv_heads = p.nkv;
            e.head_dim = hd;
            e.scale = scale;
            e.dtype = DType::kBF16;
            ck(cudaMemsetAsync(B.col_score, 0, size_t(p.nh) * n * 4, st), "clear scores");
            ck(cudaMemsetAsync(B.slash_score, 0, size_t(p.nh) * n * 4, st), "clear scores");
            ok(cuda::index::vs_row_stats(e, B.row_max, B.row_sum, B.est_ws, S.est_ws, st),
               "vs_row_stats", l);
            ok(cuda::index::vs_scores(e, B.row_max, B.row_sum, B.col_score, B.slash_score, B.est_ws,
                                      S.est_ws, st),
               "vs_scores", l);
            cuda::index::VsSelectionsDevice es;
            es.seq_len = n;
            es.num_heads = p.nh;
            es.columns = B.sel_cols;
            es.offsets = B.sel_offs;
            es.n_columns = B.sel_nc;
            es.n_offsets = B.sel_no;
            es.col_capacity = std::max(S.vs_col_cap, 1);
            es.off_capacity = std::max(S.vs_off_cap, 1);
            for (int h0 = 0; h0 < p.nh; h0 += cuda::index::kMaxHeadsPerCall) {
              const int m = std::min(cuda::index::kMaxHeadsPerCall, p.nh - h0);
              cuda::index::VsSelectionsDevice part = es;
              part.num_heads = m;
              part.columns += size_t(h0) * es.col_capacity;
              part.offsets += size_t(h0) * es.off_capacity;
              part.n_columns += h0;
              part.n_offsets += h0;
              ok(cuda::index::vs_select(B.col_score + size_t(h0) * n,
                                        B.slash_score + size_t(h0) * n, vb.data() + h0,
                                        sb.data() + h0, &part, B.est_ws, S.est_ws, st),
                 "vs_select", l);
            }
            sel = es;
            if (fill_plan) {  // download the selections (tests)
              std::vector<int> nc(p.nh), no(p.nh), cols(size_t(p.nh) * es.col_capacity),
                  offs(size_t(p.nh) * es.off_capacity);
              ck(cudaMemcpyAsync(nc.data(), B.sel_nc, p.nh * 4, cudaMemcpyDeviceToHost, st), "d2h");
              ck(cudaMemcpyAsync(no.data(), B.sel_no, p.nh * 4, cudaMemcpyDeviceToHost, st), "d2h");
              ck(cudaMemcpyAsync(cols.data(), B.sel_cols, cols.size() * 4, cudaMemcpyDeviceToHost,
                                 st),
                 "d2h");
              ck(cudaMemcpyAsync(offs.data(), B.sel_offs, offs.size() * 4, cudaMemcpyDeviceToHost,
                                 st),
                 "d2h");
              ck(cudaStreamSynchronize(st), "downloading selections");
              for (int i = 0; i < p.nh; ++i) {
                HeadPlan& hp = plan_inout->layers[l][p.h0 + i];
                hp.kind = PatternKind::kVerticalSlash;
                const int* cb = cols.data() + size_t(i) * es.col_capacity;
                const int* ob = offs.data() + size_t(i) * es.off_capacity;
                hp.vs.columns.assign(cb, cb + nc[i]);
                hp.vs.offsets.assign(ob, ob + no[i]);
              }
            }
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
          ok(cuda::index::vs_index_count(sel, B.range_ptr, B.col_ptr, B.est_ws, S.est_ws, st),
             "vs_index_count", l);
          const size_t last = size_t(p.nh) * S.nb;
          ck(cudaMemcpyAsync(I.pinned, B.range_ptr + last, 8, cudaMemcpyDeviceToHost, st), "d2h");
          ck(cudaMemcpyAsync(I.pinned + 1, B.col_ptr + last, 8, cudaMemcpyDeviceToHost, st), "d2h");
          ck(cudaStreamSynchronize(st), "reading the index size");
          const int64_t nr = I.pinned[0], ncol = I.pinned[1];
          vs_entries_max = std::max(vs_entries_max, nr + ncol);
          if (nr > S.range_cap || ncol > S.col_cap)
            throw std::runtime_error(
                "cuda engine: layer " + std::to_string(l) + " vertical-slash index has " +
                std::to_string(nr) + " ranges and " + std::to_string(ncol) +
                " columns, over the capacity of " + std::to_string(S.range_cap) + " / " +
                std::to_string(S.col_cap) + " (raise CudaEngineOptions::vs_index_max_bytes)");
          ok(cuda::index::vs_index_fill(sel, B.range_ptr, B.col_ptr, B.range_lo, B.range_hi,
                                        ncol ? B.col : nullptr, B.est_ws, S.est_ws, st),
             "vs_index_fill", l);
          mark(kEst, l);
          VsIndexView iv;
          iv.seq_len = n;
          iv.nblocks = S.nb;
          iv.range_ptr = B.range_ptr;
          iv.range_lo = B.range_lo;
          iv.range_hi = B.range_hi;
          iv.col_ptr = B.col_ptr;
          iv.col = B.col;
          ok(cuda::vs_attention_fwd(ap, iv, 0, st), "vertical-slash attention", l);
          break;
        }
        case PatternKind::kBlockSparse: {
          const bool estimate = !p.planned || popt.estimate_with_plan;
          BlockSparseView bv;
          bv.seq_len = n;
          bv.nblocks = S.nb;
          if (estimate) {
            int kmax = 0;
            for (int i = 0; i < p.nh; ++i) {
              topk[i] = policy.at(l, p.h0 + i, n).a;
              kmax = std::max(kmax, topk[i]);
            }
            cuda::index::BlockSparseEstimateParams e;
            e.q = ap.q;
            e.k = ap.k;
            e.q_row_stride = QD;
            e.q_head_stride = hd;
            e.k_row_stride = KVD;
            e.k_head_stride = hd;
            e.seq_len = n;
            e.num_heads = p.nh;
            e.num_kv_heads = p.nkv;
            e.head_dim = hd;
            e.scale = scale;
            e.dtype = DType::kBF16;
            ok(cuda::index::block_sparse_estimate(e, topk.data(), B.bs_blocks, kmax, B.est_ws,
                                                  S.est_ws, st),
               "block_sparse_estimate", l);
            bv.k = kmax;
            bv.blocks = B.bs_blocks;
            if (fill_plan) {
              host_tmp.resize(size_t(p.nh) * S.nb * kmax);
              ck(cudaMemcpyAsync(host_tmp.data(), B.bs_blocks, host_tmp.size() * 4,
                                 cudaMemcpyDeviceToHost, st),
                 "d2h");
              ck(cudaStreamSynchronize(st), "downloading block lists");
              for (int i = 0; i < p.nh; ++i) {
                HeadPlan& hp = plan_inout->layers[l][p.h0 + i];
                hp.kind = PatternKind::kBlockSparse;
                hp.topk = topk[i];
                hp.blocks.assign(size_t(S.nb) * topk[i], -1);
                for (int64_t b = 0; b < S.nb; ++b)
                  for (int j = 0; j < topk[i]; ++j)
                    hp.blocks[b * topk[i] + j] = host_tmp[(size_t(i) * S.nb + b) * kmax + j];
              }
            }
          }
          if (p.planned) {
            bv.k = S.plan_bs_k[l];
            bv.blocks = B.pb_blocks[l] + size_t(p.h0) * S.nb * bv.k;
          }
          mark(kEst, l);
          ok(cuda::block_sparse_attention_fwd(ap, bv, 0, st), "block-sparse attention", l);
          break;
        }
      }
      if (fill_plan && (p.kind == PatternKind::kDense || p.kind == PatternKind::kAShape))
        for (int i = 0; i < p.nh; ++i) plan_inout->layers[l][p.h0 + i].kind = p.kind;
      mark(kAttn, l);
    }

    // x += attn Wo^T, then the MLP over token chunks: x += Wd (silu(Wg h) * Wu h).
    gemm(B.xb, L.wo, nullptr, B.x, DType::kF32, n, QD, H, true, l);
    mark(kGemm, l);
    for (int64_t t0 = 0; t0 < n; t0 += S.chunk) {
      const int64_t m = std::min(S.chunk, n - t0);
      float* xr = B.x + size_t(t0) * H;
      ok(cuda::rmsnorm(xr, DType::kF32, H, L.ffn_norm, DType::kF32, B.mlp_h, DType::kBF16, H, m, H,
                       c.rms_eps, st),
         "rmsnorm", l);
      mark(kRest, l);
      gemm(B.mlp_h, L.wgu, nullptr, B.gu, DType::kBF16, m, H, 2 * F, false, l);
      mark(kGemm, l);
      ok(cuda::swiglu(B.gu, B.gu + F, DType::kBF16, 2 * F, B.act, DType::kBF16, F, m, F, st),
         "swiglu", l);
      mark(kRest, l);
      gemm(B.act, L.wdown, nullptr, xr, DType::kF32, m, F, H, true, l);
      mark(kGemm, l);
    }
  }

  // Logits of the last position.
  ok(cuda::rmsnorm(B.x + size_t(n - 1) * H, DType::kF32, H, I.final_norm, DType::kF32, B.last,
                   DType::kBF16, H, 1, H, c.rms_eps, st),
     "final rmsnorm");
  gemm(B.last, I.lm_head, nullptr, B.logits, DType::kF32, 1, H, c.vocab, false, -1);
  mark(kHead, -1);
  std::vector<float> logits(c.vocab);
  ck(cudaMemcpyAsync(logits.data(), B.logits, logits.size() * 4, cudaMemcpyDeviceToHost, st),
     "downloading logits");
  ck(cudaStreamSynchronize(st), "prefill");
  if (sink) sink->finish();
  ST.vs_index_entries_max = vs_entries_max;
  if (timing) {
    for (size_t i = 1; i < marks.size(); ++i) {
      float ms = 0;
      ck(cudaEventElapsedTime(&ms, I.events[i - 1], I.events[i]), "timing");
      const Mark& m = marks[i];
      if (m.layer < 0) {
        ST.head_ms += ms;
        continue;
      }
      LayerTimes& t = ST.layers[m.layer];
      switch (m.cat) {
        case kGemm:
          t.gemm_ms += ms;
          break;
        case kAttn:
          t.attention_ms += ms;
          break;
        case kEst:
          t.estimate_ms += ms;
          break;
        case kExport:
          t.kv_export_ms += ms;
          break;
        default:
          t.rest_ms += ms;
          break;
      }
    }
    for (const LayerTimes& t : ST.layers) {
      ST.sum.gemm_ms += t.gemm_ms;
      ST.sum.attention_ms += t.attention_ms;
      ST.sum.estimate_ms += t.estimate_ms;
      ST.sum.kv_export_ms += t.kv_export_ms;
      ST.sum.rest_ms += t.rest_ms;
    }
  }
  ST.total_ms = ms_since(t_start);
  return logits;
}

}  // namespace mprefill::gpu
