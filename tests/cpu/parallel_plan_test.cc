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

// The one placement rule (coordinator per job; an executor without a given placement):
// contiguous while it is within 1.10 of balanced, the greedy plan when the policy skews
// the heads and the group can run any placement, contiguous always for one that cannot.
TEST(ParallelPlan, PlaceKvHeadsKeepsContiguousUntilTheBalanceAsks) {
  const auto cfg = llama8b();
  const int64_t n = 1 << 20;
  const TpPlan c = contiguous_tensor_parallel(cfg, SparsePolicy::dense(), n, 4);
  EXPECT_TRUE(is_contiguous(c, cfg));
  EXPECT_EQ(c.kv_heads[5][1], (std::vector<int>{2, 3}));
  EXPECT_DOUBLE_EQ(c.imbalance(), 1.0);
  EXPECT_NO_THROW(check_tp_placement(c, cfg, 4));
  // Dense: contiguous whatever the group can run.
  for (bool any : {false, true})
    EXPECT_TRUE(is_contiguous(place_kv_heads(cfg, SparsePolicy::dense(), n, 4, nullptr, any), cfg));

  // The first two KV groups (8 query heads) of every layer dense, the rest A-shape: the
  // contiguous placement puts both dense groups on rank 0.
  SparsePolicy skew = SparsePolicy::uniform(cfg, HeadPattern::a_shape(64, 1024), 0);
  for (int l = 0; l < cfg.n_layers; ++l)
    for (int h = 0; h < 8; ++h) skew.heads[l * cfg.n_heads + h] = HeadPattern::dense();
  const TpPlan cs = placement_cost(c, cfg, skew, n);
  EXPECT_GT(cs.imbalance(), 1.5);
  const TpPlan any = place_kv_heads(cfg, skew, n, 4, nullptr, true);
  EXPECT_FALSE(is_contiguous(any, cfg));
  EXPECT_NO_THROW(check_tp_placement(any, cfg, 4));
  EXPECT_LT(any.imbalance(), cs.imbalance());
  EXPECT_NEAR(any.imbalance(), plan_tensor_parallel(cfg, skew, n, 4).imbalance(), 1e-9);
  EXPECT_DOUBLE_EQ(placement_cost(any, cfg, skew, n).imbalance(), any.imbalance());
  const TpPlan fixed = place_kv_heads(cfg, skew, n, 4, &any, false);
  EXPECT_TRUE(is_contiguous(fixed, cfg));
  EXPECT_NEAR(fixed.imbalance(), cs.imbalance(), 1e-9);
  // A balanced current placement is kept (no slices re-read for the next dense job), and
  // one off by more than the threshold is replaced.
  EXPECT_EQ(place_kv_heads(cfg, SparsePolicy::dense(), n, 4, &any, true).kv_heads, any.kv_heads);
  EXPECT_EQ(place_kv_heads(cfg, skew, n, 4, &c, true).kv_heads, any.kv_heads);
}

TEST(ParallelPlan, CheckTpPlacementNamesTheFirstFault) {
  const auto cfg = llama8b();  // 32 layers, 8 KV heads
  auto refusal = [&](const TpPlan& p, int tp) -> std::string {
    try {
      check_tp_placement(p, cfg, tp);
    } catch (const std::runtime_error& e) {
      return e.what();
    }
    return "";
  };
  const TpPlan good = contiguous_tensor_parallel(cfg, SparsePolicy::dense(), 4096, 2);
  EXPECT_EQ(refusal(good, 2), "");
  EXPECT_EQ(refusal(good, 4), "KV-head placement over tp 4: it is one over tp 2");
  TpPlan p = good;
  p.kv_heads.pop_back();
  EXPECT_EQ(refusal(p, 2), "KV-head placement over tp 2: it has 31 layers, the model 32");
  p = good;
  p.kv_heads[7][1] = {4, 5, 6};
  EXPECT_EQ(refusal(p, 2), "KV-head placement over tp 2: layer 7: rank 1 holds 3 KV heads, not 4");
  p = good;
  p.kv_heads[3][0] = {0, 2, 1, 3};
  EXPECT_EQ(refusal(p, 2),
            "KV-head placement over tp 2: layer 3: rank 0's KV heads are not ascending");
  p = good;
  p.kv_heads[3][0] = {0, 1, 2, 4};
  EXPECT_EQ(refusal(p, 2), "KV-head placement over tp 2: layer 3: KV head 4 is placed twice");
  p = good;
  p.kv_heads[0][1] = {4, 5, 6, 8};
  EXPECT_EQ(refusal(p, 2), "KV-head placement over tp 2: layer 0: KV head 8 is not one of 0..7");
  p = good;
  p.kv_heads[2].pop_back();
  EXPECT_EQ(refusal(p, 2), "KV-head placement over tp 2: layer 2: 1 ranks");
  EXPECT_NE(refusal(good, 3).find("must divide the 8 KV heads"), std::string::npos);
}

}  // namespace
}  // namespace mprefill
