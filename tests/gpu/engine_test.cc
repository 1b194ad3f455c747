// The CUDA backend on one GPU (engine/cuda/cuda_backend.h, tp 1 x sp 1, no communicator)
// against the CPU Engine on the same
// (bf16-rounded) weights: per-layer K / V and last-position logits for every pattern with
// the indices fixed (estimated once on the CPU, the PrefillPlan shared), the GPU
// estimation against CPU scores (equal except near-ties), the memory plan's refusal, the
// sinks, and stories15M greedy ids from a bf16 HF conversion.
#include "engine/engine.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_generate.h"
#include "engine/single_process.h"
#include "kernels/cpu/cpu.h"
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/flash/flash.h"
#include "kernels/cuda/sparse/sparse_attention.h"
#include "kv/cuda/kv_sinks.h"
#include "model/convert.h"
#include "tests/model_fixtures.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

bool gpu_or_skip() {
  if (cuda::has_gpu()) return true;
  return false;
}

#define REQUIRE_GPU()                                                         \
  do {                                                                        \
    if (!gpu_or_skip()) {                                                     \
      if (std::getenv("MPREFILL_REQUIRE_GPU"))                                \
        FAIL() << "MPREFILL_REQUIRE_GPU is set but no CUDA device is usable"; \
      GTEST_SKIP() << "no CUDA device: skipping";                             \
    }                                                                         \
  } while (0)

void round_bf16(Tensor& t) {
  for (float& x : t.data) x = bf16_to_f32(f32_to_bf16(x));
}

// Random weights, query/key projections scaled up so attention is peaked (estimation has
// something to find), every value rounded to bf16 so both engines see the same model.
ModelWeights small_model(uint64_t seed) {
  ModelWeights w = random_model(test::small_gqa_config(), seed);
  for (LayerWeights& L : w.layers) {
    for (float& x : L.wq.data) x *= 6.f;
    for (float& x : L.wk.data) x *= 6.f;
    for (Tensor* t :
         {&L.attn_norm, &L.wq, &L.wk, &L.wv, &L.wo, &L.ffn_norm, &L.w_gate, &L.w_up, &L.w_down})
      round_bf16(*t);
  }
  round_bf16(w.embed);
  round_bf16(w.final_norm);
  if (!w.lm_head.empty()) round_bf16(w.lm_head);
  return w;
}

std::vector<int> random_ids(int64_t n, int vocab, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::vector<int> ids(n);
  for (auto& x : ids) x = static_cast<int>(g() % vocab);
  return ids;
}

// max|a - b| / max|b| over one layer's cache rows.
double rel_err(const std::vector<float>& a, const std::vector<float>& b, size_t n) {
  double m = 0, d = 0;
  for (size_t i = 0; i < n; ++i) {
    m = std::max(m, std::fabs(double(b[i])));
    d = std::max(d, std::fabs(double(a[i]) - b[i]));
    if (!std::isfinite(a[i])) return 1e30;
  }
  return m > 0 ? d / m : d;
}

struct Compared {
  double k_err = 0, v_err = 0, logit_err = 0;
  int cpu_argmax = -1, gpu_argmax = -1;
};

Compared compare_engines(const ModelWeights& w, const std::vector<int>& ids,
                         const SparsePolicy& policy, PrefillPlan* plan) {
  const ModelConfig& c = w.config;
  const int64_t n = static_cast<int64_t>(ids.size());
  Engine cpu(w);
  KvCache ccache(c, n);
  const std::vector<float> cl = cpu.prefill(ids, policy, &ccache, plan);

  gpu::CudaBackend eng(nullptr, w);
  KvCache gcache(c, n);
  gpu::HostKvCacheSink sink(&gcache);
  gpu::CudaPrefillStats st;
  const std::vector<float> gl = eng.prefill(ids, policy, &sink, plan, &st);
  EXPECT_EQ(sink.layers_received(), c.n_layers);
  EXPECT_EQ(gcache.n_tokens, n);
  EXPECT_EQ(st.plan_reused, plan != nullptr);

  Compared r;
  const size_t cnt = static_cast<size_t>(n) * c.kv_dim();
  for (int l = 0; l < c.n_layers; ++l) {
    r.k_err = std::max(r.k_err, rel_err(gcache.k[l], ccache.k[l], cnt));
    r.v_err = std::max(r.v_err, rel_err(gcache.v[l], ccache.v[l], cnt));
  }
  r.logit_err = rel_err(gl, cl, cl.size());
  r.cpu_argmax = static_cast<int>(std::max_element(cl.begin(), cl.end()) - cl.begin());
  r.gpu_argmax = static_cast<int>(std::max_element(gl.begin(), gl.end()) - gl.begin());
  std::printf("# n=%lld policy=%s: K err %.3g, V err %.3g, logits err %.3g, argmax cpu %d gpu %d\n",
              static_cast<long long>(n), policy.source.c_str(), r.k_err, r.v_err, r.logit_err,
              r.cpu_argmax, r.gpu_argmax);
  return r;
}

