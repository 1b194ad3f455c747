// One layer forward for every CPU path (engine/cpu_layer.h): on the same random model and
// prompt, Engine::prefill (DistEngine over the one-rank group, weights read in place),
// DistEngine at tp 1 x sp 1 over MPI (mpirun -np 1, weights loaded by path), the pattern
// search's capture_qkv and the dense single-process forward of decode steps
// (local_forward with a KV cache) give bit-identical K / V of every layer and logits, and
// the capture's Q equals the Q local_forward hands its attention. Dense and a sparse mix
// (indices estimated, then fixed).
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu_local.h"
#include "engine/dist_engine.h"
#include "kv/kv_cache_sink.h"
#include "model/weights.h"
#include "search/pattern_search.h"
#include "tests/model_fixtures.h"
#include "tests/mpi/mpi_testutil.h"

namespace mprefill {
namespace {

constexpr const char* kModel = "random:tiny:7";

std::vector<int> random_ids(int64_t n, int vocab, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_int_distribution<int> d(0, vocab - 1);
  std::vector<int> ids(n);
  for (auto& x : ids) x = d(g);
  return ids;
}

// Bitwise equality of the first n floats; the first differing index in the message.
::testing::AssertionResult same_bits(const float* a, const float* b, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (std::memcmp(a + i, b + i, sizeof(float)) != 0)
      return ::testing::AssertionFailure()
             << "index " << i << " of " << n << ": " << a[i] << " vs " << b[i];
  return ::testing::AssertionSuccess();
}

struct EngineRun {
  std::vector<float> logits;
  KvCache cache;
  PrefillPlan plan;
};

EngineRun engine_prefill(const ModelWeights& w, const std::vector<int>& ids,
                         const SparsePolicy& policy) {
  EngineRun r;
  r.cache = KvCache(w.config, static_cast<int64_t>(ids.size()));
  r.logits = Engine(w).prefill(ids, policy, &r.cache, &r.plan);
  return r;
}

// DistEngine tp 1 x sp 1 against the Engine run: logits and every layer's K / V bitwise.
void expect_dist_equals(const std::vector<int>& ids, const SparsePolicy& policy,
                        const EngineRun& ref, PrefillPlan* plan) {
  auto c = test::mpi::world();
  ASSERT_EQ(c->size(), 1) << "this suite runs on one rank";
  DistEngine de(c.get(), kModel, DistTopology{1, 1});
  const ModelConfig& cfg = de.config();
  const int64_t n = static_cast<int64_t>(ids.size());
  KvCache got(cfg, n);
  KvCacheSink sink(&got, cfg.head_dim);
  const DistPrefillResult res = de.prefill(ids, policy, &sink, plan);
  ASSERT_EQ(res.logits.size(), ref.logits.size());
  EXPECT_TRUE(same_bits(res.logits.data(), ref.logits.data(), ref.logits.size())) << "logits";
  for (int l = 0; l < cfg.n_layers; ++l) {
    const size_t count = static_cast<size_t>(n * cfg.kv_dim());
    EXPECT_TRUE(same_bits(got.k[l].data(), ref.cache.k[l].data(), count)) << "K layer " << l;
    EXPECT_TRUE(same_bits(got.v[l].data(), ref.cache.v[l].data(), count)) << "V layer " << l;
  }
}

TEST(OneLayerForward, EngineDistAndCaptureAgreeBitwiseDense) {
  const ModelWeights w = load_model(kModel);
  const ModelConfig& cfg = w.config;
  const std::vector<int> ids = random_ids(333, cfg.vocab, 5);
  const int64_t n = static_cast<int64_t>(ids.size());
  const EngineRun ref = engine_prefill(w, ids, SparsePolicy::dense());

  // The capture: Q / K / V of every layer before its attention, then the logits.
  std::vector<std::vector<float>> cq(cfg.n_layers), ck(cfg.n_layers), cv(cfg.n_layers);
  const std::vector<float> clogits =
      capture_qkv(w, ids, [&](int l, const float* q, const float* k, const float* v) {
        cq[l].assign(q, q + n * cfg.q_dim());
        ck[l].assign(k, k + n * cfg.kv_dim());
        cv[l].assign(v, v + n * cfg.kv_dim());
      });
  EXPECT_TRUE(same_bits(clogits.data(), ref.logits.data(), ref.logits.size())) << "logits";
  // The dense single-process forward (decode steps' path, KV in a cache), observed before
  // each attention.
  const std::vector<double> inv_freq =
      rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling);
  KvCache cache(cfg, n);
  int observed = 0;
  LocalAttentionParams a;
  a.config = &cfg;
  a.n = n;
  a.cache = &cache;
  a.observe = [&](int l, const float* q, const float*, const float*) {
    ++observed;
    EXPECT_TRUE(same_bits(q, cq[l].data(), cq[l].size())) << "Q layer " << l;
  };
  const std::vector<float> elogits =
      local_forward(w, inv_freq, EngineOptions{}.mlp_chunk, ids.data(), a);
  EXPECT_EQ(observed, cfg.n_layers);
  EXPECT_TRUE(same_bits(elogits.data(), ref.logits.data(), ref.logits.size()));
  for (int l = 0; l < cfg.n_layers; ++l) {
    EXPECT_TRUE(same_bits(ck[l].data(), ref.cache.k[l].data(), ck[l].size())) << "K layer " << l;
    EXPECT_TRUE(same_bits(cv[l].data(), ref.cache.v[l].data(), cv[l].size())) << "V layer " << l;
  }
  PrefillPlan plan;
  expect_dist_equals(ids, SparsePolicy::dense(), ref, &plan);
}

TEST(OneLayerForward, EngineAndDistAgreeBitwiseSparseMix) {
  const ModelWeights w = load_model(kModel);
  const std::vector<int> ids = random_ids(777, w.config.vocab, 6);
  const SparsePolicy policy =
      test::mixed_policy(w.config, HeadPattern::a_shape(64, 100),
                         HeadPattern::vertical_slash(60, 150), HeadPattern::block_sparse(3), 128);
  const EngineRun ref = engine_prefill(w, ids, policy);
  // Estimated by DistEngine (its plan must equal the engine's), then fixed.
  PrefillPlan estimated;
  expect_dist_equals(ids, policy, ref, &estimated);
  ASSERT_EQ(estimated.layers.size(), ref.plan.layers.size());
  for (size_t l = 0; l < estimated.layers.size(); ++l)
    for (size_t h = 0; h < estimated.layers[l].size(); ++h) {
      const HeadPlan &x = estimated.layers[l][h], &y = ref.plan.layers[l][h];
      EXPECT_TRUE(x.kind == y.kind && x.vs.columns == y.vs.columns &&
                  x.vs.offsets == y.vs.offsets && x.topk == y.topk && x.blocks == y.blocks)
          << "layer " << l << " head " << h;
    }
  PrefillPlan fixed = ref.plan;
  expect_dist_equals(ids, policy, ref, &fixed);
}

}  // namespace
}  // namespace mprefill
