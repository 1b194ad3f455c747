// mprefill-bench prefill: TTFT of the CUDA backend on one GPU (engine/cuda/cuda_backend.h) on a
// random model of a named shape, with a per-layer breakdown.
//
//   mprefill-bench prefill --shape llama3-8b --seq N [--sparse dense|auto|FILE.json]
//       [--index-set estimated|clustered|uniform] [--dense-below N] [--sink pinned|keep|null]
//       [--layers L] [--mlp-chunk C] [--warmup-seq N] [--seed S] [--cudnn-ms MS] [--json]
//
// Weights are generated on the GPU (never on the host). Token ids are uniform random. The
// timed prefill is one run (a whole prefill is seconds to tens of seconds), after a short
// warm-up prefill of --warmup-seq tokens that loads kernels and cuBLASLt algorithms.
// TTFT = host wall time of CudaBackend::prefill (workspace allocation, ids upload, all
// layers, KV export, logits download) plus the greedy pick of the first token.
// Breakdown: CUDA events between phases on the engine stream: gemm (QKV, O, gate/up, down),
// attention (flash / sparse kernels), estimate (VS row stats, scores, top-k, CSR index
// build; block-sparse estimation), kv_export (sink->put: the device copy into the sink's
// staging buffer, waiting for the previous layer's host copy), rest (norms, RoPE, SwiGLU,
// embedding and logits).
// --index-set clustered|uniform: the estimation still runs (and is timed) on every sparse
// head, then attention uses the synthetic index sets of ../shared/BENCHMARKS.md for the
// vertical-slash heads (random weights have no real sparsity).
// Distributed (tp x sp ranks, one GPU each; the same CudaBackend over NCCL):
//   mpirun -np R mprefill-bench prefill --tp T --sp S --shape llama3-8b --seq N
//       [--sparse dense|FILE --index-set estimated|clustered|uniform] [--kv-skip on|off]
//       [--json]
// R must equal T * S. --index-set estimated: the ring engine estimates the sparse indices
// globally across its sp ranks (no synthetic set); clustered|uniform: vertical-slash heads
// use the synthetic index set as a fixed plan (no estimation on the ring).
// TTFT = max over ranks of the prefill wall time after a barrier; rank 0 prints the
// JSON with every rank's figures: ring attention (compute stream), ring wait (compute
// stream stalled on a transfer: exposed), ring transfer (comm stream: hidden = transfer -
// wait), tp all-reduce, local tokens, peak GPU memory.
// --cudnn-ms MS: cuDNN SDPA time of one layer's dense causal attention at this N and head
// shape (bench/cudnn_baseline.py, same card): the JSON then carries the E1 reference
// gemm_ms + layers * MS and own dense TTFT over it.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/backends.h"
#include "engine/cuda/cuda_backend.h"
#include "kernels/cuda/cuda.h"
#include "kernels/edge_check.h"
#ifdef MPREFILL_HAVE_NCCL
#include "comm/mpi_comm.h"
#include "comm/nccl_comm.h"
#endif
#include "engine/ring_need.h"
#include "kv/cuda/kv_sinks.h"
#include "model/index_sets.h"
#include "model/model_config.h"
#include "model/sparse_policy.h"

