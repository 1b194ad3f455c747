// Block-sparse estimation (pooled scores, diagonal, k, ties) and attention over the
// estimated index against the masked fp64 reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <ostream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kernels/cpu/cpu.h"
#include "tests/cpu/reference.h"

namespace mprefill {
namespace {

struct Est {
  int64_t n;
  int heads, kv_heads, dim;
  std::vector<float> q, k;  // packed [N][heads][dim], [N][kv_heads][dim]
  Est(int64_t n_, int h, int kvh, int d, uint64_t seed) : n(n_), heads(h), kv_heads(kvh), dim(d) {
    q = test::random_normal(static_cast<size_t>(n) * h * d, seed * 2 + 1);
    k = test::random_normal(static_cast<size_t>(n) * kvh * d, seed * 2 + 2);
  }
  cpu::BlockSparseEstimateParams params() const {
    cpu::BlockSparseEstimateParams p;
    p.q = q.data();
    p.k = k.data();
    p.q_row_stride = static_cast<int64_t>(heads) * dim, p.q_head_stride = dim;
    p.k_row_stride = static_cast<int64_t>(kv_heads) * dim, p.k_head_stride = dim;
    p.seq_len = n, p.num_heads = heads, p.num_kv_heads = kv_heads, p.head_dim = dim;
    p.scale = 1.f / std::sqrt(static_cast<float>(dim));
    return p;
  }
  double scale() const { return 1.0 / std::sqrt(static_cast<double>(dim)); }
};

const int* list_of(const BlockSparseIndex& ix, int h, int64_t b) {
  return ix.blocks.data() + (h * ix.nblocks + b) * ix.k;
}

// Structure of every list: min(topk, b + 1) blocks, strictly ascending in [0, b], b
// included, then -1 padding up to ix.k.
void expect_well_formed(const BlockSparseIndex& ix, const std::vector<int>& topk) {
  for (int h = 0; h < ix.num_heads; ++h)
    for (int64_t b = 0; b < ix.nblocks; ++b) {
      SCOPED_TRACE(testing::Message() << "head " << h << " block " << b);
      const int* l = list_of(ix, h, b);
      const int take = static_cast<int>(std::min<int64_t>(topk[h], b + 1));
      for (int t = 0; t < ix.k; ++t) {
        if (t < take) {
          ASSERT_GE(l[t], 0);
          ASSERT_LE(l[t], b);
          if (t) {
            ASSERT_GT(l[t], l[t - 1]);
          }
        } else {
          ASSERT_EQ(l[t], -1);
        }
      }
      ASSERT_EQ(l[take - 1], b) << "diagonal block missing";
    }
}

struct Case {
  int64_t n;
  int heads, kv_heads, dim;
};
void PrintTo(const Case& c, std::ostream* os) {
  *os << "n=" << c.n << " heads=" << c.heads << "/" << c.kv_heads << " dim=" << c.dim;
}

class BlockEstimateTest : public testing::TestWithParam<Case> {};

// Against fp64 pooled scores: every chosen off-diagonal block scores at least as high as
// every block left out (up to fp32 rounding of the scores).
TEST_P(BlockEstimateTest, TopKOfFp64PooledScores) {
  const Case c = GetParam();
  Est e(c.n, c.heads, c.kv_heads, c.dim, test::ref::case_seed({c.n, c.heads, c.dim, 1}));
  std::vector<int> topk(c.heads);
  const int choices[] = {1, 2, 3, 5, 8, 13, 100, 4};
  for (int h = 0; h < c.heads; ++h) topk[h] = choices[h % 8];
  BlockSparseIndex ix;
  ASSERT_EQ(cpu::block_sparse_estimate(e.params(), topk.data(), &ix), Status::kOk);
  ASSERT_EQ(ix.seq_len, c.n);
  ASSERT_EQ(ix.num_heads, c.heads);
  ASSERT_EQ(ix.nblocks, (c.n + 63) / 64);
  ASSERT_EQ(ix.k, *std::max_element(topk.begin(), topk.end()));
  ASSERT_EQ(ix.blocks.size(), static_cast<size_t>(c.heads * ix.nblocks * ix.k));
  expect_well_formed(ix, topk);
  const auto ref = test::ref::block_scores(e.q, e.k, c.n, c.heads, c.kv_heads, c.dim, e.scale());
  const int64_t nb = ix.nblocks;
  for (int h = 0; h < c.heads; ++h)
    for (int64_t b = 0; b < nb; ++b) {
      const double* s = ref.data() + (h * nb + b) * nb;
      double smax = 0;
      for (int64_t j = 0; j <= b; ++j) smax = std::max(smax, std::fabs(s[j]));
      std::set<int> chosen;
      for (int t = 0; t < ix.k; ++t)
        if (list_of(ix, h, b)[t] >= 0) chosen.insert(list_of(ix, h, b)[t]);
      for (int j : chosen) {
        if (j == b) continue;
        for (int64_t x = 0; x < b; ++x) {
          if (chosen.count(static_cast<int>(x))) continue;
          ASSERT_GE(s[j], s[x] - 1e-5 * smax)
              << "head " << h << " block " << b << ": chose " << j << " over " << x;
        }
      }
    }
}

INSTANTIATE_TEST_SUITE_P(Sizes, BlockEstimateTest,
                         testing::Values(Case{1, 8, 2, 64}, Case{63, 8, 2, 48}, Case{65, 8, 2, 128},
                                         Case{127, 8, 2, 64}, Case{1000, 8, 2, 128},
                                         Case{4099, 8, 2, 48}),
                         [](const testing::TestParamInfo<Case>& i) {
                           return "n" + std::to_string(i.param.n) + "_d" +
                                  std::to_string(i.param.dim);
                         });

// Key blocks 3 and 7 are made of rows 2u (q rows are u + noise): every later query block
// must pick exactly {3, 7, b} with k = 3.
TEST(BlockEstimate, FindsPlantedBlocks) {
  const int64_t n = 1000;
  const int h = 4, kvh = 1, d = 64;
  Est e(n, h, kvh, d, 5);
  const std::vector<float> u = test::random_normal(d, 6);
  for (int64_t r = 0; r < n; ++r)
    for (int hh = 0; hh < h; ++hh)
      for (int t = 0; t < d; ++t)
        e.q[(r * h + hh) * d + t] = u[t] + 0.5f * e.q[(r * h + hh) * d + t];
  for (int blk : {3, 7})
    for (int64_t r = 64 * blk; r < 64 * blk + 64; ++r)
      for (int t = 0; t < d; ++t) e.k[r * d + t] = 2.f * u[t] + 0.1f * e.k[r * d + t];
  std::vector<int> topk(h, 3);
  BlockSparseIndex ix;
  ASSERT_EQ(cpu::block_sparse_estimate(e.params(), topk.data(), &ix), Status::kOk);
  expect_well_formed(ix, topk);
  for (int hh = 0; hh < h; ++hh)
    for (int64_t b = 4; b < ix.nblocks; ++b) {
      const int* l = list_of(ix, hh, b);
      if (b > 7) {
        EXPECT_EQ(std::vector<int>(l, l + 3), (std::vector<int>{3, 7, static_cast<int>(b)}))
            << "block " << b;
      } else {
        EXPECT_TRUE(std::find(l, l + 3, 3) != l + 3) << "block " << b;
      }
    }
}

// Identical key rows: every full key block pools to the same vector, so all off-diagonal
// candidates tie exactly and the lowest blocks must be chosen.
TEST(BlockEstimate, TiesGoToTheLowerBlock) {
  const int64_t n = 1000;  // the last block is partial (40 rows)
  const int h = 8, kvh = 2, d = 48;
  Est e(n, h, kvh, d, 7);
  for (int64_t r = 1; r < n; ++r)
    std::copy(e.k.begin(), e.k.begin() + kvh * d, e.k.begin() + r * kvh * d);
  std::vector<int> topk = {1, 2, 3, 4, 5, 9, 16, 17};
  BlockSparseIndex ix;
  ASSERT_EQ(cpu::block_sparse_estimate(e.params(), topk.data(), &ix), Status::kOk);
  expect_well_formed(ix, topk);
  for (int hh = 0; hh < h; ++hh)
    for (int64_t b = 0; b < ix.nblocks; ++b) {
      const int take = static_cast<int>(std::min<int64_t>(topk[hh], b + 1));
      std::vector<int> want;
      for (int j = 0; j < take - 1; ++j) want.push_back(j);
      want.push_back(static_cast<int>(b));
      const int* l = list_of(ix, hh, b);
      EXPECT_EQ(std::vector<int>(l, l + take), want) << "head " << hh << " block " << b;
    }
}

TEST(BlockEstimate, RejectsBadInput) {
  Est e(200, 4, 2, 64, 8);
  std::vector<int> topk = {2, 2, 0, 2};
  BlockSparseIndex ix;
  EXPECT_EQ(cpu::block_sparse_estimate(e.params(), topk.data(), &ix), Status::kInvalidArgument);
  topk[2] = 3;
  auto p = e.params();
  p.dtype = DType::kBF16;
  EXPECT_EQ(cpu::block_sparse_estimate(p, topk.data(), &ix), Status::kUnsupported);
  p = e.params();
  p.num_kv_heads = 3;
  EXPECT_EQ(cpu::block_sparse_estimate(p, topk.data(), &ix), Status::kInvalidArgument);
  EXPECT_EQ(cpu::block_sparse_estimate(e.params(), nullptr, &ix), Status::kInvalidArgument);
}

// Estimate, then attend over exactly that index; the reference applies the listed blocks
// cell by cell (causal within).
TEST(BlockSparseAttention, EstimatedIndexMatchesMaskedReference) {
  for (int64_t n : {65, 1000}) {
    SCOPED_TRACE(testing::Message() << "n=" << n);
    const int h = 8, kvh = 2, d = 64;
    test::ref::Problem pr(static_cast<int>(n), static_cast<int>(n), h, kvh, d,
                          test::ref::case_seed({n, 9}));
    Est e(n, h, kvh, d, 0);
    e.q = pr.q;
    e.k = pr.k;
    std::vector<int> topk = {1, 2, 3, 4, 6, 8, 10, 20};
    BlockSparseIndex ix;
    ASSERT_EQ(cpu::block_sparse_estimate(e.params(), topk.data(), &ix), Status::kOk);
    std::vector<std::vector<std::set<int>>> lists(h, std::vector<std::set<int>>(ix.nblocks));
    for (int hh = 0; hh < h; ++hh)
      for (int64_t b = 0; b < ix.nblocks; ++b)
        for (int t = 0; t < ix.k; ++t)
          if (list_of(ix, hh, b)[t] >= 0) lists[hh][b].insert(list_of(ix, hh, b)[t]);
    const AttentionParams p = pr.params();
    ASSERT_EQ(cpu::attention_block_sparse(p, view(ix)), Status::kOk);
    const auto ref = test::ref::attention(p, test::ref::block_mask(lists));
    test::ref::expect_close(pr.o, ref.o, 1e-5, "o");
    test::ref::expect_lse_close(pr.lse, ref.lse, 1e-5, "lse");
  }
}

}  // namespace
}  // namespace mprefill
