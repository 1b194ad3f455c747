// CudaBackend set-up: topology checks, streams and communicators, and the weights of this
// rank's slice (host fp32 -> bf16, read window by window, or device random).
#include <algorithm>

#include "engine/cuda/backend_impl.h"
#include "engine/cuda/device_init.h"
#include "kernels/cuda/flash/flash.h"

namespace mprefill::gpu {

bool cuda_available() { return cuda::has_gpu(); }

CudaBackend::Impl::~Impl() {
  if (st) cudaStreamSynchronize(st);
  if (comm_st) cudaStreamSynchronize(comm_st);
  tp_comm.reset();
  sp_comm.reset();
  for (cudaEvent_t e : events) cudaEventDestroy(e);
  for (cudaEvent_t e : sync_events) cudaEventDestroy(e);
  for (cudaEvent_t e : time_events) cudaEventDestroy(e);
  if (gemm) cuda::gemm_destroy(gemm);
  if (pinned) cudaFreeHost(pinned);
  for (void* p : allocs) cudaFree(p);
  if (st) cudaStreamDestroy(st);
  if (comm_st) cudaStreamDestroy(comm_st);
}

CudaBackend::CudaBackend(comm::Communicator* world, const ModelConfig& cfg, uint64_t seed,
                         DistTopology topo, CudaOptions opt)
    : cfg_(cfg), topo_(topo), opt_(opt), world_(world) {
  init(nullptr, seed);
}

CudaBackend::CudaBackend(comm::Communicator* world, const ModelWeights& weights, DistTopology topo,
                         CudaOptions opt)
    : cfg_(weights.config), topo_(topo), opt_(opt), world_(world) {
  cfg_.tie_word_embeddings = weights.lm_head.empty();  // the host model has no lm_head then
  const WeightSource src(weights);
  init(&src, 0);
}

CudaBackend::CudaBackend(comm::Communicator* world, const std::string& model_path,
                         DistTopology topo, CudaOptions opt)
    : topo_(topo), opt_(opt), world_(world) {
  const WeightSource src(model_path);
  cfg_ = src.config();
  cfg_.tie_word_embeddings = !src.has_lm_head();
  init(&src, 0);
}

CudaBackend::~CudaBackend() = default;

cudaStream_t CudaBackend::stream() const { return impl_->st; }

namespace {

std::string who_of(const DistTopology& t, int rank) {
  if (t.tp * t.sp == 1) return "cuda backend: ";
  return "cuda backend (rank " + std::to_string(rank) + " of tp " + std::to_string(t.tp) +
         " x sp " + std::to_string(t.sp) + "): ";
}

// Uploads this rank's slices of host weights (an HF checkpoint converts only its rows /
// columns), rounded to bf16.
void upload_slices(CudaBackend::Impl& I, const ModelConfig& cfg, const WeightSource& src) {
  const Fail& f = I.fail;
  const Geometry& g = I.geo;
  const size_t H = cfg.hidden, Q = cfg.q_dim(), KV = cfg.kv_dim(), V = cfg.vocab;
  const size_t hd = cfg.head_dim, ql = g.ql, kvl = g.kvl;
  const size_t q_off = size_t(g.head0) * hd, k_off = size_t(g.kv0) * hd, nf = g.nf, f0 = g.f0;
  const ModelWeights* fw = src.full();
  if (fw && fw->layers.size() != static_cast<size_t>(cfg.n_layers))
    f.raise("model has " + std::to_string(fw->layers.size()) + " layers of weights, config says " +
            std::to_string(cfg.n_layers));
  std::vector<float> f32;
  std::vector<uint16_t> b16;
  auto upload = [&](uint16_t* dst, const std::vector<float>& v, const std::string& name) {
    b16.resize(v.size());
    for (size_t i = 0; i < v.size(); ++i) b16[i] = f32_to_bf16(v[i]);
    f.ck(cudaMemcpy(dst, b16.data(), b16.size() * 2, cudaMemcpyHostToDevice), "uploading " + name);
  };
  // Rows [r0, r0 + nr) of a [R][C] tensor.
  auto up_rows = [&](uint16_t* dst, const std::string& name, const Tensor* t, size_t R, size_t C,
                     size_t r0, size_t nr) {
    f32.clear();
    src.rows(name, t, R, C, r0, nr, &f32);
    upload(dst, f32, name);
  };
  // Entries [off, off + n) of a 1-D tensor of length N.
  auto up_part = [&](uint16_t* dst, const std::string& name, const Tensor* t, size_t N, size_t off,
                     size_t n) {
    const std::vector<float> all = src.whole(name, t, {static_cast<int64_t>(N)});
    upload(dst, std::vector<float>(all.begin() + off, all.begin() + off + n), name);
  };
  auto upf = [&](float* dst, const std::string& name, const Tensor* t, size_t count) {
    const std::vector<float> v = src.whole(name, t, {static_cast<int64_t>(count)});
    f.ck(cudaMemcpy(dst, v.data(), count * 4, cudaMemcpyHostToDevice), "uploading " + name);
  };
  up_rows(I.embed, "model.embed_tokens.weight", fw ? &fw->embed : nullptr, V, H, 0, V);
  if (!cfg.tie_word_embeddings)
    up_rows(I.lm_head, "lm_head.weight", fw ? &fw->lm_head : nullptr, V, H, 0, V);
  upf(I.final_norm, "model.norm.weight", fw ? &fw->final_norm : nullptr, H);
  for (int l = 0; l < cfg.n_layers; ++l) {
    const LayerWeights* Lw = fw ? &fw->layers[l] : nullptr;
    DevLayer& L = I.layers[l];
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
    upload(L.wo, src.cols(a + "o_proj.weight", Lw ? &Lw->wo : nullptr, H, Q, q_off, ql),
           a + "o_proj.weight");
    up_rows(L.wgu, m + "gate_proj.weight", Lw ? &Lw->w_gate : nullptr, cfg.intermediate, H, f0, nf);
    up_rows(L.wgu + nf * H, m + "up_proj.weight", Lw ? &Lw->w_up : nullptr, cfg.intermediate, H, f0,
            nf);
    upload(
        L.wdown,
        src.cols(m + "down_proj.weight", Lw ? &Lw->w_down : nullptr, H, cfg.intermediate, f0, nf),
        m + "down_proj.weight");
    upf(L.attn_norm, p + "input_layernorm.weight", Lw ? &Lw->attn_norm : nullptr, H);
    upf(L.ffn_norm, p + "post_attention_layernorm.weight", Lw ? &Lw->ffn_norm : nullptr, H);
  }
}

// Random weights: one seed sequence and element indexing for every topology, each rank
// drawing only the windows of its slices (at tp 1 the windows are the whole tensors).
void random_slices(CudaBackend::Impl& I, const ModelConfig& cfg, uint64_t seed) {
  const Fail& f = I.fail;
  const Geometry& g = I.geo;
  const size_t H = cfg.hidden, Q = cfg.q_dim(), KV = cfg.kv_dim(), V = cfg.vocab;
  const size_t hd = cfg.head_dim, ql = g.ql, kvl = g.kvl;
  const size_t q_off = size_t(g.head0) * hd, k_off = size_t(g.kv0) * hd, nf = g.nf, f0 = g.f0;
  uint64_t s = seed * 1000003ull + 17;
  auto win = [&](uint16_t* dst, size_t rows, size_t cols, size_t src_cols, size_t off,
                 uint64_t sd) {
    f.ck(fill_normal_bf16_window(dst, rows, cols, src_cols, off, sd, 0.02f, I.st), "random init");
  };
  auto norm = [&](float* p, size_t n) {
    f.ck(fill_near_one_f32(p, n, ++s, 0.05f, I.st), "random init");
  };
  f.ck(fill_normal_bf16(I.embed, V * H, ++s, 0.02f, I.st), "random init");
  if (!cfg.tie_word_embeddings)
    f.ck(fill_normal_bf16(I.lm_head, V * H, ++s, 0.02f, I.st), "random init");
  norm(I.final_norm, H);
  for (DevLayer& L : I.layers) {
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
    win(L.wgu, nf, H, H, f0 * H, s_gu);                                // gate rows
    win(L.wgu + nf * H, nf, H, H, (cfg.intermediate + f0) * H, s_gu);  // up rows
    win(L.wdown, H, nf, cfg.intermediate, f0, ++s);                    // down columns
    norm(L.attn_norm, H);
    norm(L.ffn_norm, H);
  }
  f.ck(cudaStreamSynchronize(I.st), "random init");
}

}  // namespace

void CudaBackend::init(const WeightSource* src, uint64_t seed) {
  cfg_.validate();
  const DistTopology topo = topo_;
  const int group = topo.tp * topo.sp;
  rank_ = world_ ? world_->rank() : 0;
  const Fail f{who_of(topo, rank_)};
  if (topo.tp < 1 || topo.sp < 1) f.raise("topology needs tp >= 1 and sp >= 1");
  if (!world_ && group != 1)
    f.raise("tp " + std::to_string(topo.tp) + " x sp " + std::to_string(topo.sp) +
            " needs a communicator of " + std::to_string(group) + " ranks");
  if (world_ && world_->size() != group)
    f.raise("topology tp " + std::to_string(topo.tp) + " x sp " + std::to_string(topo.sp) +
            " does not match the " + std::to_string(world_->size()) + " ranks of the communicator");
  if (cfg_.n_kv_heads % topo.tp != 0)
    f.raise("tp " + std::to_string(topo.tp) + " does not divide the " +
            std::to_string(cfg_.n_kv_heads) + " KV heads");
  if (opt_.mlp_chunk < 1) f.raise("mlp_chunk must be >= 1");
  if (!cuda::has_gpu()) f.raise("no CUDA device is visible");
  f.ck(cudaSetDevice(opt_.device), "selecting device " + std::to_string(opt_.device));
  if (!cuda::flash_attention_supported(DType::kBF16, cfg_.head_dim))
    f.raise("no bf16 attention kernel for head_dim " + std::to_string(cfg_.head_dim) +
            " in this build");
  const int t = tp_rank(), grp = cfg_.n_heads / cfg_.n_kv_heads;
  nkv_ = cfg_.n_kv_heads / topo.tp;
  kv0_ = t * nkv_;
  const int64_t F = cfg_.intermediate;
  nf_ = F / topo.tp + (t < F % topo.tp ? 1 : 0);
  f0_ = t * (F / topo.tp) + std::min<int64_t>(t, F % topo.tp);

  impl_ = std::make_unique<Impl>();
  Impl& I = *impl_;
  I.fail = f;
  Geometry& g = I.geo;
  g.tp = topo.tp;
  g.sp = topo.sp;
  g.tp_rank = t;
  g.sp_rank = sp_rank();
  g.kv0 = kv0_;
  g.nkv = nkv_;
  g.head0 = kv0_ * grp;
  g.nh = nkv_ * grp;
  g.f0 = f0_;
  g.nf = nf_;
  g.ql = int64_t{g.nh} * cfg_.head_dim;
  g.kvl = int64_t{g.nkv} * cfg_.head_dim;

  f.ck(cudaStreamCreateWithFlags(&I.st, cudaStreamNonBlocking), "creating the compute stream");
  if (topo.sp > 1)
    f.ck(cudaStreamCreateWithFlags(&I.comm_st, cudaStreamNonBlocking), "creating the comm stream");
  f.ok(cuda::gemm_create(&I.gemm), "cuBLASLt setup");
  f.ck(cudaMallocHost(&I.pinned, 4 * sizeof(int64_t)), "pinned host words");
  // Sub-communicators (collective on every rank of world, in the same order); none at 1.
  if (topo.tp > 1) {
    I.tp_comm = world_->split(g.sp_rank, t);
    f.cok(I.tp_comm ? Status::kOk : Status::kCommError, *world_, "tp split");
  }
  if (topo.sp > 1) {
    I.sp_comm = world_->split(t, g.sp_rank);
    f.cok(I.sp_comm ? Status::kOk : Status::kCommError, *world_, "sp split");
  }

  const std::vector<double> inv = rope_inv_freq(cfg_.head_dim, cfg_.rope_theta, cfg_.rope_scaling);
  I.inv_freq = I.alloc<double>(inv.size(), "rope frequencies");
  f.ck(cudaMemcpy(I.inv_freq, inv.data(), inv.size() * sizeof(double), cudaMemcpyHostToDevice),
       "uploading rope frequencies");
  const size_t H = cfg_.hidden, V = cfg_.vocab, nf = nf_, ql = g.ql, kvl = g.kvl;
  const size_t qkvl = ql + 2 * kvl;
  I.embed = I.alloc<uint16_t>(V * H, "embedding");
  I.lm_head = cfg_.tie_word_embeddings ? I.embed : I.alloc<uint16_t>(V * H, "lm_head");
  I.final_norm = I.alloc<float>(H, "final norm");
  I.layers.resize(cfg_.n_layers);
  for (DevLayer& L : I.layers) {
    L.wqkv = I.alloc<uint16_t>(qkvl * H, "wqkv");
    if (cfg_.qkv_bias) L.bqkv = I.alloc<uint16_t>(qkvl, "bqkv");
    L.wo = I.alloc<uint16_t>(H * ql, "wo");
    L.wgu = I.alloc<uint16_t>(2 * nf * H, "w_gate_up");
    L.wdown = I.alloc<uint16_t>(H * nf, "w_down");
    L.attn_norm = I.alloc<float>(H, "attn_norm");
    L.ffn_norm = I.alloc<float>(H, "ffn_norm");
  }
  weight_bytes_ = (V * H * (cfg_.tie_word_embeddings ? 1 : 2) +
                   cfg_.n_layers * (qkvl * H + ql * H + 3 * nf * H + (cfg_.qkv_bias ? qkvl : 0))) *
                      2 +
                  (H + cfg_.n_layers * 2 * H) * 4;
  if (src)
    upload_slices(I, cfg_, *src);
  else
    random_slices(I, cfg_, seed);
}

}  // namespace mprefill::gpu