namespace {

using namespace mprefill;

struct Args {
  std::string shape = "llama3-8b", sparse = "dense", index_set = "estimated", sink = "pinned";
  int64_t seq = 0, dense_below = kDefaultDenseBelow, mlp_chunk = 16384, warmup_seq = 4096;
  int layers = 0;
  uint64_t seed = 1;
  double cudnn_ms = 0;
  bool json = false;
  int tp = 1, sp = 1;
  bool kv_skip = true;  // --kv-skip on|off (distributed: CudaOptions::skip_causal_kv)
};

void usage() {
  std::fprintf(
      stderr,
      "usage: mprefill-bench prefill --seq N [--shape tiny|stories15m|llama3-8b]\n"
      "         [--sparse dense|auto|FILE.json] [--index-set estimated|clustered|uniform]\n"
      "         [--dense-below N] [--sink pinned|keep|null] [--layers L] [--mlp-chunk C]\n"
      "         [--warmup-seq N] [--seed S] [--cudnn-ms MS] [--json]\n"
      "       mpirun -np T*S mprefill-bench prefill --tp T --sp S --seq N [...]\n");
}

int64_t to_int(const std::string& flag, const std::string& v) {
  size_t used = 0;
  long long x = 0;
  try {
    x = std::stoll(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (v.empty() || used != v.size())
    throw std::runtime_error(flag + " expects an integer, got '" + v + "'");
  return x;
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 2; i < argc; ++i) {
    const std::string f = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(f + " needs a value");
      return argv[++i];
    };
    if (f == "--shape")
      a.shape = val();
    else if (f == "--seq")
      a.seq = to_int(f, val());
    else if (f == "--sparse")
      a.sparse = val();
    else if (f == "--index-set")
      a.index_set = val();
    else if (f == "--dense-below")
      a.dense_below = to_int(f, val());
    else if (f == "--sink")
      a.sink = val();
    else if (f == "--layers")
      a.layers = static_cast<int>(to_int(f, val()));
    else if (f == "--mlp-chunk")
      a.mlp_chunk = to_int(f, val());
    else if (f == "--warmup-seq")
      a.warmup_seq = to_int(f, val());
    else if (f == "--seed")
      a.seed = static_cast<uint64_t>(to_int(f, val()));
    else if (f == "--cudnn-ms")
      a.cudnn_ms = std::stod(val());
    else if (f == "--json")
      a.json = true;
    else if (f == "--tp")
      a.tp = static_cast<int>(to_int(f, val()));
    else if (f == "--sp")
      a.sp = static_cast<int>(to_int(f, val()));
    else if (f == "--kv-skip") {
      const std::string v = val();
      if (v != "on" && v != "off") throw std::runtime_error("--kv-skip must be on or off");
      a.kv_skip = v == "on";
    } else if (f == "--help" || f == "-h") {
      usage();
      std::exit(0);
    } else
      throw std::runtime_error("unknown option " + f);
  }
  if (a.seq < 1) throw std::runtime_error("--seq N (>= 1) is required");
  if (a.index_set != "estimated" && a.index_set != "clustered" && a.index_set != "uniform")
    throw std::runtime_error("--index-set must be estimated, clustered or uniform");
  if (a.sink != "pinned" && a.sink != "keep" && a.sink != "null")
    throw std::runtime_error("--sink must be pinned, keep or null");
  if (a.tp < 1 || a.sp < 1) throw std::runtime_error("--tp and --sp must be >= 1");
  if (a.layers < 0 || a.mlp_chunk < 1 || a.warmup_seq < 0 || a.dense_below < 0)
    throw std::runtime_error("--layers, --mlp-chunk, --warmup-seq, --dense-below out of range");
  return a;
}

std::string layer_json(const gpu::LayerTimes& t) {
  char b[256];
  std::snprintf(b, sizeof b,
                "{\"gemm\": %.3f, \"attention\": %.3f, \"estimate\": %.3f, \"kv_export\": %.3f, "
                "\"rest\": %.3f}",
                t.gemm_ms, t.attention_ms, t.estimate_ms, t.kv_export_ms, t.rest_ms);
  return b;
}

std::string escape(const std::string& s) {
  std::string o;
  for (char ch : s) {
    if (ch == '"' || ch == '\\') o += '\\';
    o += ch;
  }
  return o;
}

// Vertical-slash heads of the policy get the synthetic index set of --index-set.
PrefillPlan synthetic_plan(const Args& a, const ModelConfig& cfg, const SparsePolicy& policy,
                           int64_t n) {
  const IndexSetKind kind = parse_index_set_kind(a.index_set);
  PrefillPlan plan;
  plan.seq_len = n;
  plan.layers.assign(cfg.n_layers, std::vector<HeadPlan>(cfg.n_heads));
  for (int l = 0; l < cfg.n_layers; ++l)
    for (int h = 0; h < cfg.n_heads; ++h) {
      const HeadPattern hp = policy.at(l, h, n);
      HeadPlan& x = plan.layers[l][h];
      x.kind = hp.kind;
      if (hp.kind == PatternKind::kVerticalSlash)
        x.vs = synthetic_vs(kind, n, hp.a, hp.b, a.seed * 1000003ull + l * 1009ull + h);
    }
  return plan;
}

#ifdef MPREFILL_HAVE_NCCL
int run_dist(const Args& a) {
  const comm::WorldInfo wi = comm::world_info();
  if (wi.size != a.tp * a.sp)
    throw std::runtime_error("--tp " + std::to_string(a.tp) + " x --sp " + std::to_string(a.sp) +
                             " needs " + std::to_string(a.tp * a.sp) + " ranks, mpirun gave " +
                             std::to_string(wi.size));
  ModelConfig cfg = named_shape(a.shape);
  if (a.layers > 0) cfg.n_layers = std::min(cfg.n_layers, a.layers);
  const SparsePolicy policy = load_sparse_policy(a.sparse, cfg, a.dense_below);
  policy.check_model(cfg);
  const int64_t n = a.seq;
  const bool dense = policy.all_dense(n);
  // --index-set estimated: the ring engine estimates the indices itself, globally across
  // its sp ranks (engine/cuda/sp_estimate.h); otherwise a fixed synthetic plan.
  const bool estimated = !dense && a.index_set == "estimated";
  check_policy(gpu::cuda_caps(/*nccl_kv=*/false), policy, n, nullptr, "mprefill-bench: ");
  auto mpi = comm::make_mpi_communicator(MPI_COMM_WORLD);
  comm::CommConfig cc;
  cc.timeout_ms = 600000;
  std::string err;
  auto nccl = comm::make_nccl_communicator(MPI_COMM_WORLD, wi.local_rank, cc, &err);
  if (!nccl) throw std::runtime_error(err);
  gpu::CudaOptions o;
  o.device = wi.local_rank;
  o.mlp_chunk = a.mlp_chunk;
  o.skip_causal_kv = a.kv_skip;
  gpu::PrefillOptions po;
  po.timing = true;
  const auto t_init = std::chrono::steady_clock::now();
  gpu::CudaBackend eng(nccl.get(), cfg, a.seed, DistTopology{a.tp, a.sp}, o);
  const double init_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_init).count();
  std::mt19937_64 rng(a.seed);
  std::vector<int> ids(n);
  for (auto& id : ids) id = static_cast<int>(rng() % static_cast<uint64_t>(cfg.vocab));
  if (a.warmup_seq > 0) {
    std::vector<int> w(ids.begin(), ids.begin() + std::min(n, a.warmup_seq));
    eng.prefill(w, SparsePolicy::dense(), nullptr);
  }
  PrefillPlan plan;
  if (!dense && !estimated) plan = synthetic_plan(a, cfg, policy, n);
  gpu::NullKvSink sink;
  int32_t z = 0, zz = 0;
  MPREFILL_EDGE_CHECK(mpi->all_reduce(&z, &zz, 1, DType::kI32, comm::ReduceOp::kSum, nullptr),
                      "barrier", mpi->last_error());
  const auto t0 = std::chrono::steady_clock::now();
  gpu::CudaPrefillStats r;
  const std::vector<float> logits =
      eng.prefill(ids, policy, &sink, dense || estimated ? nullptr : &plan, &r, po);
  const double wall =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  bool finite = true;
  for (float v : logits) finite = finite && std::isfinite(v);
  // Per-rank figures gathered on every rank (fp64 as two fp32 would lose digits: use I64 of
  // microseconds / bytes).
  const int64_t mine[8] = {int64_t(wall * 1000),           int64_t(r.ring_compute_ms * 1000),
                           int64_t(r.ring_wait_ms * 1000), int64_t(r.ring_transfer_ms * 1000),
                           int64_t(r.allreduce_ms * 1000), r.local_tokens,
                           int64_t(r.peak_device_bytes),   finite ? 1 : 0};
  std::vector<int64_t> all(8 * size_t(wi.size));
  MPREFILL_EDGE_CHECK(mpi->all_gather(mine, all.data(), 8, DType::kI64, nullptr),
                      "gathering the per-rank figures", mpi->last_error());
  if (wi.rank != 0) return 0;
  double ttft = 0, max_comp = 0, sum_comp = 0, wait_max = 0, xfer_max = 0;
  bool all_finite = true;
  std::string per;
  for (int k = 0; k < wi.size; ++k) {
    const int64_t* v = all.data() + 8 * k;
    ttft = std::max(ttft, v[0] / 1000.0);
    max_comp = std::max(max_comp, v[1] / 1000.0);
    sum_comp += v[1] / 1000.0;
    wait_max = std::max(wait_max, v[2] / 1000.0);
    xfer_max = std::max(xfer_max, v[3] / 1000.0);
    all_finite = all_finite && v[7] == 1;
    char b[512];
    std::snprintf(b, sizeof b,
                  "%s{\"rank\": %d, \"tp_rank\": %d, \"sp_rank\": %d, \"prefill_ms\": %.3f, "
                  "\"ring_attention_ms\": %.3f, \"ring_wait_exposed_ms\": %.3f, "
                  "\"ring_transfer_ms\": %.3f, \"ring_hidden_ms\": %.3f, "
                  "\"tp_allreduce_ms\": %.3f, \"local_tokens\": %lld, \"peak_gpu_bytes\": "
                  "%lld}",
                  k ? ", " : "", k, k % a.tp, k / a.tp, v[0] / 1000.0, v[1] / 1000.0, v[2] / 1000.0,
                  v[3] / 1000.0, std::max(0.0, (v[3] - v[2]) / 1000.0), v[4] / 1000.0,
                  static_cast<long long>(v[5]), static_cast<long long>(v[6]));
    per += b;
  }
  if (!all_finite) throw std::runtime_error("non-finite logits");
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, wi.local_rank);
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%d", std::gmtime(&now));
  const double ring_imb = sum_comp > 0 ? max_comp / (sum_comp / wi.size) : 1.0;
  // KV-send skipping bound (engine/ring_need.h): the fraction of the ring's KV blocks
  // that some downstream receiver's mask reads (-1: dense or estimated, not analysed).
  double kv_needed = -1;
  if (!dense && !estimated && a.sp > 1)
    kv_needed = ring_kv_need(plan, policy, cfg, r.sp_layout, n, a.tp).needed_fraction();
  if (a.json) {
    std::printf(
        "{\"bench\": \"prefill_dist\", \"card\": \"%s\", \"date\": \"%s\", \"shape\": "
        "\"%s\", \"layers\": %d, \"seq\": %lld, \"tp\": %d, \"sp\": %d, \"sparse\": "
        "\"%s\", \"index_set\": \"%s\", \"ttft_ms\": %.3f, \"sp_imbalance_causal_tiles\": "
        "%.4f, \"ring_attention_imbalance\": %.4f, \"ring_wait_exposed_max_ms\": %.3f, "
        "\"ring_transfer_max_ms\": %.3f, \"weights_bytes_per_rank\": %zu, "
        "\"weights_init_ms\": %.1f, \"ring_kv_needed_fraction\": %.4f, "
        "\"estimate_bytes_sent_rank0\": %lld, \"kv_skip\": %s, \"ring_bytes_sent_rank0\": "
        "%lld, \"ranks\": [%s]}\n",
        escape(prop.name).c_str(), date, a.shape.c_str(), cfg.n_layers, static_cast<long long>(n),
        a.tp, a.sp, escape(a.sparse).c_str(), dense ? "none" : a.index_set.c_str(), ttft,
        r.sp_imbalance, ring_imb, wait_max, xfer_max, eng.weight_bytes(), init_ms, kv_needed,
        static_cast<long long>(r.estimate_bytes_sent), a.kv_skip ? "true" : "false",
        static_cast<long long>(r.ring_bytes_sent), per.c_str());
    std::fflush(stdout);
  }
  std::fprintf(stderr,
               "# prefill_dist %s N=%lld tp %d x sp %d sparse=%s on %s: TTFT %.1f ms; ring "
               "attention max %.1f ms (max/mean %.3f), exposed wait max %.1f ms, transfer max "
               "%.1f ms; KV blocks needed downstream %.4f\n",
               a.shape.c_str(), static_cast<long long>(n), a.tp, a.sp, a.sparse.c_str(), prop.name,
               ttft, max_comp, ring_imb, wait_max, xfer_max, kv_needed);
  return 0;
}
#endif