// bf16 activations (Q/K/V, normed inputs, attention output, MLP) against fp32: ~1e-2.
constexpr double kKvTol = 2.5e-2, kLogitTol = 4e-2;

TEST(CudaBackend, DenseMatchesCpu) {
  REQUIRE_GPU();
  const ModelWeights w = small_model(11);
  const auto ids = random_ids(333, w.config.vocab, 5);
  const Compared r = compare_engines(w, ids, SparsePolicy::dense(), nullptr);
  EXPECT_LT(r.k_err, kKvTol);
  EXPECT_LT(r.v_err, kKvTol);
  EXPECT_LT(r.logit_err, kLogitTol);
}

// Every pattern, indices estimated once on the CPU and shared: the GPU must reproduce the
// CPU's masked attention, so K / V of layer 1 and the logits agree to bf16 accuracy.
TEST(CudaBackend, EveryPatternWithSharedPlanMatchesCpu) {
  REQUIRE_GPU();
  if (!cuda::sparse_attention_supported(DType::kBF16, 128)) GTEST_SKIP() << "no sparse kernels";
  const ModelWeights w = small_model(12);
  const SparsePolicy policy = test::gqa_split_policy(w.config);
  for (int64_t n : {200, 451}) {
    const auto ids = random_ids(n, w.config.vocab, 6 + n);
    PrefillPlan plan;  // filled by the CPU prefill, then reused by the GPU one
    const Compared r = compare_engines(w, ids, policy, &plan);
    ASSERT_EQ(plan.layers.size(), 2u);
    EXPECT_EQ(plan.layers[0][2].kind, PatternKind::kVerticalSlash);
    EXPECT_FALSE(plan.layers[0][2].vs.offsets.empty());
    EXPECT_EQ(plan.layers[0][3].kind, PatternKind::kBlockSparse);
    EXPECT_LT(r.k_err, kKvTol) << "n=" << n;
    EXPECT_LT(r.v_err, kKvTol) << "n=" << n;
    EXPECT_LT(r.logit_err, kLogitTol) << "n=" << n;
  }
}

// The sparse masks matter: the same model under the all-dense policy gives layer-1 KV
// far from the sparse run (so the comparison above can fail).
TEST(CudaBackend, SparsePlanChangesTheResult) {
  REQUIRE_GPU();
  if (!cuda::sparse_attention_supported(DType::kBF16, 128)) GTEST_SKIP() << "no sparse kernels";
  const ModelWeights w = small_model(12);
  const auto ids = random_ids(451, w.config.vocab, 6 + 451);
  gpu::CudaBackend eng(nullptr, w);
  KvCache a(w.config, 451), b(w.config, 451);
  gpu::HostKvCacheSink sa(&a), sb(&b);
  const auto la = eng.prefill(ids, SparsePolicy::dense(), &sa);
  const auto lb = eng.prefill(ids, test::gqa_split_policy(w.config), &sb);
  EXPECT_GT(rel_err(lb, la, la.size()), 1e-2);
  EXPECT_GT(rel_err(b.k[1], a.k[1], a.k[1].size()), 1e-2);
}

