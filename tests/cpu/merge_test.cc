// Log-sum-exp merge of partial attention states: synthetic states against the fp64
// formula, and attention split by key shards (dense, vertical-slash) merged back.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cpu/cpu.h"
#include "tests/cpu/reference.h"

namespace mprefill {
namespace {

using test::ref::Problem;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

MergeParams merge_params(Problem& a, const Problem& b) {
  MergeParams m;
  m.o_a = a.o.data();
  m.lse_a = a.lse.data();
  m.o_b = b.o.data();
  m.lse_b = b.lse.data();
  m.row_stride = static_cast<int64_t>(a.heads) * a.dim;
  m.head_stride = a.dim;
  m.lse_head_stride = a.n_q;
  m.n = a.n_q, m.num_heads = a.heads, m.head_dim = a.dim;
  return m;
}

// Random states, some rows empty on one side or both, lse far apart (no overflow).
TEST(Merge, MatchesFp64FormulaIncludingEmptyStates) {
  const int n = 77, h = 3, d = 40;
  std::mt19937_64 g(101);
  std::vector<float> oa = test::random_uniform(n * h * d, 102),
                     ob = test::random_uniform(n * h * d, 103);
  std::vector<float> la(h * n), lb(h * n);
  std::uniform_real_distribution<float> lse(-5.f, 5.f);
  for (int i = 0; i < h * n; ++i) {
    la[i] = lse(g);
    lb[i] = lse(g);
    if (i % 5 == 0) la[i] += 90.f;  // exp(lse) would overflow fp32 if merged naively
    if (i % 7 == 1) lb[i] -= 200.f;
  }
  // Empty rows: a only, b only, both. Empty states carry o = 0 by contract.
  for (int i : {2, 10, 40}) la[i] = kNegInf;
  for (int i : {3, 10, 41}) lb[i] = kNegInf;
  for (int hh = 0; hh < h; ++hh)
    for (int i = 0; i < n; ++i) {
      float* a = oa.data() + (i * h + hh) * d;
      float* b = ob.data() + (i * h + hh) * d;
      if (la[hh * n + i] == kNegInf) std::fill(a, a + d, 0.f);
      if (lb[hh * n + i] == kNegInf) std::fill(b, b + d, 0.f);
    }
  std::vector<double> want_o(oa.size()), want_l(la.size());
  for (int hh = 0; hh < h; ++hh)
    for (int i = 0; i < n; ++i) {
      const double a = la[hh * n + i], b = lb[hh * n + i];
      const double m = std::max(a, b);
      double wa = 0, wb = 0, l = -test::ref::kInf;
      if (m != -test::ref::kInf) {
        wa = std::exp(a - m), wb = std::exp(b - m);
        l = m + std::log(wa + wb);
        wa /= wa + wb;
        wb = 1 - wa;
      }
      want_l[hh * n + i] = l;
      for (int t = 0; t < d; ++t) {
        const size_t x = (i * h + hh) * d + t;
        want_o[x] = wa * oa[x] + wb * ob[x];
      }
    }
  MergeParams m;
  m.o_a = oa.data(), m.lse_a = la.data(), m.o_b = ob.data(), m.lse_b = lb.data();
  m.row_stride = h * d, m.head_stride = d, m.lse_head_stride = n;
  m.n = n, m.num_heads = h, m.head_dim = d;
  ASSERT_EQ(cpu::merge_states(m), Status::kOk);
  test::ref::expect_close(oa, want_o, 1e-6, "o");
  test::ref::expect_lse_close(la, want_l, 1e-6, "lse");
  for (int t = 0; t < d; ++t) EXPECT_EQ(oa[(10 * h + 0) * d + t], 0.f) << "both empty";
}

TEST(Merge, RejectsBadInput) {
  Problem a(5, 5, 2, 1, 8, 1), b(5, 5, 2, 1, 8, 2);
  MergeParams m = merge_params(a, b);
  m.lse_head_stride = 4;
  EXPECT_EQ(cpu::merge_states(m), Status::kInvalidArgument);
  m = merge_params(a, b);
  m.lse_b = nullptr;
  EXPECT_EQ(cpu::merge_states(m), Status::kInvalidArgument);
}

// Splits the keys [0, N) at `cuts`, attends each shard (k_pos0 = shard start) with
// `attend`, merges the partial states in shard order.
template <typename Attend>
Problem attend_sharded(const Problem& whole, const std::vector<int>& cuts, Attend attend) {
  std::vector<int> edges = {0};
  edges.insert(edges.end(), cuts.begin(), cuts.end());
  edges.push_back(whole.n_k);
  Problem acc = whole;
  for (size_t s = 0; s + 1 < edges.size(); ++s) {
    Problem part = whole;
    const int k0 = edges[s], nk = edges[s + 1] - k0;
    const size_t row = static_cast<size_t>(whole.kv_heads) * whole.dim;
    part.k.assign(whole.k.begin() + k0 * row, whole.k.begin() + (k0 + nk) * row);
    part.v.assign(whole.v.begin() + k0 * row, whole.v.begin() + (k0 + nk) * row);
    part.n_k = nk;
    part.k_pos0 = whole.k_pos0 + k0;
    EXPECT_EQ(attend(part.params()), Status::kOk);
    if (s == 0) {
      acc = part;
    } else {
      EXPECT_EQ(cpu::merge_states(merge_params(acc, part)), Status::kOk);
    }
  }
  return acc;
}

TEST(MergeSplit, DenseKeyShardsMergeToWhole) {
  for (auto [n, causal] : {std::pair{65, true}, {1000, true}, {1000, false}, {2049, true}}) {
    SCOPED_TRACE(testing::Message() << "n=" << n << " causal=" << causal);
    const int h = n > 1000 ? 4 : 8, kvh = h / 4;
    Problem whole(n, n, h, kvh, 64, test::ref::case_seed({n, causal, 201}));
    whole.causal = causal;
    std::mt19937_64 g(test::ref::case_seed({n, 202}));
    std::vector<int> cuts;
    while (cuts.size() < 2) {
      const int c = std::uniform_int_distribution<int>(1, n - 1)(g);
      if (std::find(cuts.begin(), cuts.end(), c) == cuts.end()) cuts.push_back(c);
    }
    std::sort(cuts.begin(), cuts.end());
    const Problem merged = attend_sharded(whole, cuts, cpu::attention_dense);
    const AttentionParams p = whole.params();
    ASSERT_EQ(cpu::attention_dense(p), Status::kOk);
    const auto ref = test::ref::attention(p, test::ref::dense_mask(causal));
    test::ref::expect_close(merged.o, ref.o, 1e-5, "merged o vs fp64");
    test::ref::expect_lse_close(merged.lse, ref.lse, 1e-5, "merged vs fp64");
    const std::vector<double> whole_o(whole.o.begin(), whole.o.end());
    const std::vector<double> whole_l(whole.lse.begin(), whole.lse.end());
    test::ref::expect_close(merged.o, whole_o, 1e-5, "merged o vs unsplit kernel");
    test::ref::expect_lse_close(merged.lse, whole_l, 1e-5, "merged vs unsplit kernel");
  }
}

TEST(MergeSplit, VerticalSlashKeyShardsMergeToWhole) {
  for (int n : {127, 1000}) {
    SCOPED_TRACE(testing::Message() << "n=" << n);
    const int h = 8, kvh = 2;
    Problem whole(n, n, h, kvh, 128, test::ref::case_seed({n, 211}));
    std::mt19937_64 g(test::ref::case_seed({n, 212}));
    std::vector<VsSelection> sel;
    for (int hh = 0; hh < h; ++hh) sel.push_back(test::ref::random_selection(n, 40, 12, g));
    const VsIndex ix = cpu::vs_build_index(sel, n);
    auto attend = [&](const AttentionParams& p) { return cpu::attention_vs(p, view(ix)); };
    const Problem merged = attend_sharded(whole, {n / 4, n / 2 + 3, n - 50}, attend);
    const AttentionParams p = whole.params();
    ASSERT_EQ(attend(p), Status::kOk);
    std::vector<test::ref::VsBlockSets> sets;
    for (const auto& s : sel) sets.emplace_back(s, n);
    const auto ref = test::ref::attention(p, test::ref::vs_mask(sets));
    test::ref::expect_close(merged.o, ref.o, 1e-5, "merged o vs fp64");
    test::ref::expect_lse_close(merged.lse, ref.lse, 1e-5, "merged vs fp64");
    const std::vector<double> whole_o(whole.o.begin(), whole.o.end());
    test::ref::expect_close(merged.o, whole_o, 1e-5, "merged o vs unsplit kernel");
  }
}

// A key shard after every query is empty for all rows (o = 0, lse = -inf); merging it
// on either side leaves the other state bit for bit, and empty (+) empty stays empty.
TEST(MergeSplit, EmptyHalf) {
  const int n = 200, h = 8, kvh = 2, d = 64;
  Problem first(n, n, h, kvh, d, 221);  // queries [0, 200), keys [0, 200)
  Problem later(n, n, h, kvh, d, 222);
  later.q = first.q;
  later.k_pos0 = n;  // keys [200, 400): not causal for any query
  ASSERT_EQ(cpu::attention_dense(first.params()), Status::kOk);
  ASSERT_EQ(cpu::attention_dense(later.params()), Status::kOk);
  for (float x : later.o) ASSERT_EQ(x, 0.f);
  for (float x : later.lse) ASSERT_EQ(x, kNegInf);

  Problem a = first;
  ASSERT_EQ(cpu::merge_states(merge_params(a, later)), Status::kOk);
  EXPECT_EQ(a.o, first.o);
  EXPECT_EQ(a.lse, first.lse);

  Problem b = later;
  ASSERT_EQ(cpu::merge_states(merge_params(b, first)), Status::kOk);
  EXPECT_EQ(b.o, first.o);
  EXPECT_EQ(b.lse, first.lse);

  Problem c = later;
  ASSERT_EQ(cpu::merge_states(merge_params(c, later)), Status::kOk);
  for (float x : c.o) ASSERT_EQ(x, 0.f);
  for (float x : c.lse) ASSERT_EQ(x, kNegInf);
}

}  // namespace
}  // namespace mprefill