int run(const Args& a) {
  ModelConfig cfg = named_shape(a.shape);
  if (a.layers > 0) cfg.n_layers = std::min(cfg.n_layers, a.layers);
  const SparsePolicy policy = load_sparse_policy(a.sparse, cfg, a.dense_below);
  policy.check_model(cfg);
  const int64_t n = a.seq;

  gpu::CudaOptions eo;
  eo.mlp_chunk = a.mlp_chunk;
  const auto t_init = std::chrono::steady_clock::now();
  gpu::CudaBackend eng(nullptr, cfg, a.seed, DistTopology{}, eo);  // one GPU: tp 1 x sp 1
  const double init_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_init).count();

  // Memory plan first: refuse before any work (the sink's buffers count against it too).
  const gpu::MemoryPlan mp0 = eng.plan_memory(n, policy);
  std::fprintf(stderr, "# %s\n", mp0.describe().c_str());
  if (!mp0.fits) throw std::runtime_error("refused: " + mp0.describe());

  std::unique_ptr<KvSink> sink;
  gpu::PinnedStreamSink* pinned = nullptr;
  gpu::NullKvSink* null_sink = nullptr;
  if (a.sink == "null") {
    auto s = std::make_unique<gpu::NullKvSink>();
    null_sink = s.get();
    sink = std::move(s);
  } else {
    auto s =
        std::make_unique<gpu::PinnedStreamSink>(cfg.n_layers, n, cfg.kv_dim(), a.sink == "keep");
    pinned = s.get();
    sink = std::move(s);
  }

  std::mt19937_64 rng(a.seed);
  std::vector<int> ids(n);
  for (auto& id : ids) id = static_cast<int>(rng() % static_cast<uint64_t>(cfg.vocab));

  if (a.warmup_seq > 0) {
    std::vector<int> w(ids.begin(), ids.begin() + std::min(n, a.warmup_seq));
    gpu::NullKvSink ns;
    eng.prefill(w, SparsePolicy::dense(), &ns);
  }

  PrefillPlan plan;
  PrefillPlan* planp = nullptr;
  gpu::PrefillOptions po;
  po.timing = true;
  if (a.index_set != "estimated" && !policy.all_dense(n)) {
    plan = synthetic_plan(a, cfg, policy, n);
    planp = &plan;
    po.estimate_with_plan = true;
  }

  gpu::CudaPrefillStats st;
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<float> logits = eng.prefill(ids, policy, sink.get(), planp, &st, po);
  const int first =
      static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  const double ttft_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  bool finite = true;
  for (float v : logits) finite = finite && std::isfinite(v);
  if (!finite) throw std::runtime_error("non-finite logits");

  // Work and rates.
  const double N = double(n), H = cfg.hidden, F = cfg.intermediate, QD = cfg.q_dim(),
               KVD = cfg.kv_dim(), L = cfg.n_layers;
  const double gemm_flops = L * 2.0 * N * (H * (QD + 2 * KVD) + QD * H + 3.0 * H * F);
  const double gemm_tflops = st.sum.gemm_ms > 0 ? gemm_flops / (st.sum.gemm_ms * 1e-3) / 1e12 : 0;
  const double dense_attn_flops = L * 2.0 * N * N * cfg.head_dim * cfg.n_heads;  // causal
  const double ref_ms = a.cudnn_ms > 0 ? st.sum.gemm_ms + L * a.cudnn_ms : 0;

  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%d", std::gmtime(&now));
  const int64_t exported = pinned ? pinned->bytes_copied() : null_sink->bytes();

  if (a.json) {
    std::string per;
    for (size_t i = 0; i < st.layers.size(); ++i) per += (i ? ", " : "") + layer_json(st.layers[i]);
    std::printf(
        "{\"bench\": \"prefill\", \"card\": \"%s\", \"date\": \"%s\", \"shape\": \"%s\", "
        "\"layers\": %d, \"seq\": %lld, \"sparse\": \"%s\", \"policy\": \"%s\", \"ran_dense\": %s, "
        "\"index_set\": \"%s\", \"sink\": \"%s\", \"ttft_ms\": %.3f, \"prefill_ms\": %.3f, "
        "\"breakdown_ms\": {\"gemm\": %.3f, \"attention\": %.3f, \"estimate\": %.3f, "
        "\"kv_export\": %.3f, \"rest\": %.3f, \"embed_and_logits\": %.3f, \"untimed_host\": %.3f}, "
        "\"heads\": {\"dense\": %d, \"a_shape\": %d, \"vertical_slash\": %d, \"block_sparse\": "
        "%d}, "
        "\"attention_calls\": %d, \"vs_index_entries_max\": %lld, "
        "\"gemm_tflops\": %.1f, \"gemm_tflop\": %.1f, \"dense_attention_tflop\": %.1f, "
        "\"attention_dense_equiv_tflops\": %.1f, \"cudnn_ms_per_layer\": %.3f, "
        "\"e1_reference_ms\": %.3f, \"ttft_over_reference\": %.4f, "
        "\"peak_gpu_bytes\": %zu, \"weights_bytes\": %zu, \"workspace_bytes\": %zu, "
        "\"kv_exported_bytes\": %lld, \"sink_host_wait_ms\": %.3f, \"weights_init_ms\": %.1f, "
        "\"first_token\": %d, \"per_layer_ms\": [%s]}\n",
        escape(prop.name).c_str(), date, a.shape.c_str(), cfg.n_layers, static_cast<long long>(n),
        escape(a.sparse).c_str(), escape(policy.summary_string()).c_str(),
        st.all_dense ? "true" : "false", a.index_set.c_str(), a.sink.c_str(), ttft_ms, st.total_ms,
        st.sum.gemm_ms, st.sum.attention_ms, st.sum.estimate_ms, st.sum.kv_export_ms,
        st.sum.rest_ms, st.head_ms, st.total_ms - st.sum.total() - st.head_ms, st.heads_by_kind[0],
        st.heads_by_kind[1], st.heads_by_kind[2], st.heads_by_kind[3], st.attention_calls,
        static_cast<long long>(st.vs_index_entries_max), gemm_tflops, gemm_flops / 1e12,
        dense_attn_flops / 1e12,
        st.sum.attention_ms > 0 ? dense_attn_flops / (st.sum.attention_ms * 1e-3) / 1e12 : 0,
        a.cudnn_ms, ref_ms, ref_ms > 0 ? ttft_ms / ref_ms : 0.0, st.peak_device_bytes,
        eng.weight_bytes(), st.memory.workspace, static_cast<long long>(exported),
        pinned ? pinned->copy_wait_ms() : 0.0, init_ms, first, per.c_str());
    std::fflush(stdout);  // before the stderr summary: one file may take both
  }
  std::fprintf(stderr,
               "# prefill %s N=%lld sparse=%s index=%s on %s: TTFT %.1f ms (gemm %.1f, attention "
               "%.1f, estimate %.1f, kv_export %.1f, rest %.1f, embed+logits %.1f); GEMM %.0f "
               "TF/s; peak %.2f GiB%s\n",
               a.shape.c_str(), static_cast<long long>(n), a.sparse.c_str(), a.index_set.c_str(),
               prop.name, ttft_ms, st.sum.gemm_ms, st.sum.attention_ms, st.sum.estimate_ms,
               st.sum.kv_export_ms, st.sum.rest_ms, st.head_ms, gemm_tflops,
               st.peak_device_bytes / double(1 << 30),
               ref_ms > 0 ? (", E1 ref " + std::to_string(ref_ms) + " ms").c_str() : "");
  return 0;
}

}  // namespace

int prefill_bench_main(int argc, char** argv) {
  try {
    const Args a = parse(argc, argv);
    if (a.tp * a.sp > 1) {
#ifdef MPREFILL_HAVE_NCCL
      comm::MpiRuntime mpi(&argc, &argv);
      try {
        return run_dist(a);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "error: prefill (rank %d): %s\n", comm::world_info().rank, e.what());
        comm::abort_world(2);
      }
#else
      throw std::runtime_error("this build has no NCCL: --tp / --sp need it");
#endif
    }
    return run(a);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: prefill: %s\n", e.what());
    return 2;
  }
}