// Layer-0 query of the CPU reference (the estimation input), fp32.
std::vector<float> layer0_q(const ModelWeights& w, const std::vector<int>& ids) {
  const ModelConfig& c = w.config;
  const int64_t n = ids.size();
  std::vector<float> x(n * c.hidden), xb(n * c.hidden), q(n * c.q_dim());
  cpu::embedding(w.embed.data.data(), c.vocab, c.hidden, ids.data(), n, x.data());
  cpu::rmsnorm(x.data(), w.layers[0].attn_norm.data.data(), xb.data(), n, c.hidden, c.rms_eps);
  cpu::gemm_xwt(xb.data(), w.layers[0].wq.data.data(), nullptr, q.data(), n, c.hidden, c.q_dim());
  const auto inv = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling);
  cpu::rope(q.data(), n, c.n_heads, c.head_dim, c.q_dim(), c.head_dim, nullptr, 0, inv,
            c.rope_style);
  return q;
}

// A selected set differs from the reference only by near-ties: every index chosen by one
// side and not the other scores within tol of the reference's cut-off.
void expect_equal_but_near_ties(const std::vector<int>& got, const std::vector<int>& ref,
                                const std::vector<float>& score, int forced, double tol,
                                const std::string& what) {
  const std::set<int> g(got.begin(), got.end()), r(ref.begin(), ref.end());
  float cut = INFINITY;
  for (int i : r)
    if (i >= forced) cut = std::min(cut, score[i]);
  int diff = 0;
  for (int i : g)
    if (!r.count(i)) {
      ++diff;
      EXPECT_LE(std::fabs(score[i] - cut), tol * std::max(1.f, std::fabs(cut)))
          << what << ": GPU chose " << i << " (score " << score[i] << ", cut " << cut << ")";
    }
  for (int i : r)
    if (!g.count(i)) {
      ++diff;
      EXPECT_LE(std::fabs(score[i] - cut), tol * std::max(1.f, std::fabs(cut)))
          << what << ": GPU missed " << i << " (score " << score[i] << ", cut " << cut << ")";
    }
  EXPECT_EQ(g.size(), r.size()) << what;
  EXPECT_LE(diff, static_cast<int>(r.size()) / 4) << what << ": too many differences";
}

// Estimation on the GPU (filled plan) against the CPU's scores of layer 0 computed from
// the CPU engine's K and query: selections equal except near-ties.
TEST(CudaBackend, EstimationMatchesCpuScores) {
  REQUIRE_GPU();
  if (!cuda::sparse_attention_supported(DType::kBF16, 128)) GTEST_SKIP() << "no sparse kernels";
  const ModelWeights w = small_model(13);
  const ModelConfig& c = w.config;
  const int64_t n = 700;
  const auto ids = random_ids(n, c.vocab, 77);
  SparsePolicy policy = SparsePolicy::uniform(c, HeadPattern::vertical_slash(60, 120), 0);
  gpu::CudaBackend eng(nullptr, w);
  PrefillPlan gplan;
  gpu::NullKvSink sink;
  eng.prefill(ids, policy, &sink, &gplan);
  EXPECT_EQ(sink.layers(), c.n_layers);
  ASSERT_EQ(gplan.layers.size(), size_t(c.n_layers));

  Engine cpu(w);
  KvCache cache(c, n);
  PrefillPlan cplan;
  cpu.prefill(ids, policy, &cache, &cplan);
  const std::vector<float> q = layer0_q(w, ids);
  const int n_last = 64, group = c.n_heads / c.n_kv_heads;
  for (int h = 0; h < c.n_heads; ++h) {
    VsEstimateParams e;
    e.q_last = q.data() + (n - n_last) * c.q_dim() + h * c.head_dim;
    e.k = cache.k[0].data() + (h / group) * c.head_dim;
    e.q_row_stride = c.q_dim();
    e.q_head_stride = c.head_dim;
    e.k_row_stride = c.kv_dim();
    e.k_head_stride = c.head_dim;
    e.n_last = n_last;
    e.seq_len = n;
    e.n_k = static_cast<int>(n);
    e.num_heads = e.num_kv_heads = 1;
    e.head_dim = c.head_dim;
    e.scale = 1.f / std::sqrt(float(c.head_dim));
    RowStats rs;
    ASSERT_EQ(cpu::vs_row_stats(e, &rs), Status::kOk);
    std::vector<float> col(n, 0.f), slash(n, 0.f);
    ASSERT_EQ(cpu::vs_scores(e, rs, col.data(), slash.data()), Status::kOk);
    const HeadPlan& g = gplan.layers[0][h];
    const HeadPlan& r = cplan.layers[0][h];
    ASSERT_EQ(g.kind, PatternKind::kVerticalSlash);
    // Scores are sums of softmax probabilities over 64 rows (<= 64); bf16 Q/K move them by
    // ~1e-2 relative.
    expect_equal_but_near_ties(g.vs.columns, r.vs.columns, col, kForcedColumns, 3e-2,
                               "head " + std::to_string(h) + " columns");
    std::vector<float> slash_by_offset = slash;  // indexed by offset d
    expect_equal_but_near_ties(g.vs.offsets, r.vs.offsets, slash_by_offset, kForcedOffsets, 3e-2,
                               "head " + std::to_string(h) + " offsets");
  }
  // Layer 1 from the GPU: valid selections of the clamped budgets.
  for (int h = 0; h < c.n_heads; ++h) {
    const HeadPlan& g = gplan.layers[1][h];
    EXPECT_EQ(g.vs.columns.size(), size_t(clamp_vertical_budget(60, n)));
    EXPECT_EQ(g.vs.offsets.size(), size_t(clamp_slash_budget(120, n)));
    EXPECT_TRUE(std::is_sorted(g.vs.columns.begin(), g.vs.columns.end()));
    EXPECT_EQ(g.vs.offsets.back(), 0);
  }
}

