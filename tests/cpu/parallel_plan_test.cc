#include "model/parallel_plan.h"

#include <gtest/gtest.h>

#include "model/sparse_policy.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

ModelConfig llama8b() { return named_shape("llama3-8b"); }

TEST(ParallelPlan, ZigzagCoversEveryTokenOnceOnBlockEdges) {
  for (int64_t n : {1, 63, 64, 65, 1000, 4099, 131072, 1000003}) {
    for (int sp : {1, 2, 3, 4, 8}) {
      auto shards = plan_sequence_parallel(n, sp);
      ASSERT_EQ(static_cast<int>(shards.size()), sp);
      std::vector<std::pair<int64_t, int64_t>> all;
      for (auto& s : shards)
        for (auto r : s) {
          EXPECT_LT(r.first, r.second);
          EXPECT_EQ(r.first % 64, 0) << "n=" << n << " sp=" << sp;
          all.push_back(r);
        }
      std::sort(all.begin(), all.end());
      int64_t pos = 0;
      for (auto [b, e] : all) {
        EXPECT_EQ(b, pos);
        pos = e;
      }
      EXPECT_EQ(pos, n);
    }
  }
}

TEST(ParallelPlan, ZigzagBalancesCausalWork) {
  const int64_t n = 1 << 20;
  for (int sp : {2, 4, 8}) {
    auto shards = plan_sequence_parallel(n, sp);
    int64_t mx = 0, sum = 0;
    for (auto& s : shards) {
      const int64_t t = causal_tiles(s);
      mx = std::max(mx, t);
      sum += t;
    }
    const int64_t nb = n / 64;
    EXPECT_EQ(sum, nb * (nb + 1) / 2);
    EXPECT_LT(static_cast<double>(mx) / (static_cast<double>(sum) / sp), 1.01) << "sp=" << sp;
  }
}

TEST(ParallelPlan, ExpectedTilesByPattern) {
  const int64_t n = 64 * 100;
  EXPECT_DOUBLE_EQ(expected_tiles(HeadPattern::dense(), n), 100.0 * 101 / 2);
  // A-shape 64 sink + 128 local: at most 1 + 2 + 1 tiles per block.
  EXPECT_DOUBLE_EQ(expected_tiles(HeadPattern::a_shape(64, 128), n), 1 + 2 + 3 + 4.0 * 97);
  EXPECT_DOUBLE_EQ(expected_tiles(HeadPattern::block_sparse(100), n), 100.0 * 101 / 2);
  EXPECT_LT(expected_tiles(HeadPattern::vertical_slash(30, 50), 1 << 20),
            expected_tiles(HeadPattern::vertical_slash(1000, 6096), 1 << 20));
}

TEST(ParallelPlan, TensorParallelBalancesTheLlamaMix) {
  const auto cfg = llama8b();
  const auto policy = load_sparse_policy(
      test::source_dir() +
          "/configs/minference/Llama_3_8B_Instruct_262k_kv_out_v32_fit_o_best_pattern.json",
      cfg);
  for (int tp : {1, 2, 4, 8}) {
    auto plan = plan_tensor_parallel(cfg, policy, 1 << 20, tp);
    ASSERT_EQ(static_cast<int>(plan.kv_heads.size()), cfg.n_layers);
    for (int l = 0; l < cfg.n_layers; ++l) {
      std::vector<int> seen;
      for (auto& r : plan.kv_heads[l]) {
        EXPECT_EQ(static_cast<int>(r.size()), cfg.n_kv_heads / tp);
        seen.insert(seen.end(), r.begin(), r.end());
      }
      std::sort(seen.begin(), seen.end());
      for (int g = 0; g < cfg.n_kv_heads; ++g) EXPECT_EQ(seen[g], g);
    }
    EXPECT_GE(plan.imbalance(), 1.0);
    if (tp == 1) {
      EXPECT_DOUBLE_EQ(plan.imbalance(), 1.0);
    }
    // Contiguous ranges would be worse or equal: the greedy plan never loses to them.
    double contiguous_max = 0, mean = 0;
    for (int l = 0; l < cfg.n_layers; ++l) {
      std::vector<double> load(tp, 0.0);
      for (int h = 0; h < cfg.n_heads; ++h)
        load[(h / (cfg.n_heads / cfg.n_kv_heads)) / (cfg.n_kv_heads / tp)] +=
            expected_tiles(policy.at(l, h, 1 << 20), 1 << 20);
      contiguous_max += *std::max_element(load.begin(), load.end());
      for (double x : load) mean += x / tp;
    }
    EXPECT_LE(plan.imbalance(), contiguous_max / mean + 1e-9) << "tp=" << tp;
  }
}

TEST(ParallelPlan, TensorParallelMustDivideKvHeads) {
  const auto cfg = llama8b();
  try {
    plan_tensor_parallel(cfg, SparsePolicy::dense(), 4096, 3);
    FAIL() << "tp=3 accepted for 8 KV heads";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("must divide the 8 KV heads"), std::string::npos);
  }
}

}  // namespace
}  // namespace mprefill
