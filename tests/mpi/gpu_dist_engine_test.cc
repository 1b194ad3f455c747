// The CUDA backend (engine/cuda/cuda_backend.h) over NCCL under mpirun, one rank per
// GPU, against the same class on one GPU (tp 1 x sp 1, no communicator) on the same
// device-random model (each rank of a group draws exactly its slices of it): last-position logits
// and the per-layer K / V of every rank's (KV heads, token shard), for every tp x sp of the world
// size that divides the KV heads (np 2: 2x1, 1x2; np 4: 2x2, 1x4), with dense, fixed sparse and
// ring-estimated sparse indices (against the single-GPU estimation); causal KV skipping. Needs one
// GPU per rank (ctest labels gpu2 / gpu4); skips loudly otherwise.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iterator>
#include <random>
#include <vector>

#include "comm/mpi_comm.h"
#include "comm/nccl_comm.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/engine.h"
#include "engine/plan_codec.h"
#include "kv/cuda/kv_sinks.h"
#include "model/convert.h"
#include "tests/model_fixtures.h"
#include "tests/mpi/mpi_testutil.h"

namespace mprefill {
namespace {

using test::mpi::expect_all_ranks_ok;

std::vector<int> random_ids(int64_t n, int vocab, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::vector<int> ids(n);
  for (auto& x : ids) x = static_cast<int>(g() % vocab);
  return ids;
}

// Collects device slices (any KV-head subset, several token ranges) into a host
// [n][kv_dim] layout per layer, remembering which (row, head) cells were written.
class ShardSink : public KvSink {
 public:
  ShardSink(const ModelConfig& c, int64_t n)
      : kv_dim_(c.kv_dim()),
        hd_(c.head_dim),
        n_(n),
        k_(c.n_layers),
        v_(c.n_layers),
        written_(c.n_layers) {
    for (int l = 0; l < c.n_layers; ++l) {
      k_[l].assign(size_t(n) * kv_dim_, 0.f);
      v_[l].assign(size_t(n) * kv_dim_, 0.f);
      written_[l].assign(size_t(n) * c.n_kv_heads, 0);
    }
  }
  void put(const KvSlice& s) override {
    ASSERT_TRUE(s.on_device && s.dtype == DType::kBF16);
    const size_t w = s.kv_heads.size() * hd_, cnt = size_t(s.rows()) * w;
    std::vector<uint16_t> k(cnt), v(cnt);
    ASSERT_EQ(cudaStreamSynchronize(static_cast<cudaStream_t>(s.stream)), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(k.data(), s.k, cnt * 2, cudaMemcpyDeviceToHost), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(v.data(), s.v, cnt * 2, cudaMemcpyDeviceToHost), cudaSuccess);
    int64_t r = 0;
    for (auto [b, e] : s.tokens)
      for (int64_t t = b; t < e; ++t, ++r)
        for (size_t i = 0; i < s.kv_heads.size(); ++i) {
          const int h = s.kv_heads[i];
          for (int d = 0; d < hd_; ++d) {
            k_[s.layer][size_t(t) * kv_dim_ + h * hd_ + d] = bf16_to_f32(k[r * w + i * hd_ + d]);
            v_[s.layer][size_t(t) * kv_dim_ + h * hd_ + d] = bf16_to_f32(v[r * w + i * hd_ + d]);
          }
          written_[s.layer][size_t(t) * (kv_dim_ / hd_) + h] = 1;
        }
    ++puts_;
  }
  int kv_dim_, hd_;
  int64_t n_;
  std::vector<std::vector<float>> k_, v_;
  std::vector<std::vector<char>> written_;
  int puts_ = 0;
};

class GpuDist : public ::testing::Test {
 protected:
  void SetUp() override {
    mpi_ = test::mpi::world();
    const comm::WorldInfo w = comm::world_info();
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
    int32_t enough = devices >= w.local_size ? 1 : 0, all = 0;
    ASSERT_EQ(mpi_->all_reduce(&enough, &all, 1, DType::kI32, comm::ReduceOp::kSum, nullptr),
              Status::kOk);
    if (all != mpi_->size())
      GTEST_SKIP() << "GPU distributed tests need one GPU per rank (" << w.local_size
                   << " ranks on this node, " << devices << " GPUs visible)";
    device_ = w.local_rank;
    comm::CommConfig cfg;
    cfg.timeout_ms = 60000;
    std::string err;
    nccl_ = comm::make_nccl_communicator(MPI_COMM_WORLD, device_, cfg, &err);
    ASSERT_TRUE(nccl_) << err;
  }
  std::unique_ptr<comm::Communicator> mpi_, nccl_;
  int device_ = 0;
};

struct Err {
  double k = 0, v = 0, logits = 0;
  int64_t cells = 0;
};

double max_abs(const std::vector<float>& x) {
  double m = 0;
  for (float e : x) m = std::max(m, double(std::fabs(e)));
  return m;
}

// Differences between the indices the distributed engine estimated for this rank's heads
// [h0, h1) and the single-GPU ones. Block-sparse lists must be identical (bit-exact
// pooling and scores). Vertical-slash lists may differ only where two candidates tie
// within the fp32 rounding of the row / slash sums (sp_estimate.h): the symmetric
// difference of a head's columns or offsets must be at most kVsTieSlack entries.
struct PlanDiff {
  int64_t heads = 0, vs_entries = 0, vs_diff = 0, bs_entries = 0, bs_diff = 0, bad_heads = 0;
};
constexpr int64_t kVsTieSlack = 2;

int64_t sym_diff(std::vector<int> a, std::vector<int> b) {
  std::sort(a.begin(), a.end());
  std::sort(b.begin(), b.end());
  std::vector<int> d;
  std::set_symmetric_difference(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(d));
  return static_cast<int64_t>(d.size());
}

PlanDiff compare_plans(const PrefillPlan& got, const PrefillPlan& ref, int h0, int h1) {
  PlanDiff d;
  for (size_t l = 0; l < ref.layers.size(); ++l)
    for (int h = h0; h < h1; ++h) {
      const HeadPlan &g = got.layers[l][h], &r = ref.layers[l][h];
      ++d.heads;
      if (g.kind != r.kind) {
        ++d.bad_heads;
        continue;
      }
      if (r.kind == PatternKind::kVerticalSlash) {
        const int64_t dc = sym_diff(g.vs.columns, r.vs.columns),
                      doff = sym_diff(g.vs.offsets, r.vs.offsets);
        d.vs_entries += r.vs.columns.size() + r.vs.offsets.size();
        d.vs_diff += dc + doff;
        if (dc > kVsTieSlack || doff > kVsTieSlack || g.vs.columns.size() != r.vs.columns.size() ||
            g.vs.offsets.size() != r.vs.offsets.size())
          ++d.bad_heads;
      } else if (r.kind == PatternKind::kBlockSparse) {
        d.bs_entries += r.blocks.size();
        int64_t diff = g.topk == r.topk ? 0 : 1;
        for (size_t i = 0; i < r.blocks.size(); ++i)
          diff += i >= g.blocks.size() || g.blocks[i] != r.blocks[i];
        d.bs_diff += diff;
        if (diff) ++d.bad_heads;
      }
    }
  return d;
}

uint64_t plan_hash(const PrefillPlan& p, int h0, int h1) {
  uint64_t x = 1469598103934665603ull;
  auto mix = [&](int64_t v) { x = (x ^ static_cast<uint64_t>(v)) * 1099511628211ull; };
  for (const auto& layer : p.layers)
    for (int h = h0; h < h1; ++h) {
      const HeadPlan& hp = layer[h];
      mix(static_cast<int>(hp.kind));
      for (int v : hp.vs.columns) mix(v);
      mix(-1);
      for (int v : hp.vs.offsets) mix(v);
      mix(-2);
      for (int v : hp.blocks) mix(v);
    }
  return x;
}

// Every tp x sp of the world size that divides the KV heads, against the single-GPU
// engine (reference KV in ref, logits ref_logits) under the same policy / plan. With
// ref_plan (and no plan), the distributed engine estimates the sparse indices itself and
// they are compared with ref_plan (single-GPU estimation) and across the sp ranks.
void compare_topologies(comm::Communicator& nccl, comm::Communicator& mpi, int device,
                        const ModelConfig& c, uint64_t seed, const std::vector<int>& ids,
                        const SparsePolicy& policy, const PrefillPlan* plan, const KvCache& ref,
                        const std::vector<float>& ref_logits, const char* what,
                        const PrefillPlan* ref_plan = nullptr) {
  constexpr double kKvTol = 2.5e-2, kLogitTol = 4e-2;  // as tests/gpu/engine_test.cc (bf16)
  const int size = nccl.size();
  const int64_t n = static_cast<int64_t>(ids.size());
  for (int tp = 1; tp <= size; ++tp) {
    if (size % tp != 0 || c.n_kv_heads % tp != 0) continue;
    const DistTopology topo{tp, size / tp};
    gpu::CudaOptions o;
    o.device = device;
    o.mlp_chunk = 500;  // several chunks per shard
    gpu::PrefillOptions po;
    po.timing = true;
    gpu::CudaBackend eng(&nccl, c, seed, topo, o);
    ShardSink sink(c, n);
    PrefillPlan est, given;  // estimated here (ref_plan), or the fixed plan (used as given)
    if (plan) given = *plan;
    PrefillPlan* inout = plan ? &given : (ref_plan ? &est : nullptr);
    gpu::CudaPrefillStats r;
    const std::vector<float> logits = eng.prefill(ids, policy, &sink, inout, &r, po);
    if (ref_plan) {
      const int grp = c.n_heads / c.n_kv_heads, h0 = eng.kv_begin() * grp, h1 = eng.kv_end() * grp;
      const PlanDiff d = compare_plans(est, *ref_plan, h0, h1);
      std::printf(
          "# %s rank %d tp %d sp %d n %lld: estimated heads %lld, vertical-slash entries %lld "
          "(differing %lld), block entries %lld (differing %lld), heads out of tolerance %lld, "
          "estimation traffic %lld B\n",
          what, nccl.rank(), tp, topo.sp, static_cast<long long>(n),
          static_cast<long long>(d.heads), static_cast<long long>(d.vs_entries),
          static_cast<long long>(d.vs_diff), static_cast<long long>(d.bs_entries),
          static_cast<long long>(d.bs_diff), static_cast<long long>(d.bad_heads),
          static_cast<long long>(r.estimate_bytes_sent));
      EXPECT_EQ(d.bad_heads, 0) << what << ": rank " << nccl.rank() << " tp " << tp;
      // Both kinds were estimated somewhere (a tp rank may hold heads of one kind only).
      const int64_t ent[2] = {d.vs_entries, d.bs_entries};
      int64_t ent_all[2] = {0, 0};
      ASSERT_EQ(mpi.all_reduce(ent, ent_all, 2, DType::kI64, comm::ReduceOp::kSum, nullptr),
                Status::kOk);
      EXPECT_GT(ent_all[0], 0);
      EXPECT_GT(ent_all[1], 0);
      if (topo.sp > 1) {
        EXPECT_GT(r.estimate_bytes_sent, 0);
      }
      // The sp ranks of one tp rank hold the same heads and must agree exactly.
      const int64_t mine = static_cast<int64_t>(plan_hash(est, h0, h1));
      std::vector<int64_t> all(nccl.size());
      ASSERT_EQ(mpi.all_gather(&mine, all.data(), 1, DType::kI64, nullptr), Status::kOk);
      for (int q = 0; q < nccl.size(); ++q)
        if (q % tp == nccl.rank() % tp) {
          EXPECT_EQ(all[q], mine) << "rank " << q << " estimated other indices than rank "
                                  << nccl.rank() << " (tp " << tp << ")";
        }
    }
    Err e;
    for (int l = 0; l < c.n_layers; ++l) {
      const double mk = max_abs(ref.k[l]), mv = max_abs(ref.v[l]);
      for (int64_t t = 0; t < n; ++t)
        for (int h = 0; h < c.n_kv_heads; ++h) {
          if (!sink.written_[l][size_t(t) * c.n_kv_heads + h]) continue;
          ++e.cells;
          for (int d = 0; d < c.head_dim; ++d) {
            const size_t i = size_t(t) * c.kv_dim() + h * c.head_dim + d;
            e.k = std::max(e.k, std::fabs(sink.k_[l][i] - ref.k[l][i]) / mk);
            e.v = std::max(e.v, std::fabs(sink.v_[l][i] - ref.v[l][i]) / mv);
          }
        }
    }
    double dl = 0;
    for (size_t i = 0; i < ref_logits.size() && i < logits.size(); ++i)
      dl = std::max(dl, double(std::fabs(logits[i] - ref_logits[i])));
    e.logits = dl / max_abs(ref_logits);
    // This rank's cells: its KV heads x its token shard, every layer.
    const int64_t expect_cells = int64_t(c.n_layers) * r.local_tokens * (c.n_kv_heads / tp);
    const bool good = e.k < kKvTol && e.v < kKvTol && e.logits < kLogitTol &&
                      e.cells == expect_cells && sink.puts_ == c.n_layers &&
                      logits.size() == ref_logits.size();
    std::printf(
        "# %s rank %d tp %d sp %d n %lld: K err %.3g V err %.3g logits err %.3g (cells "
        "%lld/%lld) ring compute %.3f ms wait %.3f ms allreduce %.3f ms sent %lld B\n",
        what, nccl.rank(), tp, topo.sp, static_cast<long long>(n), e.k, e.v, e.logits,
        static_cast<long long>(e.cells), static_cast<long long>(expect_cells), r.ring_compute_ms,
        r.ring_wait_ms, r.allreduce_ms, static_cast<long long>(r.ring_bytes_sent));
    EXPECT_TRUE(good) << what << ": rank " << nccl.rank() << " tp " << tp << " sp " << topo.sp;
    if (topo.sp > 1) {
      EXPECT_GT(r.ring_bytes_sent, 0);
    }
    expect_all_ranks_ok(mpi, good);
  }
}

TEST_F(GpuDist, DenseMatchesSingleGpu) {
  const ModelConfig c = test::small_gqa_config();
  const uint64_t seed = 31;
  for (int64_t n : {777, 1500}) {
    const auto ids = random_ids(n, c.vocab, 100 + n);
    KvCache ref(c, n);  // reference: the whole model on this rank's GPU
    std::vector<float> ref_logits;
    {
      gpu::CudaOptions o;
      o.device = device_;
      gpu::CudaBackend eng(nullptr, c, seed, DistTopology{}, o);  // one GPU
      gpu::HostKvCacheSink sink(&ref);
      ref_logits = eng.prefill(ids, SparsePolicy::dense(), &sink);
    }
    compare_topologies(*nccl_, *mpi_, device_, c, seed, ids, SparsePolicy::dense(), nullptr, ref,
                       ref_logits, "dense");
  }
}

// Indices estimated once by rank 0's single-GPU engine, broadcast, then fixed for the
// reference and for every topology: each ring step runs the sparse kernels on the
// visiting shard only.
TEST_F(GpuDist, SparseWithFixedPlanMatchesSingleGpu) {
  const ModelConfig c = test::small_gqa_config();
  const SparsePolicy policy = test::gqa_split_policy(c);
  const uint64_t seed = 33;
  for (int64_t n : {777, 1500}) {
    const auto ids = random_ids(n, c.vocab, 200 + n);
    gpu::CudaOptions o;
    o.device = device_;
    gpu::CudaBackend eng(nullptr, c, seed, DistTopology{}, o);  // one GPU
    std::vector<int32_t> code;
    if (nccl_->rank() == 0) {
      PrefillPlan est;
      eng.prefill(ids, policy, nullptr, &est);
      code = encode_plan(est);
    }
    int64_t len = static_cast<int64_t>(code.size());
    ASSERT_EQ(mpi_->broadcast(&len, 1, DType::kI64, 0, nullptr), Status::kOk);
    code.resize(len);
    ASSERT_EQ(mpi_->broadcast(code.data(), len, DType::kI32, 0, nullptr), Status::kOk);
    PrefillPlan plan = decode_plan(code);
    ASSERT_EQ(plan.layers[0][2].kind, PatternKind::kVerticalSlash);
    ASSERT_FALSE(plan.layers[0][2].vs.offsets.empty());
    ASSERT_EQ(plan.layers[0][3].kind, PatternKind::kBlockSparse);
    KvCache ref(c, n);
    gpu::HostKvCacheSink sink(&ref);
    const std::vector<float> ref_logits = eng.prefill(ids, policy, &sink, &plan);
    compare_topologies(*nccl_, *mpi_, device_, c, seed, ids, policy, &plan, ref, ref_logits,
                       "sparse");
  }
}

// No plan: every topology estimates the vertical-slash / block-sparse indices globally on
// its sp ranks. They must be the single-GPU estimation's (block-sparse exactly,
// vertical-slash up to fp32 ties), the same on all sp ranks, and the logits / KV must
// match the single-GPU engine running its own estimation.
TEST_F(GpuDist, SparseEstimatedMatchesSingleGpu) {
  const ModelConfig c = test::small_gqa_config();
  const SparsePolicy policy = test::gqa_split_policy(c);
  const uint64_t seed = 35;
  for (int64_t n : {777, 2600}) {
    const auto ids = random_ids(n, c.vocab, 300 + n);
    gpu::CudaOptions o;
    o.device = device_;
    gpu::CudaBackend eng(nullptr, c, seed, DistTopology{}, o);  // one GPU
    PrefillPlan ref_plan;
    KvCache ref(c, n);
    gpu::HostKvCacheSink sink(&ref);
    const std::vector<float> ref_logits = eng.prefill(ids, policy, &sink, &ref_plan);
    ASSERT_EQ(ref_plan.layers[0][2].kind, PatternKind::kVerticalSlash);
    compare_topologies(*nccl_, *mpi_, device_, c, seed, ids, policy, nullptr, ref, ref_logits,
                       "estimated", &ref_plan);
  }
}

// Causal KV skipping (CudaOptions::skip_causal_kv) sends fewer ring bytes (at sp 2
// exactly 3/4: rank 1 never reads rank 0's second zigzag chunk) and leaves the logits as
// they are.
TEST_F(GpuDist, CausalKvSkipSendsLessSameLogits) {
  const ModelConfig c = test::small_gqa_config();
  const int64_t n = 1536;  // 4 zigzag chunks of 384 tokens at sp 2
  const auto ids = random_ids(n, c.vocab, 9);
  const DistTopology topo{1, nccl_->size()};
  gpu::CudaPrefillStats r[2];
  std::vector<float> lg[2];
  for (int skip = 0; skip < 2; ++skip) {
    gpu::CudaOptions o;
    o.device = device_;
    o.skip_causal_kv = skip == 1;
    gpu::CudaBackend eng(nccl_.get(), c, 41, topo, o);
    lg[skip] = eng.prefill(ids, SparsePolicy::dense(), nullptr, nullptr, &r[skip]);
  }
  double dl = 0;
  for (size_t i = 0; i < lg[0].size(); ++i)
    dl = std::max(dl, double(std::fabs(lg[1][i] - lg[0][i])));
  const double rel = dl / max_abs(lg[0]);
  int64_t sent[2] = {r[0].ring_bytes_sent, r[1].ring_bytes_sent}, tot[2] = {0, 0};
  ASSERT_EQ(mpi_->all_reduce(sent, tot, 2, DType::kI64, comm::ReduceOp::kSum, nullptr),
            Status::kOk);
  std::printf("# kv skip rank %d: ring bytes all ranks %lld -> %lld, logits diff %.3g\n",
              nccl_->rank(), static_cast<long long>(tot[0]), static_cast<long long>(tot[1]), rel);
  EXPECT_LT(rel, 1e-3);
  EXPECT_LT(tot[1], tot[0]);
  if (nccl_->size() == 2) {
    EXPECT_EQ(tot[1] * 4, tot[0] * 3);
  }
}

// Weights from an HF directory (each rank converts only its slices: WeightSource) equal
// the same weights loaded whole on the host (bf16 checkpoint: both paths round the same
// values), so the logits are bit-identical; Qwen2-style q/k/v biases and an untied head.
TEST_F(GpuDist, HfCheckpointSlicesMatchHostWeights) {
  ModelConfig c = test::small_gqa_config();
  c.arch = "qwen2";
  c.qkv_bias = true;
  c.tie_word_embeddings = false;
  int32_t pid = static_cast<int32_t>(getpid());
  ASSERT_EQ(mpi_->broadcast(&pid, 1, DType::kI32, 0, nullptr), Status::kOk);
  const std::string dir = "/tmp/mprefill_gpudist_hf_" + std::to_string(pid);
  bool wrote = true;
  if (mpi_->rank() == 0) {
    try {
      std::filesystem::create_directories(dir);
      save_hf_dir(random_model(c, 5), dir, DType::kBF16);
    } catch (const std::exception& e) {
      ADD_FAILURE() << e.what();
      wrote = false;
    }
  }
  expect_all_ranks_ok(*mpi_, wrote);  // also a barrier: the directory exists from here on
  const auto ids = random_ids(901, c.vocab, 12);
  for (const DistTopology topo :
       {DistTopology{1, nccl_->size()}, DistTopology{2, nccl_->size() / 2}}) {
    if (topo.sp < 1 || c.n_kv_heads % topo.tp != 0) continue;
    gpu::CudaOptions o;
    o.device = device_;
    const ModelWeights host = load_model(dir);
    gpu::CudaBackend from_host(nccl_.get(), host, topo, o);
    gpu::CudaBackend from_path(nccl_.get(), dir, topo, o);
    EXPECT_FALSE(from_path.config().tie_word_embeddings);
    const auto a = from_host.prefill(ids, SparsePolicy::dense(), nullptr);
    const auto b = from_path.prefill(ids, SparsePolicy::dense(), nullptr);
    ASSERT_EQ(a.size(), b.size());
    ASSERT_FALSE(a.empty());
    int64_t differ = 0;
    for (size_t i = 0; i < a.size(); ++i) differ += !(a[i] == b[i]);
    std::printf("# hf slices rank %d tp %d sp %d: %lld of %zu logits differ\n", nccl_->rank(),
                topo.tp, topo.sp, static_cast<long long>(differ), a.size());
    EXPECT_EQ(differ, 0);
  }
  if (mpi_->rank() == 0) std::filesystem::remove_all(dir);
}

// A different model seed must not pass the comparison (the test can fail).
TEST_F(GpuDist, DifferentSeedIsDetected) {
  const ModelConfig c = test::small_gqa_config();
  const int64_t n = 777;  // >= 2 sp 64-token blocks per rank at sp 4
  const auto ids = random_ids(n, c.vocab, 5);
  std::vector<float> ref_logits;
  {
    gpu::CudaOptions o;
    o.device = device_;
    gpu::CudaBackend eng(nullptr, c, 31, DistTopology{}, o);
    ref_logits = eng.prefill(ids, SparsePolicy::dense(), nullptr);
  }
  gpu::CudaOptions o;
  o.device = device_;
  gpu::CudaBackend eng(nccl_.get(), c, 32, DistTopology{1, nccl_->size()}, o);
  const auto logits = eng.prefill(ids, SparsePolicy::dense(), nullptr);
  double dl = 0;
  for (size_t i = 0; i < ref_logits.size(); ++i)
    dl = std::max(dl, double(std::fabs(logits[i] - ref_logits[i])));
  EXPECT_GT(dl / max_abs(ref_logits), 0.1);
}

// The memory plan refuses a group's prefill before any work, with the numbers, on every
// rank (the same message source as one GPU).
TEST_F(GpuDist, MemoryPlanRefusesInGroup) {
  const ModelConfig c = test::small_gqa_config();
  gpu::CudaOptions o;
  o.device = device_;
  o.memory_limit = size_t{1} << 20;  // 1 MiB: too small for 4096 tokens
  gpu::CudaBackend eng(nccl_.get(), c, 3, DistTopology{1, nccl_->size()}, o);
  const gpu::MemoryPlan mp = eng.plan_memory(4096, SparsePolicy::dense());
  EXPECT_FALSE(mp.fits);
  EXPECT_EQ(mp.local_tokens * nccl_->size(), 4096);  // zigzag shards of equal size
  ShardSink sink(c, 4096);
  bool refused = false;
  try {
    eng.prefill(random_ids(4096, c.vocab, 1), SparsePolicy::dense(), &sink);
  } catch (const std::runtime_error& e) {
    refused = std::string(e.what()).find("GiB") != std::string::npos;
  }
  EXPECT_TRUE(refused);
  EXPECT_EQ(sink.puts_, 0);  // refused before the first layer
  expect_all_ranks_ok(*mpi_, refused);
}

TEST_F(GpuDist, BadTopologyAndPromptAreRefused) {
  const ModelConfig c = test::small_gqa_config();
  gpu::CudaOptions o;
  o.device = device_;
  EXPECT_THROW(gpu::CudaBackend(nccl_.get(), c, 1, DistTopology{1, 1}, o), std::runtime_error);
  // A group needs its communicator.
  EXPECT_THROW(gpu::CudaBackend(nullptr, c, 1, DistTopology{1, nccl_->size()}, o),
               std::runtime_error);
  gpu::CudaBackend eng(nccl_.get(), c, 1, DistTopology{1, nccl_->size()}, o);
  EXPECT_THROW(eng.prefill({1, 2, 3}, SparsePolicy::dense(), nullptr), std::runtime_error);
  EXPECT_THROW(eng.prefill(std::vector<int>(200, c.vocab), SparsePolicy::dense(), nullptr),
               std::runtime_error);
}

}  // namespace
}  // namespace mprefill
