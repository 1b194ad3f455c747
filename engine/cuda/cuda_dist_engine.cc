#include "engine/cuda/cuda_dist_engine.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/flash/flash.h"
#include "kernels/cuda/index/index.h"
#include "kernels/cuda/merge.h"
#include "kernels/cuda/sparse/sparse_attention.h"
#include "model/prompt.h"
#include "model/weight_source.h"
#include "engine/cuda/device_init.h"
#include "engine/cuda/sp_estimate.h"
#include "engine/plan_codec.h"

namespace mprefill::gpu {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kAlign = 256;
size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

struct Carver {
  char* base = nullptr;
  size_t used = 0;
  template <class T>
  T* take(size_t count) {
    T* p = base ? reinterpret_cast<T*>(base + used) : nullptr;
    used += align_up(std::max<size_t>(count, 1) * sizeof(T));
    return p;
  }
};

// Causal 64x64 tiles of query rows [q0, q1) against keys [k0, k1) (global positions).
int64_t pair_tiles(int64_t q0, int64_t q1, int64_t k0, int64_t k1) {
  int64_t t = 0;
  for (int64_t qb = q0 / kBlock; qb * kBlock < q1; ++qb) {
    const int64_t last = std::min(q1 - 1, qb * kBlock + kBlock - 1);  // last row of the block
    const int64_t hi = std::min(k1 - 1, last);
    if (hi < k0) continue;
    t += hi / kBlock - k0 / kBlock + 1;
  }
  return t;
}

// Heads of one layer (this rank's local heads) that one attention launch covers: same
// kind and A-shape window, GQA-consistent (whole KV groups, or inside one group).
struct Piece {
  PatternKind kind = PatternKind::kDense;
  int h0 = 0, nh = 0, kv0 = 0, nkv = 0;  // local head / KV-head indices
  int a = 0, b = 0;
};

std::vector<Piece> local_pieces(const SparsePolicy& policy, int layer, int64_t n, int head0,
                                int nkv, int grp) {
  std::vector<Piece> runs;  // runs inside each KV group
  for (int g = 0; g < nkv; ++g)
    for (int i = 0; i < grp; ++i) {
      const int h = g * grp + i;
      const HeadPattern hp = policy.at(layer, head0 + h, n);
      Piece p{hp.kind, h, 1, g, 1, 0, 0};
      if (hp.kind == PatternKind::kAShape) {
        p.a = hp.a;
        p.b = hp.b;
      }
      Piece* last = runs.empty() ? nullptr : &runs.back();
      if (i > 0 && last && last->kind == p.kind && last->a == p.a && last->b == p.b)
        ++last->nh;
      else
        runs.push_back(p);
    }
  std::vector<Piece> out;  // whole-group runs of the same kind merged
  for (const Piece& r : runs) {
    Piece* last = out.empty() ? nullptr : &out.back();
    if (last && r.nh == grp && last->nh == grp * last->nkv && last->kind == r.kind &&
        last->a == r.a && last->b == r.b && last->kv0 + last->nkv == r.kv0) {
      last->nh += grp;
      ++last->nkv;
    } else {
      out.push_back(r);
    }
  }
  return out;
}

// Grow-only device buffer.
struct DevBuf {
  void* p = nullptr;
  size_t bytes = 0;
  template <class T>
  T* get(size_t count, const std::string& w) {
    const size_t need = std::max<size_t>(count, 1) * sizeof(T);
    if (need > bytes) {
      if (p) cudaFree(p);
      p = nullptr;
      bytes = 0;
      const cudaError_t e = cudaMalloc(&p, need);
      if (e != cudaSuccess)
        throw std::runtime_error(w + "allocating " + std::to_string(need >> 20) +
                                 " MiB of sparse index: " + cudaGetErrorString(e));
      bytes = need;
    }
    return static_cast<T*>(p);
  }
  ~DevBuf() {
    if (p) cudaFree(p);
  }
};

// Device index of one piece for the current layer.
struct PieceIndex {
  DevBuf sel_cols, sel_offs, sel_cnt, range_ptr, col_ptr, range_lo, range_hi, col, blocks, ws;
  VsIndexView vs;
  BlockSparseView bs;
};

}  // namespace

struct DistLayer {
  uint16_t* wqkv = nullptr;   // [q_l + 2 kvd_l][hidden]
  uint16_t* bqkv = nullptr;   // [q_l + 2 kvd_l] or null
  uint16_t* wo = nullptr;     // [hidden][q_l]
  uint16_t* wgu = nullptr;    // [2 nf][hidden]
  uint16_t* wdown = nullptr;  // [hidden][nf]
  float* attn_norm = nullptr;
  float* ffn_norm = nullptr;
};

struct CudaDistEngine::Impl {
  std::vector<void*> allocs;
  uint16_t* embed = nullptr;
  uint16_t* lm_head = nullptr;
  float* final_norm = nullptr;
  std::vector<DistLayer> layers;
  double* inv_freq = nullptr;
  cuda::GemmContext* gemm = nullptr;
  cudaStream_t st = nullptr, comm_st = nullptr;
  std::unique_ptr<comm::Communicator> tp_comm, sp_comm;
  std::vector<cudaEvent_t> sync_events;  // ordering (no timing)
  std::vector<cudaEvent_t> time_events;  // timing pool

  template <class T>
  T* alloc(size_t count, const char* what) {
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, std::max<size_t>(count * sizeof(T), 1));
    if (e != cudaSuccess)
      throw std::runtime_error(std::string("cuda dist engine: allocating ") + what + ": " +
                               cudaGetErrorString(e));
    allocs.push_back(p);
    return static_cast<T*>(p);
  }
  ~Impl() {
    if (st) cudaStreamSynchronize(st);
    if (comm_st) cudaStreamSynchronize(comm_st);
    tp_comm.reset();
    sp_comm.reset();
    for (cudaEvent_t e : sync_events) cudaEventDestroy(e);
    for (cudaEvent_t e : time_events) cudaEventDestroy(e);
    if (gemm) cuda::gemm_destroy(gemm);
    for (void* p : allocs) cudaFree(p);
    if (st) cudaStreamDestroy(st);
    if (comm_st) cudaStreamDestroy(comm_st);
  }
};

namespace {

std::string who(int rank) { return "cuda dist engine (rank " + std::to_string(rank) + "): "; }

}  // namespace

