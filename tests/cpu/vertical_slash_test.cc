// Vertical-slash estimation (scores, shards, selection, planted patterns, ties), the
// canonical index build against a brute-force enumeration of the mask definition, and
// mask tile counts.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <ostream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kernels/cpu/cpu.h"
#include "tests/cpu/reference.h"

namespace mprefill {
namespace {

constexpr double kTol = 1e-5;

// Q of the last min(64, N) rows and all N keys, packed; params for one key shard.
struct EstProblem {
  int64_t n;
  int heads, kv_heads, dim, n_last;
  std::vector<float> q_last, k;

  EstProblem(int64_t n_, int h, int kvh, int d, uint64_t seed)
      : n(n_),
        heads(h),
        kv_heads(kvh),
        dim(d),
        n_last(static_cast<int>(std::min<int64_t>(64, n_))) {
    q_last = test::random_normal(static_cast<size_t>(n_last) * h * d, seed * 2 + 1);
    k = test::random_normal(static_cast<size_t>(n) * kvh * d, seed * 2 + 2);
  }
  float* q_row(int i, int h) { return q_last.data() + (static_cast<size_t>(i) * heads + h) * dim; }
  float* k_row(int64_t c, int g) {
    return k.data() + (static_cast<size_t>(c) * kv_heads + g) * dim;
  }
  VsEstimateParams params(int64_t k0, int64_t nk) const {
    VsEstimateParams p;
    p.q_last = q_last.data();
    p.k = k.data() + static_cast<size_t>(k0) * kv_heads * dim;
    p.q_row_stride = static_cast<int64_t>(heads) * dim, p.q_head_stride = dim;
    p.k_row_stride = static_cast<int64_t>(kv_heads) * dim, p.k_head_stride = dim;
    p.n_last = n_last, p.seq_len = n, p.n_k = static_cast<int>(nk), p.k_pos0 = k0;
    p.num_heads = heads, p.num_kv_heads = kv_heads, p.head_dim = dim;
    p.scale = 1.f / std::sqrt(static_cast<float>(dim));
    return p;
  }
};

struct Scores {
  std::vector<float> col, slash;  // [heads][N]
};

// Scores of the whole sequence computed from key shards split at `cuts` (pass 1 per
// shard, combined statistics, pass 2 per shard), as a sequence-parallel caller does.
Scores sharded_scores(const EstProblem& e, const std::vector<int64_t>& cuts) {
  std::vector<int64_t> edges = {0};
  edges.insert(edges.end(), cuts.begin(), cuts.end());
  edges.push_back(e.n);
  RowStats global;
  for (size_t s = 0; s + 1 < edges.size(); ++s) {
    RowStats part;
    EXPECT_EQ(cpu::vs_row_stats(e.params(edges[s], edges[s + 1] - edges[s]), &part), Status::kOk);
    cpu::combine_row_stats(global, part);
  }
  Scores out;
  out.col.assign(static_cast<size_t>(e.heads) * e.n, 0.f);
  out.slash.assign(out.col.size(), 0.f);
  for (size_t s = 0; s + 1 < edges.size(); ++s) {
    const int64_t k0 = edges[s], nk = edges[s + 1] - k0;
    std::vector<float> col(static_cast<size_t>(e.heads) * nk, 0.f);
    EXPECT_EQ(cpu::vs_scores(e.params(k0, nk), global, col.data(), out.slash.data()), Status::kOk);
    for (int h = 0; h < e.heads; ++h)
      std::copy(col.begin() + h * nk, col.begin() + (h + 1) * nk, out.col.begin() + h * e.n + k0);
  }
  return out;
}

std::vector<VsSelection> select_all(const EstProblem& e, const Scores& s, int v, int sb) {
  std::vector<VsSelection> out;
  for (int h = 0; h < e.heads; ++h) {
    out.push_back(cpu::vs_select(s.col.data() + h * e.n, s.slash.data() + h * e.n, e.n, v, sb));
  }
  return out;
}

std::vector<int> range(int lo, int hi) {
  std::vector<int> v;
  for (int i = lo; i < hi; ++i) v.push_back(i);
  return v;
}

// ------------------------------------------------------------------------- scores
struct ScoreCase {
  int64_t n;
  int heads, kv_heads, dim;
};
void PrintTo(const ScoreCase& c, std::ostream* os) {
  *os << "n=" << c.n << " heads=" << c.heads << "/" << c.kv_heads << " dim=" << c.dim;
}

class VsScoresTest : public testing::TestWithParam<ScoreCase> {};

TEST_P(VsScoresTest, MatchFp64ReferenceWholeAndSharded) {
  const ScoreCase c = GetParam();
  EstProblem e(c.n, c.heads, c.kv_heads, c.dim,
               test::ref::case_seed({c.n, c.heads, c.kv_heads, c.dim}));
  const auto ref = test::ref::vs_scores(e.q_last, e.k, c.n, c.heads, c.kv_heads, c.dim,
                                        1.0 / std::sqrt(static_cast<double>(c.dim)));
  const Scores whole = sharded_scores(e, {});
  test::ref::expect_close(whole.col, ref.col, kTol, "col_score");
  test::ref::expect_close(whole.slash, ref.slash, kTol, "slash_score");
  if (c.n < 3) return;
  // Three shards; the last starts inside the estimation rows (some rows see none of it).
  std::mt19937_64 g(test::ref::case_seed({c.n, 99}));
  const int64_t cut2 = std::max<int64_t>(
      2, c.n - std::uniform_int_distribution<int64_t>(1, std::min<int64_t>(c.n - 2, 40))(g));
  const int64_t cut1 = std::uniform_int_distribution<int64_t>(1, cut2 - 1)(g);
  SCOPED_TRACE(testing::Message() << "shards at " << cut1 << ", " << cut2);
  const Scores split = sharded_scores(e, {cut1, cut2});
  std::vector<double> wc(whole.col.begin(), whole.col.end());
  std::vector<double> ws(whole.slash.begin(), whole.slash.end());
  test::ref::expect_close(split.col, wc, 1e-6, "sharded col_score vs single shard");
  test::ref::expect_close(split.slash, ws, 1e-6, "sharded slash_score vs single shard");
  test::ref::expect_close(split.col, ref.col, kTol, "sharded col_score");
  test::ref::expect_close(split.slash, ref.slash, kTol, "sharded slash_score");
}

INSTANTIATE_TEST_SUITE_P(Sizes, VsScoresTest,
                         testing::Values(ScoreCase{1, 8, 2, 64}, ScoreCase{63, 8, 2, 48},
                                         ScoreCase{65, 8, 2, 128}, ScoreCase{127, 8, 2, 64},
                                         ScoreCase{1000, 8, 2, 128}, ScoreCase{4099, 4, 1, 64}),
                         [](const testing::TestParamInfo<ScoreCase>& i) {
                           return "n" + std::to_string(i.param.n) + "_d" +
                                  std::to_string(i.param.dim);
                         });

TEST(VsRowStats, ShardWithoutCausalKeysGivesEmptyStats) {
  EstProblem e(300, 4, 1, 64, 21);
  // Keys [270, 300): estimation rows 236..269 have no causal key in the shard.
  RowStats st;
  ASSERT_EQ(cpu::vs_row_stats(e.params(270, 30), &st), Status::kOk);
  ASSERT_EQ(st.max.size(), 4u * 64);
  for (int h = 0; h < 4; ++h)
    for (int i = 0; i < 64; ++i) {
      const int64_t r = 236 + i;
      if (r < 270) {
        EXPECT_EQ(st.max[h * 64 + i], -std::numeric_limits<float>::infinity()) << r;
        EXPECT_EQ(st.sum[h * 64 + i], 0.f) << r;
      } else {
        EXPECT_TRUE(std::isfinite(st.max[h * 64 + i])) << r;
        EXPECT_GE(st.sum[h * 64 + i], 1.f) << r;  // the max term contributes exp(0)
      }
    }
  // Combining with an empty shard changes nothing; empty (+) empty stays empty.
  RowStats a = st, empty;
  empty.max.assign(a.max.size(), -std::numeric_limits<float>::infinity());
  empty.sum.assign(a.max.size(), 0.f);
  cpu::combine_row_stats(a, empty);
  EXPECT_EQ(a.max, st.max);
  EXPECT_EQ(a.sum, st.sum);
  RowStats b = empty;
  cpu::combine_row_stats(b, empty);
  EXPECT_EQ(b.max, empty.max);
  EXPECT_EQ(b.sum, empty.sum);
}

TEST(VsScores, RejectsBadInput) {
  EstProblem e(200, 4, 2, 64, 22);
  RowStats st;
  VsEstimateParams p = e.params(0, 200);
  p.n_last = 10;  // must be min(64, N)
  EXPECT_EQ(cpu::vs_row_stats(p, &st), Status::kInvalidArgument);
  p = e.params(150, 60);  // shard beyond N
  EXPECT_EQ(cpu::vs_row_stats(p, &st), Status::kInvalidArgument);
  p = e.params(0, 200);
  p.dtype = DType::kBF16;
  EXPECT_EQ(cpu::vs_row_stats(p, &st), Status::kUnsupported);
  p = e.params(0, 200);
  ASSERT_EQ(cpu::vs_row_stats(p, &st), Status::kOk);
  std::vector<float> col(4 * 200), slash(4 * 200);
  RowStats short_stats = st;
  short_stats.max.pop_back();
  EXPECT_EQ(cpu::vs_scores(p, short_stats, col.data(), slash.data()), Status::kInvalidArgument);
  std::vector<int> v(4, 30), s(4, 50);
  std::vector<VsSelection> sel;
  p = e.params(64, 136);  // vs_estimate needs every key
  EXPECT_EQ(cpu::vs_estimate(p, v.data(), s.data(), &sel), Status::kInvalidArgument);
}

// ------------------------------------------------------------------------- planted patterns
// Two kv groups with different planted columns; q rows of a group share a direction u_g,
// planted keys are 2 u_g, so they take almost all probability of every estimation row.
TEST(VsEstimate, FindsPlantedColumns) {
  for (int64_t n : {1000, 4099}) {
    SCOPED_TRACE(testing::Message() << "n=" << n);
    const int h = 4, kvh = 2, d = 128;
    EstProblem e(n, h, kvh, d, test::ref::case_seed({n, 31}));
    for (float& x : e.k) x *= 0.3f;
    const std::vector<float> u = test::random_normal(kvh * d, test::ref::case_seed({n, 32}));
    const std::vector<float> noise =
        test::random_normal(e.q_last.size(), test::ref::case_seed({n, 33}), 0.3f);
    for (int i = 0; i < e.n_last; ++i)
      for (int hh = 0; hh < h; ++hh)
        for (int t = 0; t < d; ++t)
          e.q_row(i, hh)[t] = u[(hh / 2) * d + t] + noise[(i * h + hh) * d + t];
    const std::vector<std::vector<int>> planted = {{37, 512, 700}, {90, 333, 871, 872}};
    for (int g = 0; g < kvh; ++g)
      for (int c : planted[g])
        for (int t = 0; t < d; ++t) e.k_row(c, g)[t] = 2.f * u[g * d + t];
    for (const auto& cuts : std::vector<std::vector<int64_t>>{{}, {300, n - 10}}) {
      const Scores s = sharded_scores(e, cuts);
      for (int hh = 0; hh < h; ++hh) {
        const auto& pl = planted[hh / 2];
        const VsSelection sel = cpu::vs_select(s.col.data() + hh * n, s.slash.data() + hh * n, n,
                                               30 + static_cast<int>(pl.size()), 50);
        std::vector<int> want = range(0, 30);
        want.insert(want.end(), pl.begin(), pl.end());
        EXPECT_EQ(sel.columns, want) << "head " << hh << " shards " << cuts.size() + 1;
      }
    }
    // The single-process convenience agrees.
    std::vector<int> vb(h), sb(h, 50);
    for (int hh = 0; hh < h; ++hh) vb[hh] = 30 + static_cast<int>(planted[hh / 2].size());
    std::vector<VsSelection> est;
    ASSERT_EQ(cpu::vs_estimate(e.params(0, n), vb.data(), sb.data(), &est), Status::kOk);
    for (int hh = 0; hh < h; ++hh) {
      std::vector<int> want = range(0, 30);
      want.insert(want.end(), planted[hh / 2].begin(), planted[hh / 2].end());
      EXPECT_EQ(est[hh].columns, want) << "vs_estimate head " << hh;
    }
  }
}

// Row-specific queries w_r (nearly orthogonal in 128 dims); the key at c = r - d is
// 2 w_r for each planted d, so diagonal d holds the dominant cell of every row.
TEST(VsEstimate, FindsPlantedDiagonals) {
  for (int64_t n : {1000, 4099}) {
    SCOPED_TRACE(testing::Message() << "n=" << n);
    const int h = 4, kvh = 2, d = 128;
    EstProblem e(n, h, kvh, d, test::ref::case_seed({n, 41}));
    const std::vector<float> w =
        test::random_normal(static_cast<size_t>(e.n_last) * kvh * d, test::ref::case_seed({n, 42}));
    const std::vector<float> noise =
        test::random_normal(e.q_last.size(), test::ref::case_seed({n, 43}), 0.05f);
    for (int i = 0; i < e.n_last; ++i)
      for (int hh = 0; hh < h; ++hh)
        for (int t = 0; t < d; ++t)
          e.q_row(i, hh)[t] = w[(i * kvh + hh / 2) * d + t] + noise[(i * h + hh) * d + t];
    // Offsets >= 100 (not forced), at least 64 apart (planted keys do not collide).
    const std::vector<std::vector<int>> planted = {{700, 410, 123}, {850, 600, 250, 150}};
    for (int g = 0; g < kvh; ++g)
      for (int off : planted[g])
        for (int i = 0; i < e.n_last; ++i) {
          const int64_t c = n - e.n_last + i - off;
          for (int t = 0; t < d; ++t) e.k_row(c, g)[t] = 2.f * w[(i * kvh + g) * d + t];
        }
    for (const auto& cuts : std::vector<std::vector<int64_t>>{{}, {n / 3, n - 20}}) {
      const Scores s = sharded_scores(e, cuts);
      for (int hh = 0; hh < h; ++hh) {
        const auto& pl = planted[hh / 2];
        const VsSelection sel = cpu::vs_select(s.col.data() + hh * n, s.slash.data() + hh * n, n,
                                               30, 100 + static_cast<int>(pl.size()));
        std::vector<int> want = pl;  // descending, then 99..0
        for (int off = 99; off >= 0; --off) want.push_back(off);
        EXPECT_EQ(sel.offsets, want) << "head " << hh << " shards " << cuts.size() + 1;
      }
    }
  }
}

// ------------------------------------------------------------------------- selection
// Identical keys: every causal score is equal, so all columns seen by all 64 rows (and all
// offsets d <= N - 64) tie exactly; the lowest columns / smallest offsets must win.
TEST(VsSelect, ExactTiesFromIdenticalKeysGoLow) {
  const int64_t n = 700;
  EstProblem e(n, 4, 1, 64, 51);
  const std::vector<float> key = test::random_normal(64, 52);
  for (int64_t c = 0; c < n; ++c) std::copy(key.begin(), key.end(), e.k_row(c, 0));
  const Scores s = sharded_scores(e, {});
  ASSERT_EQ(s.col[0], s.col[n - 65]);  // the tie is exact
  ASSERT_EQ(s.slash[1], s.slash[n - 64]);
  for (auto [v, sb] : {std::pair{30, 50}, {45, 150}, {200, 400}}) {
    const auto sel = select_all(e, s, v, sb);
    for (int h = 0; h < 4; ++h) {
      EXPECT_EQ(sel[h].columns, range(0, v)) << "v=" << v;
      std::vector<int> want = range(0, sb);
      std::reverse(want.begin(), want.end());
      EXPECT_EQ(sel[h].offsets, want) << "s=" << sb;
    }
  }
}

TEST(VsSelect, HandMadeTiesAndForcedEntries) {
  const int64_t n = 300;
  std::vector<float> col(n, 0.f), slash(n, 0.f);
  // Forced columns lose nothing to higher scores; among equal scores lower index wins.
  col[5] = 100.f;  // forced anyway
  col[40] = 3.f;   // ties with 41 and 250
  col[41] = 3.f;
  col[250] = 3.f;
  col[299] = 5.f;
  auto sel = cpu::vs_select(col.data(), slash.data(), n, 32, 50);
  std::vector<int> want = range(0, 30);
  want.push_back(40);
  want.push_back(299);
  EXPECT_EQ(sel.columns, want);
  // Budget below the forced count: forced entries tie (+inf), lowest first.
  slash[0] = -1.f;  // forced, so its score does not matter
  slash[150] = 1e30f;
  sel = cpu::vs_select(col.data(), slash.data(), n, 0, 50);
  EXPECT_EQ(sel.columns, range(0, 30));
  want = range(0, 50);
  std::reverse(want.begin(), want.end());
  EXPECT_EQ(sel.offsets, want);
  sel = cpu::vs_select(col.data(), slash.data(), n, 0, 101);
  want = range(0, 100);
  want.push_back(150);
  std::reverse(want.begin(), want.end());
  EXPECT_EQ(sel.offsets, want);
}

TEST(VsSelect, ClampsBudgetsAndIsTopKWithRandomScores) {
  std::mt19937_64 g(61);
  for (int64_t n : {1, 7, 29, 30, 31, 49, 50, 99, 100, 101, 257, 1000}) {
    for (int trial = 0; trial < 5; ++trial) {
      std::vector<float> col = test::random_uniform(n, g()), slash = test::random_uniform(n, g());
      // Some exact ties among non-forced entries.
      for (int64_t i = 0; i + 3 < n; i += 7) col[i + 3] = col[i], slash[i + 3] = slash[i];
      const int v = std::uniform_int_distribution<int>(-5, static_cast<int>(n) + 10)(g);
      const int s = std::uniform_int_distribution<int>(-5, static_cast<int>(n) + 10)(g);
      SCOPED_TRACE(testing::Message() << "n=" << n << " v=" << v << " s=" << s);
      const VsSelection sel = cpu::vs_select(col.data(), slash.data(), n, v, s);
      const int64_t want_v = std::min<int64_t>(n, std::max(v, 30));
      const int64_t want_s = std::min<int64_t>(n, std::max(s, 50));
      ASSERT_EQ(static_cast<int64_t>(sel.columns.size()), want_v);
      ASSERT_EQ(static_cast<int64_t>(sel.offsets.size()), want_s);
      ASSERT_TRUE(std::is_sorted(sel.columns.begin(), sel.columns.end()));
      ASSERT_TRUE(std::is_sorted(sel.offsets.rbegin(), sel.offsets.rend()));
      EXPECT_EQ(sel.offsets.back(), 0);
      // Rank key: forced first, then score descending, then index ascending. Every chosen
      // entry must outrank every entry left out.
      auto check = [&](const std::vector<int>& chosen, const std::vector<float>& score,
                       int forced) {
        std::vector<char> in(n, 0);
        for (int x : chosen) {
          ASSERT_GE(x, 0);
          ASSERT_LT(x, n);
          ASSERT_FALSE(in[x]) << "duplicate " << x;
          in[x] = 1;
        }
        auto outranks = [&](int a, int b) {
          const bool fa = a < forced, fb = b < forced;
          if (fa != fb) return fa;
          if (!fa && score[a] != score[b]) return score[a] > score[b];
          return a < b;
        };
        for (int a = 0; a < n; ++a)
          for (int b = 0; b < n; ++b)
            if (in[a] && !in[b]) {
              ASSERT_TRUE(outranks(a, b)) << a << " chosen over " << b;
            }
      };
      check(sel.columns, col, 30);
      check(sel.offsets, slash, 100);
    }
  }
}

// ------------------------------------------------------------------------- index build
// Checks the CSR of one head against the definition: ranges = maximal runs of the
// window cover, columns = vertical columns c < m1 outside the cover; plus the union of
// both equals the block's key set cell by cell.
void expect_canonical(const VsIndex& ix, int head, const VsSelection& sel, int64_t n) {
  const test::ref::VsBlockSets sets(sel, n);
  for (int64_t b = 0; b < ix.nblocks; ++b) {
    SCOPED_TRACE(testing::Message() << "head " << head << " block " << b);
    const int64_t m1 = std::min<int64_t>(64 * b + 64, n);
    const int64_t hb = head * ix.nblocks + b;
    std::vector<std::pair<int, int>> want_ranges;
    for (int64_t c = 0; c < n; ++c) {
      if (!sets.window[b][c]) continue;
      if (!want_ranges.empty() && want_ranges.back().second == c) {
        ++want_ranges.back().second;
      } else {
        want_ranges.push_back({static_cast<int>(c), static_cast<int>(c + 1)});
      }
    }
    std::vector<std::pair<int, int>> got_ranges;
    for (int64_t t = ix.range_ptr[hb]; t < ix.range_ptr[hb + 1]; ++t)
      got_ranges.push_back({ix.range_lo[t], ix.range_hi[t]});
    EXPECT_EQ(got_ranges, want_ranges);
    std::vector<int> want_cols;
    for (int c : sel.columns)
      if (c < m1 && !sets.window[b][c]) want_cols.push_back(c);
    std::vector<int> got_cols(ix.col.begin() + ix.col_ptr[hb], ix.col.begin() + ix.col_ptr[hb + 1]);
    EXPECT_EQ(got_cols, want_cols);
    // Cell by cell: the index's key set equals the definition's for every key.
    std::vector<char> got(n, 0);
    for (auto [lo, hi] : got_ranges)
      for (int c = lo; c < hi; ++c) got[c] = 1;
    for (int c : got_cols) got[c] = 1;
    for (int64_t c = 0; c < n; ++c) ASSERT_EQ(got[c], sets.keys[b][c]) << "key " << c;
  }
}

TEST(VsBuildIndex, MatchesBruteForceDefinition) {
  std::mt19937_64 g(71);
  for (int64_t n : {1, 2, 5, 63, 64, 65, 100, 127, 128, 129, 200, 333, 1000}) {
    for (int trial = 0; trial < 6; ++trial) {
      SCOPED_TRACE(testing::Message() << "n=" << n << " trial " << trial);
      std::vector<VsSelection> heads;
      const int nh = 3;
      for (int h = 0; h < nh; ++h) {
        const int nv = std::uniform_int_distribution<int>(1, 60)(g);
        const int ns = std::uniform_int_distribution<int>(1, trial % 2 ? 8 : 60)(g);
        heads.push_back(test::ref::random_selection(n, nv, ns, g));
      }
      const VsIndex ix = cpu::vs_build_index(heads, n);
      ASSERT_EQ(ix.seq_len, n);
      ASSERT_EQ(ix.num_heads, nh);
      ASSERT_EQ(ix.nblocks, (n + 63) / 64);
      ASSERT_EQ(ix.range_ptr.size(), static_cast<size_t>(nh * ix.nblocks + 1));
      ASSERT_EQ(ix.col_ptr.size(), static_cast<size_t>(nh * ix.nblocks + 1));
      ASSERT_EQ(ix.range_ptr.back(), static_cast<int64_t>(ix.range_lo.size()));
      ASSERT_EQ(ix.col_ptr.back(), static_cast<int64_t>(ix.col.size()));
      for (int h = 0; h < nh; ++h) expect_canonical(ix, h, heads[h], n);
      // A single head built alone equals its slice of the multi-head index.
      const VsIndex one = cpu::vs_build_index({heads[1]}, n);
      const int64_t r0 = ix.range_ptr[ix.nblocks], c0 = ix.col_ptr[ix.nblocks];
      for (int64_t b = 0; b <= ix.nblocks; ++b) {
        ASSERT_EQ(one.range_ptr[b], ix.range_ptr[ix.nblocks + b] - r0);
        ASSERT_EQ(one.col_ptr[b], ix.col_ptr[ix.nblocks + b] - c0);
      }
    }
  }
}

// Adjacent offsets give touching windows (merged); the column window of a large offset
// clamps at [0, 64).
TEST(VsBuildIndex, MergesTouchingWindowsAndClampsAtZero) {
  const int64_t n = 256;
  VsSelection s;
  s.offsets = {250, 128, 64, 0};  // block 3 (m1 = 256): [192,256) [128,192) [64,128), [0,64)
  s.columns = {5, 100, 255};
  const VsIndex ix = cpu::vs_build_index({s}, n);
  const int64_t b = 3;
  ASSERT_EQ(ix.range_ptr[b + 1] - ix.range_ptr[b], 1);
  EXPECT_EQ(ix.range_lo[ix.range_ptr[b]], 0);
  EXPECT_EQ(ix.range_hi[ix.range_ptr[b]], 256);
  EXPECT_EQ(ix.col_ptr[b + 1] - ix.col_ptr[b], 0);  // every column is inside the range
  // Block 0 (m1 = 64): every offset < 64 (only 0) maps to [0, 64).
  ASSERT_EQ(ix.range_ptr[1] - ix.range_ptr[0], 1);
  EXPECT_EQ(ix.range_lo[0], 0);
  EXPECT_EQ(ix.range_hi[0], 64);
  // Block 1 (m1 = 128): offsets 0 -> [64,128), 64 -> [0,64): touching, one range [0,128).
  ASSERT_EQ(ix.range_ptr[2] - ix.range_ptr[1], 1);
  EXPECT_EQ(ix.range_lo[ix.range_ptr[1]], 0);
  EXPECT_EQ(ix.range_hi[ix.range_ptr[1]], 128);
}

// ------------------------------------------------------------------------- tile counts
TEST(VsMaskTiles, MatchesBruteForceCount) {
  std::mt19937_64 g(81);
  for (int64_t n : {1, 63, 64, 65, 200, 640, 1000}) {
    for (int trial = 0; trial < 4; ++trial) {
      std::vector<VsSelection> heads;
      for (int h = 0; h < 2; ++h) {
        heads.push_back(test::ref::random_selection(n, std::uniform_int_distribution<int>(1, 40)(g),
                                                    std::uniform_int_distribution<int>(1, 20)(g),
                                                    g));
      }
      const VsIndex ix = cpu::vs_build_index(heads, n);
      for (int h = 0; h < 2; ++h) {
        // From the definition: maximal runs of the window cover in 64-column pieces, plus
        // the verticals outside the cover gathered 64 at a time.
        const test::ref::VsBlockSets sets(heads[h], n);
        int64_t want = 0;
        const int64_t nb = (n + 63) / 64;
        for (int64_t b = 0; b < nb; ++b) {
          int64_t run = 0, cols = 0;
          for (int64_t c = 0; c <= n; ++c) {
            const bool in_window = c < n && sets.window[b][c];
            if (in_window) {
              ++run;
            } else {
              want += (run + 63) / 64;
              run = 0;
              if (c < n && sets.keys[b][c]) ++cols;
            }
          }
          want += (cols + 63) / 64;
        }
        EXPECT_EQ(mprefill::vs_mask_tiles(ix, h), want) << "n=" << n << " head " << h;
      }
      EXPECT_EQ(mprefill::vs_mask_tiles(ix, 2), -1);
    }
  }
  // Offsets 0..99 and column 0 at N = 1000: block b's windows merge into one range
  // [max(m1 - 163, 0), m1) of min(m1, 163) columns: 1 + 2 + 14 * 3 pieces of 64; column 0
  // lies outside the range from block 2 on (its range starts at 29): 14 more tiles.
  VsSelection diag;
  for (int d = 99; d >= 0; --d) diag.offsets.push_back(d);
  diag.columns = {0};
  const VsIndex ix = cpu::vs_build_index({diag}, 1000);
  EXPECT_EQ(mprefill::vs_mask_tiles(ix, 0), 1 + 2 + 14 * 3 + 14);
}

}  // namespace
}  // namespace mprefill
