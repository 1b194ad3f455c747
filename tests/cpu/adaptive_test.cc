// The accuracy-adaptive sparse policy (issue 18 deliverables 1 and 4): cumulative-mass
// selection on hand-built scores and against a brute-force search, the caps, vertical-slash
// and block-sparse estimation with thresholds, tau = 1 equal to dense on a random model,
// the config format (MInference files unchanged, thresholds, one-line errors), and the
// CLI's adaptive policy with --audit-heads.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "kernels/cpu/cpu.h"
#include "model/sparse_policy.h"
#include "model/weights.h"
#include "tests/model_fixtures.h"
#include "tests/testutil.h"

namespace mprefill {
namespace {

double mass_of(const std::vector<int>& set, const std::vector<float>& m) {
  double s = 0;
  for (int i : set) s += m[i];
  return s;
}

std::vector<int> sorted(std::vector<int> v) {
  std::sort(v.begin(), v.end());
  return v;
}

// ---------------------------------------------------------------- selection

TEST(AdaptiveSelect, HandBuiltScoresReachTauAtTheSmallestSet) {
  // Exact binary fractions (total 1), shuffled over the positions; 6 has no mass.
  const std::vector<float> s = {0.125f, 0.5f, 0.0625f, 0.25f, 0.0625f, 0.f};
  auto pick = [&](double tau, int64_t cap = 6) {
    return sorted(cpu::select_by_mass(s.data(), s.data(), 6, 0, 0, cap, tau));
  };
  EXPECT_EQ(pick(0.5), (std::vector<int>{1}));
  EXPECT_EQ(pick(0.5000001), (std::vector<int>{1, 3}));
  EXPECT_EQ(pick(0.75), (std::vector<int>{1, 3}));
  EXPECT_EQ(pick(0.8), (std::vector<int>{0, 1, 3}));
  EXPECT_EQ(pick(0.875), (std::vector<int>{0, 1, 3}));
  // Ties (2 and 4) go to the lower index.
  EXPECT_EQ(pick(0.9), (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(pick(0.9375), (std::vector<int>{0, 1, 2, 3}));
  // tau = 1 keeps every entry with mass and nothing else.
  EXPECT_EQ(pick(1.0), (std::vector<int>{0, 1, 2, 3, 4}));
  // tau = 1 when the sum in rank order (1 + 2^-54 four times: 1) falls short of the total
  // in index order (1 + 2^-52): the positive entries, not the massless ones after them.
  const float t = std::ldexp(1.f, -54);
  const std::vector<float> r = {t, t, t, t, 1.f, 0.f, 0.f};
  EXPECT_EQ(sorted(cpu::select_by_mass(r.data(), r.data(), 7, 0, 0, 7, 1.0)),
            (std::vector<int>{0, 1, 2, 3, 4}));
  // The cap wins over tau; tau = 0 is the fixed budget (the cap's best).
  EXPECT_EQ(pick(0.9, 2), (std::vector<int>{1, 3}));
  EXPECT_EQ(pick(0.0, 3), (std::vector<int>{0, 1, 3}));
  EXPECT_EQ(pick(0.0, 6).size(), 6u);
  // Forced entries [4, 6) come first and count: 0.0625 + 0 of 0.5 needed, then 1.
  EXPECT_EQ(sorted(cpu::select_by_mass(s.data(), s.data(), 6, 4, 6, 6, 0.5)),
            (std::vector<int>{1, 4, 5}));
  // Forced entries that already reach tau are all that is kept.
  EXPECT_EQ(sorted(cpu::select_by_mass(s.data(), s.data(), 6, 1, 2, 6, 0.4)),
            (std::vector<int>{1}));
  // Mass may differ from the ranking score (block-sparse): the ranking decides the order,
  // the mass where it stops.
  const std::vector<float> mass = {0.1f, 0.1f, 0.1f, 0.1f, 0.6f, 0.f};
  EXPECT_EQ(sorted(cpu::select_by_mass(s.data(), mass.data(), 6, 0, 0, 6, 0.5)),
            (std::vector<int>{0, 1, 2, 3, 4}));
}

TEST(AdaptiveSelect, RandomScoresAgainstBruteForce) {
  std::mt19937_64 g(20261207);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  int reached = 0, capped = 0;
  for (int trial = 0; trial < 600; ++trial) {
    const int n = 1 + static_cast<int>(g() % 11);
    std::vector<float> s(n);
    for (float& x : s) x = g() % 4 == 0 ? 0.f : u(g) * (g() % 3 == 0 ? 1e-3f : 1.f);
    const int64_t flo = static_cast<int64_t>(g() % (n + 1));
    const int64_t fhi = flo + static_cast<int64_t>(g() % 3);
    const int64_t cap = static_cast<int64_t>(g() % (n + 2));
    const double tau = trial % 7 == 0 ? 1.0 : std::max(1e-6, static_cast<double>(u(g)));
    const std::vector<int> got = cpu::select_by_mass(s.data(), s.data(), n, flo, fhi, cap, tau);
    // Reference: F = the forced entries the cap allows (the first ones), then every set
    // S with F in S, |S| <= cap, whose other members have mass; the smallest size that
    // reaches tau * total, else the largest size allowed.
    std::vector<int> forced;
    for (int64_t i = flo; i < std::min<int64_t>(fhi, n); ++i) forced.push_back(static_cast<int>(i));
    if (static_cast<int64_t>(forced.size()) > cap) forced.resize(cap);
    double total = 0;
    for (float x : s) total += x;
    int best_size = -1, max_size = 0;
    double best_mass_at_size[16];
    std::fill(best_mass_at_size, best_mass_at_size + 16, -1.0);
    for (uint32_t bits = 0; bits < (1u << n); ++bits) {
      std::vector<int> set;
      bool ok = true;
      for (int i = 0; i < n; ++i) {
        const bool is_forced = std::count(forced.begin(), forced.end(), i) > 0;
        const bool in = (bits >> i) & 1;
        if (is_forced && !in) ok = false;
        if (in && !is_forced && !(s[i] > 0)) ok = false;
        if (in) set.push_back(i);
      }
      if (!ok || static_cast<int64_t>(set.size()) > cap) continue;
      const double m = mass_of(set, s);
      const int k = static_cast<int>(set.size());
      max_size = std::max(max_size, k);
      best_mass_at_size[k] = std::max(best_mass_at_size[k], m);
      if (m >= tau * total && (best_size < 0 || k < best_size)) best_size = k;
    }
    const int want = best_size >= 0 ? best_size : max_size;
    ASSERT_EQ(static_cast<int>(got.size()), want)
        << "trial " << trial << " n " << n << " forced [" << flo << "," << fhi << ") cap " << cap
        << " tau " << tau;
    (best_size >= 0 ? reached : capped)++;
    // The kept set holds the forced entries and is a best set of its size.
    for (int f : forced) EXPECT_TRUE(std::count(got.begin(), got.end(), f)) << trial;
    EXPECT_NEAR(mass_of(got, s), best_mass_at_size[want], 1e-12) << trial;
    if (best_size >= 0) {
      EXPECT_GE(mass_of(got, s), tau * total * (1 - 1e-12)) << trial;
    }
  }
  EXPECT_GT(reached, 100);
  EXPECT_GT(capped, 20);
}

// ---------------------------------------------------------------- vertical-slash

TEST(AdaptiveVs, HandBuiltColumnAndDiagonalMass) {
  const int64_t n = 256;
  std::vector<float> col(n, 0.f), slash(n, 0.f);
  col[100] = 0.6f;
  col[200] = 0.3f;
  col[150] = 0.1f;
  slash[120] = 0.7f;
  slash[130] = 0.3f;
  auto cols_of = [](int lo, int hi) {
    std::vector<int> v;
    for (int i = lo; i < hi; ++i) v.push_back(i);
    return v;
  };
  // Forced columns 0..29 and offsets 0..99 stay; then the mass decides.
  VsSelection a = cpu::vs_select(col.data(), slash.data(), n, 1000, 1000, 0.5);
  std::vector<int> want_cols = cols_of(0, 30);
  want_cols.push_back(100);
  EXPECT_EQ(a.columns, want_cols);
  std::vector<int> want_offs = cols_of(0, 100);
  want_offs.push_back(120);
  std::sort(want_offs.begin(), want_offs.end(), std::greater<int>());
  EXPECT_EQ(a.offsets, want_offs);
  VsSelection b = cpu::vs_select(col.data(), slash.data(), n, 1000, 1000, 0.95);
  EXPECT_EQ(b.columns.size(), 33u);
  EXPECT_EQ(b.offsets.size(), 102u);
  // The cap: v = 31 keeps the forced 30 and the best column.
  VsSelection c = cpu::vs_select(col.data(), slash.data(), n, 31, 101, 1.0);
  EXPECT_EQ(c.columns, want_cols);
  EXPECT_EQ(c.offsets.size(), 101u);
  // Fixed budgets (tau 0) are unchanged: v and s entries.
  VsSelection d = cpu::vs_select(col.data(), slash.data(), n, 40, 110);
  EXPECT_EQ(d.columns.size(), 40u);
  EXPECT_EQ(d.offsets.size(), 110u);
}

// Random Q / K: the estimate's mass per head, the adaptive selection within the caps, and
// tau = 1 with caps >= N keeping every causal column and diagonal.
TEST(AdaptiveVs, EstimateRespectsCapsAndReachesTau) {
  const int64_t n = 500;
  const int heads = 3, d = 16;
  const std::vector<float> q = test::random_normal(static_cast<size_t>(64) * heads * d, 11, 1.5f);
  const std::vector<float> k = test::random_normal(static_cast<size_t>(n) * heads * d, 12, 1.5f);
  VsEstimateParams p;
  p.q_last = q.data();
  p.k = k.data();
  p.q_row_stride = p.k_row_stride = int64_t{heads} * d;
  p.q_head_stride = p.k_head_stride = d;
  p.n_last = 64;
  p.seq_len = n;
  p.n_k = static_cast<int>(n);
  p.num_heads = p.num_kv_heads = heads;
  p.head_dim = d;
  p.scale = 1.f / std::sqrt(static_cast<float>(d));
  RowStats st;
  ASSERT_EQ(cpu::vs_row_stats(p, &st), Status::kOk);
  std::vector<float> col(heads * n, 0.f), slash(heads * n, 0.f);
  ASSERT_EQ(cpu::vs_scores(p, st, col.data(), slash.data()), Status::kOk);
  const int v[3] = {40, 1000, 1000}, s[3] = {60, 1000, 1000};
  const double tau[3] = {0.9, 0.5, 1.0};
  std::vector<VsSelection> sel;
  ASSERT_EQ(cpu::vs_estimate(p, v, s, &sel, tau), Status::kOk);
  ASSERT_EQ(sel.size(), 3u);
  for (int h = 0; h < heads; ++h) {
    EXPECT_LE(static_cast<int>(sel[h].columns.size()), clamp_vertical_budget(v[h], n));
    EXPECT_LE(static_cast<int>(sel[h].offsets.size()), clamp_slash_budget(s[h], n));
    const VsSelection ref =
        cpu::vs_select(col.data() + h * n, slash.data() + h * n, n, v[h], s[h], tau[h]);
    EXPECT_EQ(sel[h].columns, ref.columns) << h;
    EXPECT_EQ(sel[h].offsets, ref.offsets) << h;
  }
  // Head 0: 40 / 60 caps bind (random keys spread the mass).
  EXPECT_EQ(sel[0].columns.size(), 40u);
  // Head 1: the 50% mass cut; the kept columns reach half of the column mass, one fewer
  // (the smallest kept non-forced column dropped) does not.
  const float* c1 = col.data() + n;
  double total = 0, kept = 0, least = 1e30;
  for (int64_t j = 0; j < n; ++j) total += c1[j];
  for (int c : sel[1].columns) {
    kept += c1[c];
    if (c >= kForcedColumns) least = std::min(least, static_cast<double>(c1[c]));
  }
  EXPECT_NEAR(total, 64.0, 1e-3);  // 64 rows, each a softmax
  EXPECT_GE(kept, 0.5 * total);
  EXPECT_LT(kept - least, 0.5 * total);
  EXPECT_LT(sel[1].columns.size(), static_cast<size_t>(n) / 2);
  // Head 2: tau 1 with caps >= N keeps every column and diagonal (all carry mass).
  EXPECT_EQ(sel[2].columns.size(), static_cast<size_t>(n));
  EXPECT_EQ(sel[2].offsets.size(), static_cast<size_t>(n));
  // Bad thresholds are refused.
  for (double bad : {-0.1, 1.5, std::nan("")}) {
    const double t[3] = {0.9, bad, 0.9};
    EXPECT_EQ(cpu::vs_estimate(p, v, s, &sel, t), Status::kInvalidArgument) << bad;
  }
}

// ---------------------------------------------------------------- block-sparse

TEST(AdaptiveBlockSparse, CutsEachQueryBlockAtTauWithinTheCap) {
  const int64_t n = 64 * 12 + 17;
  const int heads = 2, d = 8, cap = 5;
  const std::vector<float> q = test::random_normal(static_cast<size_t>(n) * heads * d, 21, 12.f);
  const std::vector<float> k = test::random_normal(static_cast<size_t>(n) * heads * d, 22, 12.f);
  cpu::BlockSparseEstimateParams p;
  p.q = q.data();
  p.k = k.data();
  p.q_row_stride = p.k_row_stride = int64_t{heads} * d;
  p.q_head_stride = p.k_head_stride = d;
  p.seq_len = n;
  p.num_heads = p.num_kv_heads = heads;
  p.head_dim = d;
  p.scale = 1.f / std::sqrt(static_cast<float>(d));
  const int topk[2] = {cap, cap};
  const double tau[2] = {0.6, 1.0};
  BlockSparseIndex ix;
  ASSERT_EQ(cpu::block_sparse_estimate(p, topk, &ix, tau), Status::kOk);
  ASSERT_EQ(ix.k, cap);
  const int64_t nb = num_blocks(n);
  std::vector<float> qpool(heads * nb * d), kpool(heads * nb * d);
  cpu::block_mean_pool(q.data(), heads * d, d, heads, d, n, qpool.data());
  cpu::block_mean_pool(k.data(), heads * d, d, heads, d, n, kpool.data());
  int cut_below_cap = 0;
  for (int h = 0; h < heads; ++h)
    for (int64_t b = 0; b < nb; ++b) {
      std::vector<int> kept;
      for (int i = 0; i < cap; ++i) {
        const int j = ix.blocks[(h * nb + b) * cap + i];
        if (j >= 0) kept.push_back(j);
      }
      ASSERT_FALSE(kept.empty());
      EXPECT_TRUE(std::is_sorted(kept.begin(), kept.end()));
      EXPECT_TRUE(std::count(kept.begin(), kept.end(), static_cast<int>(b))) << "diagonal";
      // Block mass from fp64 pooled dots: keys(j) * exp(s_j - max).
      std::vector<double> sc(b + 1), m(b + 1);
      for (int64_t j = 0; j <= b; ++j) {
        double dot = 0;
        for (int i = 0; i < d; ++i)
          dot += double{qpool[(h * nb + b) * d + i]} * kpool[(h * nb + j) * d + i];
        sc[j] = p.scale * dot;
      }
      const double mx = *std::max_element(sc.begin(), sc.end());
      double total = 0, got = 0, least = 1e300;
      for (int64_t j = 0; j <= b; ++j) {
        m[j] = std::min<int64_t>(64, n - 64 * j) * std::exp(sc[j] - mx);
        total += m[j];
      }
      for (int j : kept) {
        got += m[j];
        if (j != b) least = std::min(least, m[j]);
      }
      const size_t full = static_cast<size_t>(std::min<int64_t>(cap, b + 1));
      if (tau[h] == 1.0) {
        EXPECT_EQ(kept.size(), full) << h << ":" << b;
        continue;
      }
      if (kept.size() < full) {
        ++cut_below_cap;
        EXPECT_GE(got, tau[h] * total * (1 - 1e-5)) << h << ":" << b;
      }
      if (kept.size() > 1) {
        EXPECT_LT(got - least, tau[h] * total * (1 + 1e-5)) << h << ":" << b;
      }
    }
  EXPECT_GT(cut_below_cap, 3);  // the threshold, not only the cap, decided somewhere
  const double bad[2] = {0.0 - 1, 0.5};
  EXPECT_EQ(cpu::block_sparse_estimate(p, topk, &ix, bad), Status::kInvalidArgument);
}

// Hand-built pooled blocks: head_dim 1, N = 129 (the last block holds one key). Query
// block 2 scores key blocks 0, 1, 2 as 0, 0, 3: block mass 64, 64 and e^3 = 20.1 (the
// diagonal stands for one key), so tau 0.5 needs the diagonal and block 0 (84 / 148),
// while tau 0.1 keeps the diagonal alone; in query block 1 (64 e^0 each) the diagonal
// alone is half, enough for 0.5.
TEST(AdaptiveBlockSparse, BlockMassWeighsEachBlockByItsKeys) {
  const int64_t n = 129;
  const std::vector<float> qpool = {1.f, 1.f, 1.f}, kpool = {0.f, 0.f, 3.f};
  const int topk = 3;
  BlockSparseIndex ix;
  auto lists = [&](double tau) {
    EXPECT_EQ(
        cpu::block_sparse_select(qpool.data(), kpool.data(), n, 1, 1, 1, 1.f, &topk, &ix, &tau),
        Status::kOk);
    return ix.blocks;
  };
  EXPECT_EQ(lists(0.5), (std::vector<int>{0, -1, -1, 1, -1, -1, 0, 2, -1}));
  EXPECT_EQ(lists(0.1), (std::vector<int>{0, -1, -1, 1, -1, -1, 2, -1, -1}));
  EXPECT_EQ(lists(1.0), (std::vector<int>{0, -1, -1, 0, 1, -1, 0, 1, 2}));
}

// ---------------------------------------------------------------- engine

std::vector<int> random_ids(int n, int vocab, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::vector<int> ids(n);
  for (int& x : ids) x = 1 + static_cast<int>(g() % (vocab - 1));
  return ids;
}

TEST(AdaptiveEngine, TauOneIsDenseAndLowerTauDrops) {
  const ModelWeights w = load_model("random:tiny:3");
  const int n = 333;
  const std::vector<int> ids = random_ids(n, w.config.vocab, 5);
  Engine eng(w);
  KvCache cache(w.config, n);
  const std::vector<float> dense = eng.prefill(ids, SparsePolicy::dense(), &cache);
  // tau = 1 with caps >= N: every column (VS) and every block (BS) carries mass.
  const SparsePolicy all = test::mixed_policy(w.config, HeadPattern::a_shape(64, n),
                                              HeadPattern::vertical_slash(1 << 20, 1 << 20, 1.0),
                                              HeadPattern::block_sparse(8, 1.0));
  ASSERT_TRUE(all.any_adaptive());
  PrefillPlan plan;
  PrefillStats st;
  KvCache c1(w.config, n), c2(w.config, n);
  const std::vector<float> one = eng.prefill(ids, all, &c1, &plan, &st);
  EXPECT_EQ(st.heads_by_kind[2] + st.heads_by_kind[3], w.config.n_layers * w.config.n_heads / 2);
  double mx = 0, diff = 0;
  for (size_t i = 0; i < dense.size(); ++i) {
    mx = std::max(mx, std::fabs(double{dense[i]}));
    diff = std::max(diff, std::fabs(double{dense[i]} - one[i]));
  }
  EXPECT_LE(diff, 1e-4 * mx) << "tau = 1 differs from dense";
  // ... because every column and diagonal (block) was kept.
  int vs_heads = 0, bs_heads = 0;
  for (const auto& layer : plan.layers)
    for (const HeadPlan& hp : layer) {
      if (hp.kind == PatternKind::kVerticalSlash) {
        ++vs_heads;
        EXPECT_EQ(hp.vs.columns.size(), static_cast<size_t>(n));
        EXPECT_EQ(hp.vs.offsets.size(), static_cast<size_t>(n));
      } else if (hp.kind == PatternKind::kBlockSparse) {
        ++bs_heads;
        for (int64_t b = 0; b < num_blocks(n); ++b)
          EXPECT_EQ(
              std::count_if(hp.blocks.begin() + b * hp.topk, hp.blocks.begin() + (b + 1) * hp.topk,
                            [](int x) { return x >= 0; }),
              b + 1);
      }
    }
  EXPECT_GT(vs_heads, 0);
  EXPECT_GT(bs_heads, 0);
  // Lower thresholds keep fewer columns / blocks than the caps and change the logits.
  const SparsePolicy low = test::mixed_policy(w.config, HeadPattern::a_shape(64, n),
                                              HeadPattern::vertical_slash(1 << 20, 1 << 20, 0.3),
                                              HeadPattern::block_sparse(8, 0.3));
  PrefillPlan lp;
  const std::vector<float> cut = eng.prefill(ids, low, &c2, &lp);
  size_t cols = 0, full_cols = 0;
  int blocks = 0, full_blocks = 0;
  for (size_t l = 0; l < lp.layers.size(); ++l)
    for (size_t h = 0; h < lp.layers[l].size(); ++h) {
      const HeadPlan& a = lp.layers[l][h];
      const HeadPlan& b = plan.layers[l][h];
      cols += a.vs.columns.size() + a.vs.offsets.size();
      full_cols += b.vs.columns.size() + b.vs.offsets.size();
      for (int x : a.blocks) blocks += x >= 0;
      for (int x : b.blocks) full_blocks += x >= 0;
    }
  EXPECT_LT(cols, full_cols);
  EXPECT_LT(blocks, full_blocks);
  EXPECT_GT(test::max_abs_diff(cut.data(), dense.data(), dense.size()), 1e-4 * mx);
}

TEST(AdaptiveEngine, AuditReportsTheAdaptiveHeads) {
  const ModelWeights w = load_model("random:tiny:4");
  const int n = 400;
  Engine eng(w);
  GenerateOptions g;
  g.policy = load_sparse_policy("adaptive:0.6:64:128", w.config, 0);
  g.audit.heads_per_layer = 2;
  g.audit.query_blocks = 3;
  const GenerateResult r = eng.generate(random_ids(n, w.config.vocab, 6), g);
  ASSERT_EQ(r.prefill.audit.size(), static_cast<size_t>(w.config.n_layers * 2));
  for (const HeadAuditResult& a : r.prefill.audit) {
    EXPECT_EQ(a.pattern, HeadPattern::vertical_slash(64, 128, 0.6));
    EXPECT_GT(a.recall, 0.0);
    EXPECT_LE(a.recall, 1.0);
  }
}

// ---------------------------------------------------------------- config format

ModelConfig shape(int layers, int heads) {
  ModelConfig c;
  c.n_layers = layers;
  c.n_heads = heads;
  c.n_kv_heads = heads;
  return c;
}

TEST(AdaptiveConfig, MInferenceFilesLoadUnchangedAndFixed) {
  const std::string dir = test::source_dir() + "/configs/minference/";
  const SparsePolicy llama = load_sparse_policy(
      dir + "Llama_3_8B_Instruct_262k_kv_out_v32_fit_o_best_pattern.json", shape(32, 32));
  const SparsePolicy qwen = load_sparse_policy(dir + "Qwen2.5_7B_Instruct_1M.json", shape(28, 28));
  EXPECT_FALSE(llama.any_adaptive());
  EXPECT_FALSE(qwen.any_adaptive());
  EXPECT_EQ(llama.at(0, 16, 1 << 20), HeadPattern::vertical_slash(30, 800));
}

TEST(AdaptiveConfig, ThresholdsInJson) {
  const ModelConfig c = shape(1, 3);
  const std::string heads = R"({"0": ["vertical_and_slash", 100, 200, 0.5],
      "1": ["block_sparse", 8, 0, 0.1, {"tau": 0.8}], "2": ["stream_llm", 4, 64, 0.2]})";
  // A per-head fifth element.
  SparsePolicy p = parse_minference_config("[" + heads + "]", "X", c);
  EXPECT_EQ(p.at(0, 0, 1 << 20), HeadPattern::vertical_slash(100, 200));
  EXPECT_EQ(p.at(0, 1, 1 << 20), HeadPattern::block_sparse(8, 0.8));
  EXPECT_EQ(p.at(0, 2, 1 << 20), HeadPattern::a_shape(4, 64));
  // A policy-level default: every VS / BS head without its own threshold.
  p = parse_minference_config(R"({"tau": 0.95, "layers": [)" + heads + "]}", "X", c);
  EXPECT_EQ(p.at(0, 0, 1 << 20), HeadPattern::vertical_slash(100, 200, 0.95));
  EXPECT_EQ(p.at(0, 1, 1 << 20), HeadPattern::block_sparse(8, 0.8));
  EXPECT_EQ(p.at(0, 2, 1 << 20), HeadPattern::a_shape(4, 64));
  EXPECT_NE(p.summary_string().find("vertical_slash(100,200,tau=0.95) x1"), std::string::npos)
      << p.summary_string();
  // An object without tau is the plain list.
  p = parse_minference_config(R"({"layers": [)" + heads + "]}", "X", c);
  EXPECT_EQ(p.at(0, 0, 1 << 20), HeadPattern::vertical_slash(100, 200));
}

std::string parse_error(const std::string& json) {
  return test::error_of([&] { parse_minference_config(json, "X", shape(1, 1)); });
}

TEST(AdaptiveConfig, BadThresholdsGiveOneClearLine) {
  const std::string vs = R"(["vertical_and_slash", 100, 200, 0.5)";
  for (const std::string t : {"0", "1.5", "-0.2", "\"0.9\"", "null", "[]"}) {
    test::expect_one_line_containing(
        parse_error(R"({"tau": )" + t + R"(, "layers": [{"0": )" + vs + "]}]}"),
        {"config X", "top level", "tau must be a number in (0, 1]"});
    test::expect_one_line_containing(parse_error(R"([{"0": )" + vs + R"(, {"tau": )" + t + "}]}]"),
                                     {"config X", "layer 0 head 0", "tau must be a number"});
  }
  test::expect_one_line_containing(parse_error(R"([{"0": )" + vs + R"(, {"tua": 0.5}]}])"),
                                   {"layer 0 head 0", "expected {\"tau\": T}"});
  test::expect_one_line_containing(
      parse_error(R"([{"0": ["stream_llm", 4, 64, 0.1, {"tau": 0.5}]}])"),
      {"layer 0 head 0", "tau applies to vertical_and_slash and block_sparse"});
  test::expect_one_line_containing(parse_error(R"({"tau": 0.5, "layer": []})"),
                                   {"config X", "\"layers\""});
  test::expect_one_line_containing(parse_error(R"({"tau": 0.5, "layers": [], "x": 1})"),
                                   {"config X", "unknown key 'x'"});
}

TEST(AdaptiveConfig, CliSpec) {
  const ModelConfig c = shape(2, 4);
  SparsePolicy p = load_sparse_policy("adaptive:0.95", c, 0);
  EXPECT_EQ(p.source, "adaptive:0.95");
  EXPECT_EQ(p.heads.size(), 8u);
  EXPECT_EQ(p.at(1, 3, 1 << 20), HeadPattern::vertical_slash(1000, 6096, 0.95));
  p = load_sparse_policy("adaptive:1:64:128", c, 0);
  EXPECT_EQ(p.at(0, 0, 1 << 20), HeadPattern::vertical_slash(64, 128, 1.0));
  EXPECT_TRUE(is_builtin_sparse_spec("adaptive:0.9"));
  EXPECT_TRUE(is_builtin_sparse_spec("adaptive"));
  EXPECT_FALSE(is_builtin_sparse_spec("adaptive.json"));
  for (const std::string bad : {"adaptive:0", "adaptive:1.5", "adaptive:nan", "adaptive:abc",
                                "adaptive:", "adaptive:-0.5", "adaptive:inf", "adaptive:0.9x"}) {
    test::expect_one_line_containing(
        test::error_of([&] { load_sparse_policy(bad, c); }),
        {"sparse policy '" + bad + "'", "tau must be a number in (0, 1]"});
  }
  for (const std::string bad : {"adaptive", "adaptive:0.9:10", "adaptive:0.9:10:20:30"})
    test::expect_one_line_containing(test::error_of([&] { load_sparse_policy(bad, c); }),
                                     {"sparse policy '" + bad + "'", "adaptive:TAU:V:S"});
  test::expect_one_line_containing(
      test::error_of([&] { load_sparse_policy("adaptive:0.9:0:20", c); }),
      {"V must be a whole number >= 1, got '0'"});
  test::expect_one_line_containing(
      test::error_of([&] { load_sparse_policy("adaptive:0.9:10:x", c); }),
      {"S must be a whole number >= 1, got 'x'"});
}

// ---------------------------------------------------------------- CLI

TEST(AdaptiveCli, GenerateWithAdaptivePolicyAndAudit) {
  const std::string bin = test::bin_dir() + "/mprefill";
  MPREFILL_SKIP_IF_MISSING(bin);
  std::string out;
  const std::string base =
      test::tiny_generate_command(bin) + "--dense-below 0 --decode 2 --audit-heads 2 --sparse ";
  ASSERT_EQ(test::run_command(base + "adaptive:0.9 --json", &out), 0) << out;
  const auto j = nlohmann::json::parse(out.substr(out.find('{')));
  ASSERT_EQ(j["audit"].size(), 8u) << out;  // 4 layers x 2 heads
  for (const auto& e : j["audit"]) {
    EXPECT_EQ(e["tau"].get<double>(), 0.9) << out;
    EXPECT_GT(e["recall"].get<double>(), 0.0);
  }
  const auto& s = j["audit_summary"];
  EXPECT_EQ(s["adaptive_heads"].get<int>(), 8) << out;
  EXPECT_LE(s["adaptive_min_recall"].get<double>(), s["adaptive_mean_recall"].get<double>());
  ASSERT_EQ(test::run_command(base + "adaptive:0.9", &out), 0) << out;
  EXPECT_NE(out.find("vertical_slash(1000,6096,tau=0.9): recall"), std::string::npos) << out;
  EXPECT_NE(out.find("adaptive heads 8: recall mean"), std::string::npos) << out;
  // A bad threshold: non-zero status, one line naming it.
  EXPECT_NE(test::run_command(base + "adaptive:1.5", &out), 0);
  test::expect_one_line_containing(out.substr(0, out.find_last_not_of('\n') + 1),
                                   {"adaptive:1.5", "tau must be a number in (0, 1]"});
}

}  // namespace
}  // namespace mprefill