// Adaptive vertical-slash heads (tau) select on the device: the layer-0 counts follow the
// CPU engine's mass cut (bf16 Q/K move scores by ~1e-2, so a count may differ by a few),
// tau really cuts below the caps, and adaptive block-sparse heads are refused in one line.
TEST(CudaBackend, AdaptiveVerticalSlashFollowsCpuMassCut) {
  REQUIRE_GPU();
  if (!cuda::sparse_attention_supported(DType::kBF16, 128)) GTEST_SKIP() << "no sparse kernels";
  const ModelWeights w = small_model(15);
  const ModelConfig& c = w.config;
  const int64_t n = 900;
  const auto ids = random_ids(n, c.vocab, 79);
  const SparsePolicy policy =
      SparsePolicy::uniform(c, HeadPattern::vertical_slash(400, 600, 0.8), 0);
  gpu::CudaBackend eng(nullptr, w);
  PrefillPlan gplan;
  gpu::NullKvSink sink;
  eng.prefill(ids, policy, &sink, &gplan);
  Engine cpu(w);
  KvCache cache(c, n);
  PrefillPlan cplan;
  cpu.prefill(ids, policy, &cache, &cplan);
  int cut = 0;
  for (int h = 0; h < c.n_heads; ++h) {
    const HeadPlan& g = gplan.layers[0][h];
    const HeadPlan& r = cplan.layers[0][h];
    const std::string what = "head " + std::to_string(h);
    ASSERT_EQ(g.kind, PatternKind::kVerticalSlash) << what;
    const auto near = [](size_t a, size_t b) {
      return std::abs(static_cast<long>(a) - static_cast<long>(b)) <= 2 + static_cast<long>(b) / 10;
    };
    EXPECT_TRUE(near(g.vs.columns.size(), r.vs.columns.size()))
        << what << " columns " << g.vs.columns.size() << " vs cpu " << r.vs.columns.size();
    EXPECT_TRUE(near(g.vs.offsets.size(), r.vs.offsets.size()))
        << what << " offsets " << g.vs.offsets.size() << " vs cpu " << r.vs.offsets.size();
    EXPECT_GE(g.vs.columns.size(), size_t(kForcedColumns)) << what;
    EXPECT_TRUE(std::is_sorted(g.vs.columns.begin(), g.vs.columns.end())) << what;
    cut += g.vs.columns.size() < size_t(clamp_vertical_budget(400, n));
  }
  EXPECT_GT(cut, 0) << "tau 0.8 never cut a head below its column cap";

  // Adaptive and antidiagonal block-sparse heads: refused in one line by check_policy on
  // the single-process path (the search's retrieval prefill); the executor path refuses in
  // check_request (tests/mpi/executor_test.cc).
  const CachePrefill pf = make_cache_prefill(Backend::kCuda, 0, cpu);
  const SparsePolicy bs = SparsePolicy::uniform(c, HeadPattern::block_sparse(4, 0.9), 0);
  const SparsePolicy ad = SparsePolicy::uniform(c, HeadPattern::block_sparse(4, 0, 8), 0);
  for (const auto& [pol, what] :
       {std::pair{&bs, "adaptive block-sparse"}, std::pair{&ad, "antidiagonal"}}) {
    try {
      pf(ids, *pol, nullptr, nullptr);
      ADD_FAILURE() << what << " heads ran on the CUDA engine";
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("cuda executor (one GPU): "), std::string::npos)
          << e.what();
    }
  }
}