CudaDistEngine::CudaDistEngine(comm::Communicator* world, const ModelConfig& cfg, uint64_t seed,
                               DistTopology topo, CudaDistOptions opt)
    : cfg_(cfg), topo_(topo), opt_(opt), world_(world) {
  init(nullptr, seed);
}

CudaDistEngine::CudaDistEngine(comm::Communicator* world, const ModelWeights& weights,
                               DistTopology topo, CudaDistOptions opt)
    : cfg_(weights.config), topo_(topo), opt_(opt), world_(world) {
  cfg_.tie_word_embeddings = weights.lm_head.empty();  // as CudaEngine(weights)
  const WeightSource src(weights);
  init(&src, 0);
}

CudaDistEngine::CudaDistEngine(comm::Communicator* world, const std::string& model_path,
                               DistTopology topo, CudaDistOptions opt)
    : topo_(topo), opt_(opt), world_(world) {
  const WeightSource src(model_path);
  cfg_ = src.config();
  cfg_.tie_word_embeddings = !src.has_lm_head();  // as CudaEngine(load_model(path))
  init(&src, 0);
}

void CudaDistEngine::init(const WeightSource* src, uint64_t seed) {
  comm::Communicator* world = world_;
  const DistTopology topo = topo_;
  cfg_.validate();
  if (!world) throw std::runtime_error("cuda dist engine: no communicator");
  rank_ = world->rank();
  const std::string w = who(rank_);
  if (topo.tp < 1 || topo.sp < 1 || world->size() != topo.tp * topo.sp)
    throw std::runtime_error(w + "topology tp " + std::to_string(topo.tp) + " x sp " +
                             std::to_string(topo.sp) + " does not match the " +
                             std::to_string(world->size()) + " ranks of the communicator");
  if (cfg_.n_kv_heads % topo.tp != 0)
    throw std::runtime_error(w + "tp " + std::to_string(topo.tp) + " does not divide the " +
                             std::to_string(cfg_.n_kv_heads) + " KV heads");
  if (opt_.mlp_chunk < 1) throw std::runtime_error(w + "mlp_chunk must be >= 1");
  if (cudaSetDevice(opt_.device) != cudaSuccess)
    throw std::runtime_error(w + "cannot select device " + std::to_string(opt_.device));
  if (!cuda::flash_attention_supported(DType::kBF16, cfg_.head_dim))
    throw std::runtime_error(w + "no bf16 attention kernel for head_dim " +
                             std::to_string(cfg_.head_dim) + " in this build");
  const int t = tp_rank();
  nkv_ = cfg_.n_kv_heads / topo.tp;
  kv0_ = t * nkv_;
  const int64_t F = cfg_.intermediate;
  nf_ = F / topo.tp + (t < F % topo.tp ? 1 : 0);
  f0_ = t * (F / topo.tp) + std::min<int64_t>(t, F % topo.tp);

  impl_ = std::make_unique<Impl>();
  Impl& I = *impl_;
  auto ck = [&](cudaError_t e, const std::string& what) {
    if (e != cudaSuccess) throw std::runtime_error(w + what + ": " + cudaGetErrorString(e));
  };
  ck(cudaStreamCreateWithFlags(&I.st, cudaStreamNonBlocking), "creating the compute stream");
  ck(cudaStreamCreateWithFlags(&I.comm_st, cudaStreamNonBlocking), "creating the comm stream");
  if (cuda::gemm_create(&I.gemm) != Status::kOk)
    throw std::runtime_error(w + "cuBLASLt setup failed: " + cuda::last_error());
  // Sub-communicators (collective on every rank of world, in the same order).
  I.tp_comm = world->split(sp_rank(), t);
  if (!I.tp_comm) throw std::runtime_error(w + "tp split failed: " + world->last_error());
  I.sp_comm = world->split(t, sp_rank());
  if (!I.sp_comm) throw std::runtime_error(w + "sp split failed: " + world->last_error());

  const std::vector<double> inv = rope_inv_freq(cfg_.head_dim, cfg_.rope_theta, cfg_.rope_scaling);
  I.inv_freq = I.alloc<double>(inv.size(), "rope frequencies");
  ck(cudaMemcpy(I.inv_freq, inv.data(), inv.size() * sizeof(double), cudaMemcpyHostToDevice),
     "uploading rope frequencies");

  const size_t H = cfg_.hidden, Q = cfg_.q_dim(), KV = cfg_.kv_dim(), V = cfg_.vocab;
  const size_t hd = cfg_.head_dim, grp = cfg_.n_heads / cfg_.n_kv_heads;
  const size_t ql = nkv_ * grp * hd, kvl = nkv_ * hd, qkvl = ql + 2 * kvl;
  const size_t q_off = kv0_ * grp * hd, k_off = kv0_ * hd, nf = nf_, f0 = f0_;
  I.embed = I.alloc<uint16_t>(V * H, "embedding");
  I.lm_head = cfg_.tie_word_embeddings ? I.embed : I.alloc<uint16_t>(V * H, "lm_head");
  I.final_norm = I.alloc<float>(H, "final norm");
  I.layers.resize(cfg_.n_layers);
  for (DistLayer& L : I.layers) {
    L.wqkv = I.alloc<uint16_t>(qkvl * H, "wqkv slice");
    if (cfg_.qkv_bias) L.bqkv = I.alloc<uint16_t>(qkvl, "bqkv slice");
    L.wo = I.alloc<uint16_t>(H * ql, "wo slice");
    L.wgu = I.alloc<uint16_t>(2 * nf * H, "gate/up slice");
    L.wdown = I.alloc<uint16_t>(H * nf, "down slice");
    L.attn_norm = I.alloc<float>(H, "attn_norm");
    L.ffn_norm = I.alloc<float>(H, "ffn_norm");
  }
  weight_bytes_ = (V * H * (cfg_.tie_word_embeddings ? 1 : 2) +
                   cfg_.n_layers * (qkvl * H + ql * H + 3 * nf * H + (cfg_.qkv_bias ? qkvl : 0))) *
                      2 +
                  (H + cfg_.n_layers * 2 * H) * 4;

  if (src) {
    // Host fp32 weights, read window by window (an HF checkpoint converts only this rank's
    // rows / columns), rounded to bf16 as CudaEngine(weights) does.
    const ModelWeights* fw = src->full();
    if (fw && fw->layers.size() != static_cast<size_t>(cfg_.n_layers))
      throw std::runtime_error(w + "model has " + std::to_string(fw->layers.size()) +
                               " layers of weights, config says " + std::to_string(cfg_.n_layers));
    std::vector<float> f32;
    std::vector<uint16_t> b16;
    auto upload = [&](uint16_t* dst, const std::vector<float>& v, const std::string& name) {
      b16.resize(v.size());
      for (size_t i = 0; i < v.size(); ++i) b16[i] = f32_to_bf16(v[i]);
      ck(cudaMemcpy(dst, b16.data(), b16.size() * 2, cudaMemcpyHostToDevice), "uploading " + name);
    };
    // Rows [r0, r0 + nr) of a [R][C] tensor.
    auto up_rows = [&](uint16_t* dst, const std::string& name, const Tensor* t, size_t R, size_t C,
                       size_t r0, size_t nr) {
      f32.clear();
      src->rows(name, t, R, C, r0, nr, &f32);
      upload(dst, f32, name);
    };
    // Entries [off, off + n) of a 1-D tensor of length N.
    auto up_part = [&](uint16_t* dst, const std::string& name, const Tensor* t, size_t N,
                       size_t off, size_t n) {
      const std::vector<float> all = src->whole(name, t, {static_cast<int64_t>(N)});
      upload(dst, std::vector<float>(all.begin() + off, all.begin() + off + n), name);
    };
    auto upf = [&](float* dst, const std::string& name, const Tensor* t, size_t count) {
      const std::vector<float> v = src->whole(name, t, {static_cast<int64_t>(count)});
      ck(cudaMemcpy(dst, v.data(), count * 4, cudaMemcpyHostToDevice), "uploading " + name);
    };
    up_rows(I.embed, "model.embed_tokens.weight", fw ? &fw->embed : nullptr, V, H, 0, V);
    if (!cfg_.tie_word_embeddings)
      up_rows(I.lm_head, "lm_head.weight", fw ? &fw->lm_head : nullptr, V, H, 0, V);
    upf(I.final_norm, "model.norm.weight", fw ? &fw->final_norm : nullptr, H);
    for (int l = 0; l < cfg_.n_layers; ++l) {
      const LayerWeights* Lw = fw ? &fw->layers[l] : nullptr;
      DistLayer& L = I.layers[l];
      const std::string p = "model.layers." + std::to_string(l) + ".";
      const std::string a = p + "self_attn.", m = p + "mlp.";
      up_rows(L.wqkv, a + "q_proj.weight", Lw ? &Lw->wq : nullptr, Q, H, q_off, ql);
      up_rows(L.wqkv + ql * H, a + "k_proj.weight", Lw ? &Lw->wk : nullptr, KV, H, k_off, kvl);
      up_rows(L.wqkv + (ql + kvl) * H, a + "v_proj.weight", Lw ? &Lw->wv : nullptr, KV, H, k_off,
              kvl);
      if (L.bqkv) {
        up_part(L.bqkv, a + "q_proj.bias", Lw ? &Lw->bq : nullptr, Q, q_off, ql);
        up_part(L.bqkv + ql, a + "k_proj.bias", Lw ? &Lw->bk : nullptr, KV, k_off, kvl);
        up_part(L.bqkv + ql + kvl, a + "v_proj.bias", Lw ? &Lw->bv : nullptr, KV, k_off, kvl);
      }
      upload(L.wo, src->cols(a + "o_proj.weight", Lw ? &Lw->wo : nullptr, H, Q, q_off, ql),
             a + "o_proj.weight");
      up_rows(L.wgu, m + "gate_proj.weight", Lw ? &Lw->w_gate : nullptr, cfg_.intermediate, H, f0,
              nf);
      up_rows(L.wgu + nf * H, m + "up_proj.weight", Lw ? &Lw->w_up : nullptr, cfg_.intermediate, H,
              f0, nf);
      upload(L.wdown,
             src->cols(m + "down_proj.weight", Lw ? &Lw->w_down : nullptr, H, cfg_.intermediate, f0,
                       nf),
             m + "down_proj.weight");
      upf(L.attn_norm, p + "input_layernorm.weight", Lw ? &Lw->attn_norm : nullptr, H);
      upf(L.ffn_norm, p + "post_attention_layernorm.weight", Lw ? &Lw->ffn_norm : nullptr, H);
    }
    return;
  }

  // The seed sequence and element indices of CudaEngine(cfg, seed): the same fills, each
  // rank drawing only the windows of its slices.
  uint64_t s = seed * 1000003ull + 17;
  auto win = [&](uint16_t* dst, size_t rows, size_t cols, size_t src_cols, size_t off,
                 uint64_t sd) {
    ck(fill_normal_bf16_window(dst, rows, cols, src_cols, off, sd, 0.02f, I.st), "random init");
  };
  auto norm = [&](float* p, size_t n) {
    ck(fill_near_one_f32(p, n, ++s, 0.05f, I.st), "random init");
  };
  ck(fill_normal_bf16(I.embed, V * H, ++s, 0.02f, I.st), "random init");
  if (!cfg_.tie_word_embeddings) ck(fill_normal_bf16(I.lm_head, V * H, ++s, 0.02f, I.st), "init");
  norm(I.final_norm, H);
  for (DistLayer& L : I.layers) {
    // Fused [q; k; v] rows of the whole model: q rows of this rank's query heads, then its
    // k and v rows.
    const uint64_t s_qkv = ++s;
    win(L.wqkv, ql, H, H, q_off * H, s_qkv);
    win(L.wqkv + ql * H, kvl, H, H, (Q + k_off) * H, s_qkv);
    win(L.wqkv + (ql + kvl) * H, kvl, H, H, (Q + KV + k_off) * H, s_qkv);
    if (L.bqkv) {
      const uint64_t s_b = ++s;
      win(L.bqkv, 1, ql, ql, q_off, s_b);
      win(L.bqkv + ql, 1, kvl, kvl, Q + k_off, s_b);
      win(L.bqkv + ql + kvl, 1, kvl, kvl, Q + KV + k_off, s_b);
    }
    win(L.wo, H, ql, Q, q_off, ++s);  // columns of this rank's query heads
    const uint64_t s_gu = ++s;
    win(L.wgu, nf, H, H, f0 * H, s_gu);                                 // gate rows
    win(L.wgu + nf * H, nf, H, H, (cfg_.intermediate + f0) * H, s_gu);  // up rows
    win(L.wdown, H, nf, cfg_.intermediate, f0, ++s);                    // down columns
    norm(L.attn_norm, H);
    norm(L.ffn_norm, H);
  }
  ck(cudaStreamSynchronize(I.st), "random init");
}