// Block-sparse estimation on the GPU uses the CPU's order of operations (bit-equal scores
// on equal inputs); through the engine the inputs differ by bf16 rounding, so the lists
// of layer 0 must agree on most blocks and always hold the diagonal.
TEST(CudaBackend, BlockSparseEstimationCloseToCpu) {
  REQUIRE_GPU();
  if (!cuda::sparse_attention_supported(DType::kBF16, 128)) GTEST_SKIP() << "no sparse kernels";
  const ModelWeights w = small_model(14);
  const ModelConfig& c = w.config;
  const int64_t n = 1000;
  const auto ids = random_ids(n, c.vocab, 78);
  const SparsePolicy policy = SparsePolicy::uniform(c, HeadPattern::block_sparse(4), 0);
  gpu::CudaBackend eng(nullptr, w);
  PrefillPlan gplan;
  eng.prefill(ids, policy, nullptr, &gplan);
  Engine cpu(w);
  KvCache cache(c, n);
  PrefillPlan cplan;
  cpu.prefill(ids, policy, &cache, &cplan);
  const int64_t nb = num_blocks(n);
  int same = 0, total = 0;
  for (int h = 0; h < c.n_heads; ++h) {
    const HeadPlan& g = gplan.layers[0][h];
    const HeadPlan& r = cplan.layers[0][h];
    ASSERT_EQ(g.topk, 4);
    ASSERT_EQ(g.blocks.size(), size_t(nb * 4));
    for (int64_t b = 0; b < nb; ++b) {
      std::set<int> gs(g.blocks.begin() + b * 4, g.blocks.begin() + b * 4 + 4);
      EXPECT_TRUE(gs.count(static_cast<int>(b))) << "diagonal block missing";
      for (int j = 0; j < 4; ++j) {
        const int x = r.blocks[b * 4 + j];
        if (x < 0) continue;
        ++total;
        same += gs.count(x) ? 1 : 0;
      }
    }
  }
  EXPECT_GE(same, total * 9 / 10) << same << " of " << total << " blocks agree";
}

TEST(CudaBackend, MemoryPlanRefusesBeforeWork) {
  REQUIRE_GPU();
  const ModelWeights w = small_model(15);
  gpu::CudaOptions opt;
  opt.memory_limit = size_t{1} << 20;  // 1 MiB: too small for 4096 tokens
  gpu::CudaBackend eng(nullptr, w, DistTopology{}, opt);
  const gpu::MemoryPlan mp = eng.plan_memory(4096, SparsePolicy::dense());
  EXPECT_FALSE(mp.fits);
  EXPECT_GT(mp.workspace, mp.available);
  EXPECT_GE(mp.activations, size_t(4096) * w.config.hidden * 4);  // fp32 residual at least
  gpu::NullKvSink sink;
  try {
    eng.prefill(random_ids(4096, w.config.vocab, 1), SparsePolicy::dense(), &sink);
    FAIL() << "prefill should be refused";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("GiB"), std::string::npos) << e.what();
  }
  EXPECT_EQ(sink.layers(), 0);  // refused before the first layer
  // Bad ids are refused as well.
  EXPECT_THROW(eng.prefill({1, w.config.vocab}, SparsePolicy::dense(), &sink), std::runtime_error);
  EXPECT_THROW(eng.prefill({}, SparsePolicy::dense(), &sink), std::runtime_error);
}