CudaDistEngine::~CudaDistEngine() = default;

CudaDistResult CudaDistEngine::prefill(const std::vector<int>& ids, const SparsePolicy& policy,
                                       KvSink* sink, const PrefillPlan* plan,
                                       PrefillPlan* estimated) {
  const auto t_start = Clock::now();
  const std::string w = who(rank_);
  Impl& I = *impl_;
  const ModelConfig& c = cfg_;
  const int64_t n = static_cast<int64_t>(ids.size());
  try {
    check_prompt(c, ids, 0);  // ids and the model's max_position
  } catch (const std::exception& e) {
    throw std::runtime_error(w + e.what());
  }
  policy.check_model(c);
  const bool all_dense = policy.all_dense(n);
  if (!all_dense) {
    if (!cuda::sparse_attention_supported(DType::kBF16, c.head_dim))
      throw std::runtime_error(w + "no bf16 sparse attention kernel for head_dim " +
                               std::to_string(c.head_dim) + " in this build");
    if (plan && !plan->empty()) {
      PlanCheck rules;  // a given plan covers every sparse head (no estimation then)
      rules.diagonal_block = true;
      rules.prefix = w;
      check_prefill_plan(*plan, policy, c, n, rules);
    }
  }
  // Without a plan, vertical-slash / block-sparse heads are estimated globally across the
  // sp ranks (engine/cuda/sp_estimate.h).
  const bool estimate = !all_dense && (!plan || plan->empty());
  if (estimated) {
    estimated->seq_len = n;
    estimated->layers.assign(c.n_layers, std::vector<HeadPlan>(c.n_heads));
  }
  auto ck = [&](cudaError_t e, const std::string& what) {
    if (e != cudaSuccess) throw std::runtime_error(w + what + ": " + cudaGetErrorString(e));
  };
  auto ok = [&](Status s, const std::string& what, int l) {
    if (s == Status::kOk) return;
    throw std::runtime_error(w + what + " failed at layer " + std::to_string(l) + ": " +
                             to_string(s) + " (" + cuda::last_error() + ")");
  };
  auto cok = [&](Status s, comm::Communicator& cm, const std::string& what) {
    if (s != Status::kOk) throw std::runtime_error(w + what + ": " + cm.last_error());
  };
  ck(cudaSetDevice(opt_.device), "selecting the device");

  const int sp = topo_.sp, tp = topo_.tp, me = sp_rank();
  CudaDistResult R;
  R.sp_layout = plan_sequence_parallel(n, sp);
  const TokenRanges& mine = R.sp_layout[me];
  int64_t nmax = 0;
  std::vector<int64_t> rows(sp, 0);
  for (int r = 0; r < sp; ++r) {
    for (auto [b, e] : R.sp_layout[r]) rows[r] += e - b;
    if (rows[r] == 0)
      throw std::runtime_error(w + "a prompt of " + std::to_string(n) + " tokens leaves sp rank " +
                               std::to_string(r) + " of " + std::to_string(sp) + " without tokens");
    nmax = std::max(nmax, rows[r]);
  }
  const int64_t nl = rows[me];
  R.local_tokens = nl;
  {
    double mx = 0, sum = 0;
    for (int r = 0; r < sp; ++r) {
      const double tl = double(causal_tiles(R.sp_layout[r]));
      mx = std::max(mx, tl);
      sum += tl;
    }
    R.sp_imbalance = sum > 0 ? mx / (sum / sp) : 1.0;
  }

  const int64_t H = c.hidden, hd = c.head_dim, grp = c.n_heads / c.n_kv_heads;
  const int nh = nkv_ * static_cast<int>(grp);
  const int64_t ql = nh * hd, kvl = nkv_ * hd, nf = nf_;
  const int64_t chunk = std::min<int64_t>(opt_.mlp_chunk, nl);
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));

  // ---- one allocation for the prefill
  struct Buffers {
    float *x, *acc_o, *acc_lse, *part_lse, *logits;
    uint16_t *xb, *q, *slot[2], *part_o, *h, *gu, *act, *last;
    int* ids;
    int64_t* pos;
    void* gemm_ws;
  } B{};
  auto carve = [&](Carver& cv) {
    B.x = cv.take<float>(size_t(nl) * H);
    B.xb = cv.take<uint16_t>(size_t(nl) * std::max(H, ql));
    B.q = cv.take<uint16_t>(size_t(nl) * ql);
    for (auto& s : B.slot) s = cv.take<uint16_t>(2 * size_t(nmax) * kvl);
    B.part_o = cv.take<uint16_t>(size_t(nl) * ql);
    B.part_lse = cv.take<float>(size_t(nh) * nl);
    B.acc_o = cv.take<float>(size_t(nl) * ql);
    B.acc_lse = cv.take<float>(size_t(nh) * nl);
    B.h = cv.take<uint16_t>(size_t(chunk) * H);
    B.gu = cv.take<uint16_t>(size_t(chunk) * 2 * nf);
    B.act = cv.take<uint16_t>(size_t(chunk) * nf);
    B.last = cv.take<uint16_t>(H);
    B.logits = cv.take<float>(c.vocab);
    B.ids = cv.take<int>(nl);
    B.pos = cv.take<int64_t>(nl);
    B.gemm_ws = cv.take<char>(cuda::gemm_workspace_size());
  };
  Carver sizing;
  carve(sizing);
  void* base = nullptr;
  ck(cudaMalloc(&base, sizing.used),
     "allocating the prefill workspace of " + std::to_string(sizing.used >> 20) + " MiB");
  struct Free {
    void* p;
    ~Free() { cudaFree(p); }
  } free_base{base};
  Carver cv;
  cv.base = static_cast<char*>(base);
  carve(cv);
  {
    size_t fr = 0, tot = 0;
    cudaMemGetInfo(&fr, &tot);
    R.peak_device_bytes = tot - fr;
  }
  std::vector<int> ids_l;
  std::vector<int64_t> pos_l;
  for (auto [b, e] : mine)
    for (int64_t p = b; p < e; ++p) {
      ids_l.push_back(ids[p]);
      pos_l.push_back(p);
    }
  cudaStream_t st = I.st, cst = I.comm_st;
  ck(cudaMemcpyAsync(B.ids, ids_l.data(), nl * 4, cudaMemcpyHostToDevice, st), "uploading ids");
  ck(cudaMemcpyAsync(B.pos, pos_l.data(), nl * 8, cudaMemcpyHostToDevice, st),
     "uploading positions");

  // Events: ordering between the streams, and the timing pool.
  auto sync_event = [&](size_t i) {
    while (I.sync_events.size() <= i) {
      cudaEvent_t e;
      ck(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "creating events");
      I.sync_events.push_back(e);
    }
    return I.sync_events[i];
  };
  size_t n_time = 0;
  struct Span {
    int kind;  // 0 ring compute, 1 ring wait, 2 all-reduce, 3 ring transfer (comm stream)
    size_t a, b;
  };
  std::vector<Span> spans;
  auto time_mark = [&](cudaStream_t on = nullptr) -> size_t {
    while (I.time_events.size() <= n_time) {
      cudaEvent_t e;
      ck(cudaEventCreate(&e), "creating timing events");
      I.time_events.push_back(e);
    }
    ck(cudaEventRecord(I.time_events[n_time], on ? on : st), "timing");
    return n_time++;
  };

  auto gemm = [&](const void* x, const void* wt, const void* bias, void* y, DType yt, int64_t m,
                  int64_t in, int64_t out, bool acc, int l) {
    ok(cuda::gemm_xwt(I.gemm, x, wt, DType::kBF16, bias, y, yt, m, in, out, acc, B.gemm_ws,
                      cuda::gemm_workspace_size(), st),
       "gemm", l);
  };
  auto all_reduce_x = [&](int l) {
    if (tp == 1) return;
    const size_t a = opt_.timing ? time_mark() : 0;
    cok(I.tp_comm->all_reduce(B.x, B.x, size_t(nl) * H, DType::kF32, comm::ReduceOp::kSum, st),
        *I.tp_comm, "tp all-reduce at layer " + std::to_string(l));
    if (opt_.timing) spans.push_back({2, a, time_mark()});
  };
  const bool zero_partial = tp > 1 && tp_rank() != 0;  // row-parallel: rank 0 adds x

  ok(cuda::embedding(I.embed, DType::kBF16, c.vocab, H, B.ids, nl, B.x, DType::kF32, st),
     "embedding", -1);
  std::vector<int> kv_heads;
  for (int h = 0; h < nkv_; ++h) kv_heads.push_back(kv0_ + h);
  const int next = (me + 1) % sp, prev = (me + sp - 1) % sp;
  // Causal KV skipping (opt_.skip_causal_kv): the shard of src, sent by `sender`, still
  // reaches ranks sender+1 .. src-1; none of them reads a key after its last query row, so
  // only the rows of src up to the largest of those positions travel (a prefix of the
  // shard's rows: ranges ascend). Every rank clips its key ranges to its own last query
  // row, so no kernel reads the rows that were not sent. At sp 2 this drops 1/4 of the
  // ring's bytes (zigzag: rank 1 never needs rank 0's second chunk).
  std::vector<int64_t> qlast_pos(sp, -1);
  for (int r = 0; r < sp; ++r)
    for (auto [b, e] : R.sp_layout[r]) qlast_pos[r] = std::max(qlast_pos[r], e - 1);
  auto sent_rows = [&](int sender, int src) -> int64_t {
    if (!opt_.skip_causal_kv) return rows[src];
    int64_t lim = -1;
    for (int r = (sender + 1) % sp; r != src; r = (r + 1) % sp) lim = std::max(lim, qlast_pos[r]);
    int64_t cnt = 0;
    for (auto [b, e] : R.sp_layout[src]) cnt += std::max<int64_t>(0, std::min(e, lim + 1) - b);
    return cnt;
  };
  const int64_t key_end = opt_.skip_causal_kv ? qlast_pos[me] + 1 : n;  // clip of key ranges
  size_t n_sync = 0;
  const int64_t nb = num_blocks(n);
  std::vector<std::unique_ptr<PieceIndex>> pidx;
  std::unique_ptr<SpEstimator> est;
  if (estimate) est = std::make_unique<SpEstimator>(I.sp_comm.get(), R.sp_layout, me, n, st, w);
  DevBuf qlast_buf;  // the globally last min(64, n) query rows of this rank's heads

  for (int l = 0; l < c.n_layers; ++l) {
    const DistLayer& L = I.layers[l];
    ok(cuda::rmsnorm(B.x, DType::kF32, H, L.attn_norm, DType::kF32, B.xb, DType::kBF16, H, nl, H,
                     c.rms_eps, st),
       "rmsnorm", l);
    uint16_t* k0 = B.slot[0];
    uint16_t* v0 = B.slot[0] + size_t(nmax) * kvl;
    gemm(B.xb, L.wqkv, L.bqkv, B.q, DType::kBF16, nl, H, ql, false, l);
    gemm(B.xb, L.wqkv + ql * H, L.bqkv ? L.bqkv + ql : nullptr, k0, DType::kBF16, nl, H, kvl, false,
         l);
    gemm(B.xb, L.wqkv + (ql + kvl) * H, L.bqkv ? L.bqkv + ql + kvl : nullptr, v0, DType::kBF16, nl,
         H, kvl, false, l);
    ok(cuda::rope(B.q, DType::kBF16, nl, nh, hd, ql, hd, B.pos, 0, I.inv_freq, c.rope_style, st),
       "rope q", l);
    ok(cuda::rope(k0, DType::kBF16, nl, nkv_, hd, kvl, hd, B.pos, 0, I.inv_freq, c.rope_style, st),
       "rope k", l);
    if (sink) {
      KvSlice s;
      s.layer = l;
      s.kv_heads = kv_heads;
      s.tokens = mine;
      s.head_dim = static_cast<int>(hd);
      s.dtype = DType::kBF16;
      s.k = k0;
      s.v = v0;
      s.on_device = true;
      s.stream = st;
      sink->put(s);
      R.kv_bytes_exported += 2 * s.bytes_per_tensor();
    }

    // ---- this layer's launches and their device indices (from the plan, global positions)
    const std::vector<Piece> pieces =
        all_dense
            ? std::vector<Piece>{{PatternKind::kDense, 0, nh, 0, nkv_, 0, 0}}
            : local_pieces(policy, l, n, kv0_ * static_cast<int>(grp), nkv_, static_cast<int>(grp));
    while (pidx.size() < pieces.size()) pidx.push_back(std::make_unique<PieceIndex>());
    bool qlast_ready = false;
    if (estimated)
      for (const Piece& p : pieces)
        for (int i = 0; i < p.nh; ++i)
          estimated->layers[l][kv0_ * static_cast<int>(grp) + p.h0 + i].kind = p.kind;
    for (size_t pi = 0; pi < pieces.size(); ++pi) {
      const Piece& p = pieces[pi];
      PieceIndex& X = *pidx[pi].get();
      const int head0 = kv0_ * static_cast<int>(grp) + p.h0;  // global head of local p.h0
      if (p.kind == PatternKind::kVerticalSlash) {
        cuda::index::VsSelectionsDevice sel;
        sel.seq_len = n;
        sel.num_heads = p.nh;
        int ccap = 1, ocap = 1;
        if (estimate) {
          std::vector<int> vb(p.nh), sb(p.nh);
          for (int i = 0; i < p.nh; ++i) {
            const HeadPattern hp = policy.at(l, head0 + i, n);
            vb[i] = clamp_vertical_budget(hp.a, n);
            sb[i] = clamp_slash_budget(hp.b, n);
            ccap = std::max(ccap, vb[i]);
            ocap = std::max(ocap, sb[i]);
          }
          sel.columns = X.sel_cols.get<int>(size_t(p.nh) * ccap, w);
          sel.offsets = X.sel_offs.get<int>(size_t(p.nh) * ocap, w);
          sel.n_columns = X.sel_cnt.get<int>(2 * size_t(p.nh), w);
          sel.n_offsets = sel.n_columns + p.nh;
          sel.col_capacity = ccap;
          sel.off_capacity = ocap;
          uint16_t* qlast = qlast_buf.get<uint16_t>(size_t(est->n_last()) * ql, w);
          if (!qlast_ready) est->gather_last_rows(B.q, ql, qlast);
          qlast_ready = true;
          est->vertical_slash(qlast + size_t(p.h0) * hd, ql, k0 + size_t(p.kv0) * hd, kvl, p.nh,
                              p.nkv, static_cast<int>(hd), scale, vb.data(), sb.data(), sel, l);
          if (estimated) {  // download this rank's selections
            std::vector<int> cnt(2 * p.nh), cols(size_t(p.nh) * ccap), offs(size_t(p.nh) * ocap);
            ck(cudaMemcpyAsync(cnt.data(), sel.n_columns, cnt.size() * 4, cudaMemcpyDeviceToHost,
                               st),
               "d2h");
            ck(cudaMemcpyAsync(cols.data(), sel.columns, cols.size() * 4, cudaMemcpyDeviceToHost,
                               st),
               "d2h");
            ck(cudaMemcpyAsync(offs.data(), sel.offsets, offs.size() * 4, cudaMemcpyDeviceToHost,
                               st),
               "d2h");
            ck(cudaStreamSynchronize(st), "downloading selections");
            for (int i = 0; i < p.nh; ++i) {
              HeadPlan& hp = estimated->layers[l][head0 + i];
              hp.vs.columns.assign(cols.begin() + size_t(i) * ccap,
                                   cols.begin() + size_t(i) * ccap + cnt[i]);
              hp.vs.offsets.assign(offs.begin() + size_t(i) * ocap,
                                   offs.begin() + size_t(i) * ocap + cnt[p.nh + i]);
            }
          }
        } else {
          for (int i = 0; i < p.nh; ++i) {
            const VsSelection& v = plan->layers[l][head0 + i].vs;
            ccap = std::max<int>(ccap, v.columns.size());
            ocap = std::max<int>(ocap, v.offsets.size());
          }
          std::vector<int> hc(size_t(p.nh) * ccap, 0), ho(size_t(p.nh) * ocap, 0), cnt(2 * p.nh);
          for (int i = 0; i < p.nh; ++i) {
            const VsSelection& v = plan->layers[l][head0 + i].vs;
            std::copy(v.columns.begin(), v.columns.end(), hc.begin() + size_t(i) * ccap);
            std::copy(v.offsets.begin(), v.offsets.end(), ho.begin() + size_t(i) * ocap);
            cnt[i] = static_cast<int>(v.columns.size());
            cnt[p.nh + i] = static_cast<int>(v.offsets.size());
          }
          sel.columns = X.sel_cols.get<int>(hc.size(), w);
          sel.offsets = X.sel_offs.get<int>(ho.size(), w);
          sel.n_columns = X.sel_cnt.get<int>(cnt.size(), w);
          sel.n_offsets = sel.n_columns + p.nh;
          sel.col_capacity = ccap;
          sel.off_capacity = ocap;
          ck(cudaMemcpyAsync(sel.columns, hc.data(), hc.size() * 4, cudaMemcpyHostToDevice, st),
             "h2d");
          ck(cudaMemcpyAsync(sel.offsets, ho.data(), ho.size() * 4, cudaMemcpyHostToDevice, st),
             "h2d");
          ck(cudaMemcpyAsync(sel.n_columns, cnt.data(), cnt.size() * 4, cudaMemcpyHostToDevice, st),
             "h2d");
        }
        const size_t wsb = cuda::index::vs_index_workspace_size(p.nh, n, ocap);
        void* ws = X.ws.get<char>(wsb, w);
        const size_t np = size_t(p.nh) * nb + 1;
        int64_t* rp = X.range_ptr.get<int64_t>(np, w);
        int64_t* cp = X.col_ptr.get<int64_t>(np, w);
        ok(cuda::index::vs_index_count(sel, rp, cp, ws, wsb, st), "vs_index_count", l);
        int64_t tot[2] = {0, 0};
        ck(cudaMemcpyAsync(&tot[0], rp + np - 1, 8, cudaMemcpyDeviceToHost, st), "d2h");
        ck(cudaMemcpyAsync(&tot[1], cp + np - 1, 8, cudaMemcpyDeviceToHost, st), "d2h");
        ck(cudaStreamSynchronize(st), "reading the index size");
        int* lo = X.range_lo.get<int>(tot[0], w);
        int* hi = X.range_hi.get<int>(tot[0], w);
        int* col = tot[1] ? X.col.get<int>(tot[1], w) : nullptr;
        ok(cuda::index::vs_index_fill(sel, rp, cp, lo, hi, col, ws, wsb, st), "vs_index_fill", l);
        X.vs = VsIndexView{};
        X.vs.seq_len = n;
        X.vs.nblocks = nb;
        X.vs.range_ptr = rp;
        X.vs.range_lo = lo;
        X.vs.range_hi = hi;
        X.vs.col_ptr = cp;
        X.vs.col = col;
      } else if (p.kind == PatternKind::kBlockSparse) {
        int k = 1;
        int* d = nullptr;
        if (estimate) {
          std::vector<int> topk(p.nh);
          for (int i = 0; i < p.nh; ++i) {
            topk[i] = policy.at(l, head0 + i, n).a;
            k = std::max(k, topk[i]);
          }
          d = X.blocks.get<int>(size_t(p.nh) * nb * k, w);
          est->block_sparse(B.q + size_t(p.h0) * hd, ql, k0 + size_t(p.kv0) * hd, kvl, p.nh, p.nkv,
                            static_cast<int>(hd), scale, topk.data(), d, k, l);
          if (estimated) {
            std::vector<int> hb(size_t(p.nh) * nb * k);
            ck(cudaMemcpyAsync(hb.data(), d, hb.size() * 4, cudaMemcpyDeviceToHost, st), "d2h");
            ck(cudaStreamSynchronize(st), "downloading block lists");
            for (int i = 0; i < p.nh; ++i) {
              HeadPlan& hp = estimated->layers[l][head0 + i];
              hp.topk = topk[i];
              hp.blocks.assign(size_t(nb) * topk[i], -1);
              for (int64_t b = 0; b < nb; ++b)
                for (int j = 0; j < topk[i]; ++j)
                  hp.blocks[b * topk[i] + j] = hb[(size_t(i) * nb + b) * k + j];
            }
          }
        } else {
          for (int i = 0; i < p.nh; ++i) k = std::max(k, plan->layers[l][head0 + i].topk);
          std::vector<int> hb(size_t(p.nh) * nb * k, -1);
          for (int i = 0; i < p.nh; ++i) {
            const HeadPlan& hp = plan->layers[l][head0 + i];
            for (int64_t b = 0; b < nb; ++b)
              for (int j = 0; j < hp.topk; ++j)
                hb[(size_t(i) * nb + b) * k + j] = hp.blocks[b * hp.topk + j];
          }
          d = X.blocks.get<int>(hb.size(), w);
          ck(cudaMemcpyAsync(d, hb.data(), hb.size() * 4, cudaMemcpyHostToDevice, st), "h2d");
        }
        X.bs = BlockSparseView{};
        X.bs.seq_len = n;
        X.bs.nblocks = nb;
        X.bs.k = k;
        X.bs.blocks = d;
      }
    }

    // ---- ring: step s computes against the shard of sp rank (me - s) in slot s % 2
    ok(cuda::reset_attention_state(B.acc_o, B.acc_lse, ql, hd, nl, static_cast<int>(nl), nh,
                                   static_cast<int>(hd), st),
       "reset attention state", l);
    for (int s = 0; s < sp; ++s) {
      const int src = (me - s + sp) % sp;
      uint16_t* ks = B.slot[s % 2];
      uint16_t* vs = ks + size_t(nmax) * kvl;
      size_t ev_recv = 0;
      if (s + 1 < sp) {
        // The comm stream may send this slot and overwrite the other one once the compute
        // stream has finished everything issued so far (RoPE / previous step's attention).
        const int incoming = (me - s - 1 + sp) % sp;
        uint16_t* kn = B.slot[(s + 1) % 2];
        uint16_t* vn = kn + size_t(nmax) * kvl;
        cudaEvent_t e = sync_event(n_sync++ % 64);
        ck(cudaEventRecord(e, st), "ring event");
        ck(cudaStreamWaitEvent(cst, e, 0), "ring event");
        comm::Communicator& sc = *I.sp_comm;
        const size_t cnt_out = size_t(sent_rows(me, src)) * kvl,
                     cnt_in = size_t(sent_rows(prev, incoming)) * kvl;
        const size_t c0 = opt_.timing ? time_mark(cst) : 0;
        cok(sc.group_start(), sc, "ring group start");
        if (cnt_out) {
          cok(sc.send(ks, cnt_out, DType::kBF16, next, cst), sc, "ring send K");
          cok(sc.send(vs, cnt_out, DType::kBF16, next, cst), sc, "ring send V");
        }
        if (cnt_in) {
          cok(sc.recv(kn, cnt_in, DType::kBF16, prev, cst), sc, "ring recv K");
          cok(sc.recv(vn, cnt_in, DType::kBF16, prev, cst), sc, "ring recv V");
        }
        cok(sc.group_end(), sc, "ring group end at layer " + std::to_string(l));
        if (opt_.timing) spans.push_back({3, c0, time_mark(cst)});
        ev_recv = n_sync++ % 64;
        ck(cudaEventRecord(sync_event(ev_recv), cst), "ring event");
        R.ring_bytes_sent += int64_t(2 * cnt_out * 2);
      }
      const size_t t0 = opt_.timing ? time_mark() : 0;
      int64_t qoff = 0;
      for (auto [qb, qe] : mine) {
        int64_t koff = 0;
        for (auto [kb, ke_full] : R.sp_layout[src]) {
          const int64_t ke = std::min(ke_full, key_end);
          if (kb <= qe - 1 && kb < ke) {  // some key visible to some row
            AttentionParams ap;
            ap.q_row_stride = ap.o_row_stride = ql;
            ap.k_row_stride = ap.v_row_stride = kvl;
            ap.q_head_stride = ap.k_head_stride = ap.v_head_stride = ap.o_head_stride = hd;
            ap.lse_head_stride = nl;
            ap.n_q = static_cast<int>(qe - qb);
            ap.n_k = static_cast<int>(ke - kb);
            ap.head_dim = static_cast<int>(hd);
            ap.q_pos0 = qb;
            ap.k_pos0 = kb;
            ap.causal = true;
            ap.scale = scale;
            ap.dtype = DType::kBF16;
            for (size_t pi = 0; pi < pieces.size(); ++pi) {
              const Piece& p = pieces[pi];
              ap.q = B.q + size_t(qoff) * ql + size_t(p.h0) * hd;
              ap.k = ks + size_t(koff) * kvl + size_t(p.kv0) * hd;
              ap.v = vs + size_t(koff) * kvl + size_t(p.kv0) * hd;
              ap.o = B.part_o + size_t(qoff) * ql + size_t(p.h0) * hd;
              ap.lse = B.part_lse + size_t(p.h0) * nl + qoff;
              ap.num_heads = p.nh;
              ap.num_kv_heads = p.nkv;
              switch (p.kind) {
                case PatternKind::kDense:
                  ok(cuda::flash_attention_fwd(ap, st), "ring attention", l);
                  break;
                case PatternKind::kAShape:
                  ok(cuda::ashape_attention_fwd(ap, p.a, p.b, st), "ring A-shape attention", l);
                  break;
                case PatternKind::kVerticalSlash:
                  ok(cuda::vs_attention_fwd(ap, pidx[pi]->vs, 0, st),
                     "ring vertical-slash attention", l);
                  break;
                case PatternKind::kBlockSparse:
                  ok(cuda::block_sparse_attention_fwd(ap, pidx[pi]->bs, 0, st),
                     "ring block-sparse attention", l);
                  break;
              }
            }
            ap.o = B.part_o + size_t(qoff) * ql;
            ap.lse = B.part_lse + qoff;
            cuda::MergeStatesParams mp;
            mp.o_a = B.acc_o + size_t(qoff) * ql;
            mp.lse_a = B.acc_lse + qoff;
            mp.o_b = ap.o;
            mp.lse_b = ap.lse;
            mp.b_dtype = DType::kBF16;
            mp.out_bf16 = B.xb + size_t(qoff) * ql;  // the final merge leaves Wo's input
            mp.a_row_stride = mp.b_row_stride = mp.out_row_stride = ql;
            mp.a_head_stride = mp.b_head_stride = mp.out_head_stride = hd;
            mp.lse_a_head_stride = mp.lse_b_head_stride = nl;
            mp.n = ap.n_q;
            mp.num_heads = nh;
            mp.head_dim = static_cast<int>(hd);
            ok(cuda::merge_attention_states(mp, st), "merge", l);
            if (all_dense) R.attention_tiles += pair_tiles(qb, qe, kb, ke) * nh;
          }
          koff += ke_full - kb;
        }
        qoff += qe - qb;
      }
      if (s + 1 < sp) {
        const size_t t1 = opt_.timing ? time_mark() : 0;
        ck(cudaStreamWaitEvent(st, sync_event(ev_recv), 0), "ring wait");
        if (opt_.timing) {
          spans.push_back({0, t0, t1});
          spans.push_back({1, t1, time_mark()});
        }
      } else if (opt_.timing) {
        spans.push_back({0, t0, time_mark()});
      }
    }

    // x += attn Wo^T (row-parallel: the partial sums meet in one all-reduce).
    if (zero_partial) ck(cudaMemsetAsync(B.x, 0, size_t(nl) * H * 4, st), "zero");
    gemm(B.xb, L.wo, nullptr, B.x, DType::kF32, nl, ql, H, true, l);
    all_reduce_x(l);
    for (int64_t t0 = 0; t0 < nl; t0 += chunk) {
      const int64_t m = std::min(chunk, nl - t0);
      float* xr = B.x + size_t(t0) * H;
      ok(cuda::rmsnorm(xr, DType::kF32, H, L.ffn_norm, DType::kF32, B.h, DType::kBF16, H, m, H,
                       c.rms_eps, st),
         "rmsnorm", l);
      if (zero_partial) ck(cudaMemsetAsync(xr, 0, size_t(m) * H * 4, st), "zero");
      gemm(B.h, L.wgu, nullptr, B.gu, DType::kBF16, m, H, 2 * nf, false, l);
      ok(cuda::swiglu(B.gu, B.gu + nf, DType::kBF16, 2 * nf, B.act, DType::kBF16, nf, m, nf, st),
         "swiglu", l);
      gemm(B.act, L.wdown, nullptr, xr, DType::kF32, m, nf, H, true, l);
    }
    all_reduce_x(l);
  }

  // Logits of position n - 1, computed by its sp owner, broadcast from its tp rank 0.
  int owner = -1;
  int64_t owner_row = 0;
  for (int r = 0; r < sp && owner < 0; ++r) {
    int64_t off = 0;
    for (auto [b, e] : R.sp_layout[r]) {
      if (b <= n - 1 && n - 1 < e) {
        owner = r;
        owner_row = off + (n - 1 - b);
      }
      off += e - b;
    }
  }
  if (owner == me) {
    ok(cuda::rmsnorm(B.x + size_t(owner_row) * H, DType::kF32, H, I.final_norm, DType::kF32, B.last,
                     DType::kBF16, H, 1, H, c.rms_eps, st),
       "final rmsnorm", -1);
    gemm(B.last, I.lm_head, nullptr, B.logits, DType::kF32, 1, H, c.vocab, false, -1);
  }
  if (sp * tp > 1)
    cok(world_->broadcast(B.logits, c.vocab, DType::kF32, owner * tp, st), *world_,
        "logits broadcast");
  R.logits.resize(c.vocab);
  ck(cudaMemcpyAsync(R.logits.data(), B.logits, size_t(c.vocab) * 4, cudaMemcpyDeviceToHost, st),
     "downloading logits");
  cok(world_->synchronize(st), *world_, "prefill");  // bounded wait
  cok(I.sp_comm->synchronize(cst), *I.sp_comm, "ring");
  if (sink) sink->finish();
  for (const Span& sp_ : spans) {
    float ms = 0;
    ck(cudaEventElapsedTime(&ms, I.time_events[sp_.a], I.time_events[sp_.b]), "timing");
    double* to[4] = {&R.ring_compute_ms, &R.ring_wait_ms, &R.allreduce_ms, &R.ring_transfer_ms};
    *to[sp_.kind] += ms;
  }
  if (est) R.estimate_bytes_sent = est->comm_bytes();
  R.total_ms = std::chrono::duration<double, std::milli>(Clock::now() - t_start).count();
  return R;
}

}  // namespace mprefill::gpu