// A group topology needs a communicator: refused with one message before any device work
// (runs without a GPU too).
TEST(CudaBackend, GroupWithoutCommunicatorIsRefused) {
  const ModelWeights w = small_model(17);
  try {
    gpu::CudaBackend eng(nullptr, w, DistTopology{1, 2});
    FAIL() << "a tp 1 x sp 2 backend without a communicator was built";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("needs a communicator"), std::string::npos) << e.what();
  }
}

// The streaming sink's host copies equal what the host-cache sink received.
TEST(CudaBackend, PinnedSinkKeepsEveryLayer) {
  REQUIRE_GPU();
  const ModelWeights w = small_model(16);
  const ModelConfig& c = w.config;
  const int64_t n = 257;
  const auto ids = random_ids(n, c.vocab, 9);
  gpu::CudaBackend eng(nullptr, w);
  KvCache cache(c, n);
  gpu::HostKvCacheSink hs(&cache);
  eng.prefill(ids, SparsePolicy::dense(), &hs);
  gpu::PinnedStreamSink ps(c.n_layers, n, c.kv_dim(), true);
  eng.prefill(ids, SparsePolicy::dense(), &ps);
  EXPECT_EQ(ps.bytes_copied(), int64_t(2) * c.n_layers * n * c.kv_dim() * 2);
  for (int l = 0; l < c.n_layers; ++l)
    for (int64_t i = 0; i < n * c.kv_dim(); i += 7) {
      ASSERT_EQ(bf16_to_f32(ps.host_k(l)[i]), cache.k[l][i]) << "layer " << l << " i " << i;
      ASSERT_EQ(bf16_to_f32(ps.host_v(l)[i]), cache.v[l][i]) << "layer " << l << " i " << i;
    }
}

// stories15M: a bf16 HF conversion on the GPU (prefill) + CPU decode gives the golden
// greedy ids of ../shared/models/stories15M/README.md.
TEST(CudaBackend, Stories15MGreedyIds) {
  REQUIRE_GPU();
  std::string dir;
  std::string tmp;
  if (!cuda::flash_attention_supported(DType::kBF16, 48))
    GTEST_SKIP() << "this build has no head_dim 48 attention (MPREFILL_CUDA_SUBSET)";
  // The conversion carried to the GPU machine (../shared does not travel there).
  const std::string carried = test::source_dir() + "/.carry/gpuengine/stories15M-bf16";
  if (const char* env = std::getenv("MPREFILL_STORIES15M_HF")) {
    dir = env;
    if (!test::file_exists(dir + "/config.json"))
      FAIL() << "MPREFILL_STORIES15M_HF=" << dir << " has no config.json";
  } else if (test::file_exists(carried + "/config.json")) {
    dir = carried;
  } else {
    const std::string bin = test::shared_dir() + "/models/stories15M/stories15M.bin";
    if (!test::file_exists(bin))
      GTEST_SKIP() << "no MPREFILL_STORIES15M_HF (bf16 HF conversion) and "
                   << test::missing_file(bin);
    tmp = (std::filesystem::temp_directory_path() / "mprefill_gpu_s15_XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmp.data()), nullptr);
    dir = tmp + "/hf";
    ConvertOptions opt;
    opt.dtype = DType::kBF16;
    convert_llama2c_to_hf(bin, dir, opt);
  }
  const ModelWeights w = load_model(dir);
  if (!tmp.empty()) std::filesystem::remove_all(tmp);
  GenerateOptions opt;
  opt.decode_steps = 7;
  const GenerateResult r = gpu::generate_cuda(w, {1, 9038, 2501, 263, 931}, opt);
  const std::vector<int> expect = {29892, 727, 471, 263, 2217, 7826, 4257, 365};
  EXPECT_EQ(r.generated_ids, expect);
  EXPECT_NEAR(r.first_token_logit, 18.3597, 0.3);
}

}  // namespace
}  // namespace mprefill
