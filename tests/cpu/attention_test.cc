// CPU attention kernels (dense, A-shape, vertical-slash, block-sparse) against the fp64
// reference with the mask applied cell by cell (tests/cpu/reference.h).
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

using test::ref::Problem;
constexpr double kTol = 1e-5;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Case {
  int n;  // sequence length (queries = keys unless a test says otherwise)
  int heads, kv_heads, dim;
  bool causal;
};
void PrintTo(const Case& c, std::ostream* os) {
  *os << "n=" << c.n << " heads=" << c.heads << "/" << c.kv_heads << " dim=" << c.dim
      << (c.causal ? " causal" : " non-causal");
}
std::string case_name(const testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  return "n" + std::to_string(c.n) + "_h" + std::to_string(c.heads) + "kv" +
         std::to_string(c.kv_heads) + "_d" + std::to_string(c.dim) +
         (c.causal ? "_causal" : "_full");
}

// Lengths 1, 63, 65, 127 with every head_dim; 1000 and 4099 with fewer heads (GQA 4:1
// throughout) so that the fp64 reference stays fast.
std::vector<Case> cases(bool with_noncausal) {
  std::vector<Case> out;
  for (int n : {1, 63, 65, 127})
    for (int d : {48, 64, 128}) {
      out.push_back({n, 8, 2, d, true});
      if (with_noncausal) out.push_back({n, 8, 2, d, false});
    }
  for (int d : {48, 128}) out.push_back({1000, 4, 1, d, true});
  if (with_noncausal) out.push_back({1000, 4, 1, 64, false});
  out.push_back({4099, 4, 1, 64, true});
  if (with_noncausal) out.push_back({4099, 4, 1, 48, false});
  return out;
}

uint64_t seed_of(const Case& c, int salt) {
  return test::ref::case_seed({c.n, c.heads, c.kv_heads, c.dim, c.causal, salt});
}

void expect_rows_empty(const Problem& pr, int64_t i0, int64_t i1) {
  for (int h = 0; h < pr.heads; ++h)
    for (int64_t i = i0; i < i1; ++i) {
      EXPECT_EQ(pr.lse[h * pr.n_q + i], kNegInf) << "head " << h << " row " << i;
      for (int t = 0; t < pr.dim; ++t)
        ASSERT_EQ(pr.o[(i * pr.heads + h) * pr.dim + t], 0.f) << "head " << h << " row " << i;
    }
}

// ------------------------------------------------------------------------- dense
class DenseTest : public testing::TestWithParam<Case> {};

TEST_P(DenseTest, MatchesFp64Reference) {
  const Case c = GetParam();
  Problem pr(c.n, c.n, c.heads, c.kv_heads, c.dim, seed_of(c, 1));
  pr.causal = c.causal;
  const AttentionParams p = pr.params();
  ASSERT_EQ(cpu::attention_dense(p), Status::kOk);
  const auto ref = test::ref::attention(p, test::ref::dense_mask(c.causal));
  test::ref::expect_close(pr.o, ref.o, kTol, "o");
  test::ref::expect_lse_close(pr.lse, ref.lse, kTol, "lse");
}
INSTANTIATE_TEST_SUITE_P(Sizes, DenseTest, testing::ValuesIn(cases(true)), case_name);

// A ring step: queries at global rows [200, 600), a key shard at [300, 700). Rows
// 200..299 see no key of the shard (o = 0, lse = -inf); rows 300..599 see a prefix.
TEST(Dense, RingStepWithPositionOffsets) {
  for (bool causal : {true, false}) {
    SCOPED_TRACE(causal ? "causal" : "full");
    Problem pr(400, 400, 8, 2, 64, test::ref::case_seed({7, causal}));
    pr.q_pos0 = 200;
    pr.k_pos0 = 300;
    pr.causal = causal;
    const AttentionParams p = pr.params();
    ASSERT_EQ(cpu::attention_dense(p), Status::kOk);
    const auto ref = test::ref::attention(p, test::ref::dense_mask(causal));
    test::ref::expect_close(pr.o, ref.o, kTol, "o");
    test::ref::expect_lse_close(pr.lse, ref.lse, kTol, "lse");
    if (causal) expect_rows_empty(pr, 0, 100);
  }
}

// Padded strides (row, head and lse) give bit-identical results to the packed layout.
TEST(Dense, StridedLayoutMatchesPacked) {
  const int n = 130, h = 8, kvh = 2, d = 48;
  Problem pr(n, n, h, kvh, d, test::ref::case_seed({8}));
  AttentionParams packed = pr.params();
  ASSERT_EQ(cpu::attention_dense(packed), Status::kOk);

  const int64_t qhs = d + 5, qrs = h * qhs + 3, khs = d + 7, krs = kvh * khs + 1;
  const int64_t vhs = d + 2, vrs = kvh * vhs + 9, ohs = d + 4, ors = h * ohs + 6, lhs = n + 11;
  std::vector<float> q(n * qrs, 1e30f), k(n * krs, 1e30f), v(n * vrs, 1e30f);
  std::vector<float> o(n * ors, 7.f), lse(h * lhs, 7.f);
  for (int i = 0; i < n; ++i) {
    for (int hh = 0; hh < h; ++hh)
      for (int t = 0; t < d; ++t) q[i * qrs + hh * qhs + t] = pr.q[(i * h + hh) * d + t];
    for (int hh = 0; hh < kvh; ++hh)
      for (int t = 0; t < d; ++t) {
        k[i * krs + hh * khs + t] = pr.k[(i * kvh + hh) * d + t];
        v[i * vrs + hh * vhs + t] = pr.v[(i * kvh + hh) * d + t];
      }
  }
  AttentionParams p = packed;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.o = o.data();
  p.lse = lse.data();
  p.q_row_stride = qrs, p.q_head_stride = qhs, p.k_row_stride = krs, p.k_head_stride = khs;
  p.v_row_stride = vrs, p.v_head_stride = vhs, p.o_row_stride = ors, p.o_head_stride = ohs;
  p.lse_head_stride = lhs;
  ASSERT_EQ(cpu::attention_dense(p), Status::kOk);
  for (int i = 0; i < n; ++i)
    for (int hh = 0; hh < h; ++hh) {
      ASSERT_EQ(lse[hh * lhs + i], pr.lse[hh * n + i]) << i << " " << hh;
      for (int t = 0; t < d; ++t)
        ASSERT_EQ(o[i * ors + hh * ohs + t], pr.o[(i * h + hh) * d + t]) << i << " " << hh;
      for (int t = d; t < ohs; ++t) ASSERT_EQ(o[i * ors + hh * ohs + t], 7.f) << "padding written";
    }
}

TEST(Dense, NullLseIsAllowed) {
  Problem pr(65, 65, 4, 1, 64, test::ref::case_seed({9}));
  AttentionParams p = pr.params();
  p.lse = nullptr;
  ASSERT_EQ(cpu::attention_dense(p), Status::kOk);
  const auto ref = test::ref::attention(p, test::ref::dense_mask(true));
  test::ref::expect_close(pr.o, ref.o, kTol, "o");
}

TEST(Dense, RejectsBadInput) {
  Problem pr(10, 10, 4, 2, 64, 1);
  AttentionParams p = pr.params();
  p.dtype = DType::kBF16;
  EXPECT_EQ(cpu::attention_dense(p), Status::kUnsupported);
  p = pr.params();
  p.q = nullptr;
  EXPECT_EQ(cpu::attention_dense(p), Status::kInvalidArgument);
  p = pr.params();
  p.num_heads = 3;  // not a multiple of num_kv_heads
  EXPECT_EQ(cpu::attention_dense(p), Status::kInvalidArgument);
  p = pr.params();
  p.scale = 0.f;
  EXPECT_EQ(cpu::attention_dense(p), Status::kInvalidArgument);
}

// ------------------------------------------------------------------------- A-shape
class AShapeTest : public testing::TestWithParam<Case> {};

TEST_P(AShapeTest, MatchesMaskedReference) {
  const Case c = GetParam();
  std::mt19937_64 g(seed_of(c, 2));
  Problem pr(c.n, c.n, c.heads, c.kv_heads, c.dim, seed_of(c, 3));
  // Head 0: diagonal only; head 1: local window beyond N (dense causal); others random.
  std::vector<int> n_init(c.heads), n_local(c.heads);
  for (int h = 0; h < c.heads; ++h) {
    n_init[h] = std::uniform_int_distribution<int>(0, 128)(g);
    n_local[h] = std::uniform_int_distribution<int>(1, 300)(g);
  }
  n_init[0] = 0, n_local[0] = 1;
  n_init[1] = 4, n_local[1] = c.n + 5;
  const AttentionParams p = pr.params();
  ASSERT_EQ(cpu::attention_ashape(p, {n_init.data(), n_local.data()}), Status::kOk);
  const auto ref = test::ref::attention(p, test::ref::ashape_mask(n_init, n_local));
  test::ref::expect_close(pr.o, ref.o, kTol, "o");
  test::ref::expect_lse_close(pr.lse, ref.lse, kTol, "lse");
}
INSTANTIATE_TEST_SUITE_P(Sizes, AShapeTest, testing::ValuesIn(cases(false)), case_name);

TEST(AShape, RingStepAndEmptyRows) {
  // Queries [500, 800), keys [100, 600): with n_local small, rows far from the shard
  // see only the sink columns (not in the shard) -> empty.
  Problem pr(300, 500, 8, 2, 64, test::ref::case_seed({10}));
  pr.q_pos0 = 500;
  pr.k_pos0 = 100;
  std::vector<int> n_init = {0, 3, 150, 0, 64, 200, 1, 0};
  std::vector<int> n_local = {1, 20, 40, 250, 64, 7, 1000, 0};
  const AttentionParams p = pr.params();
  ASSERT_EQ(cpu::attention_ashape(p, {n_init.data(), n_local.data()}), Status::kOk);
  const auto ref = test::ref::attention(p, test::ref::ashape_mask(n_init, n_local));
  test::ref::expect_close(pr.o, ref.o, kTol, "o");
  test::ref::expect_lse_close(pr.lse, ref.lse, kTol, "lse");
}

TEST(AShape, RejectsBadInput) {
  Problem pr(10, 10, 4, 2, 64, 2);
  std::vector<int> n_init(4, 1), n_local(4, 1);
  AttentionParams p = pr.params();
  p.causal = false;
  EXPECT_EQ(cpu::attention_ashape(p, {n_init.data(), n_local.data()}), Status::kInvalidArgument);
  p = pr.params();
  EXPECT_EQ(cpu::attention_ashape(p, {nullptr, n_local.data()}), Status::kInvalidArgument);
  n_local[2] = -1;
  EXPECT_EQ(cpu::attention_ashape(p, {n_init.data(), n_local.data()}), Status::kInvalidArgument);
}

// ------------------------------------------------------------------------- vertical-slash
// Random selections for heads 0..H (the call uses heads 1..H through head_offset = 1).
std::vector<VsSelection> random_selections(int64_t n, int count, std::mt19937_64& g) {
  std::vector<VsSelection> sel;
  for (int h = 0; h < count; ++h) {
    const int nv = std::uniform_int_distribution<int>(1, 80)(g);
    const int ns = std::uniform_int_distribution<int>(1, 40)(g);
    sel.push_back(test::ref::random_selection(n, nv, ns, g));
  }
  return sel;
}

std::vector<test::ref::VsBlockSets> block_sets(const std::vector<VsSelection>& sel, int64_t n,
                                               int first, int count) {
  std::vector<test::ref::VsBlockSets> sets;
  for (int h = first; h < first + count; ++h) sets.emplace_back(sel[h], n);
  return sets;
}

class VsTest : public testing::TestWithParam<Case> {};

TEST_P(VsTest, MatchesMaskedReference) {
  const Case c = GetParam();
  std::mt19937_64 g(seed_of(c, 4));
  Problem pr(c.n, c.n, c.heads, c.kv_heads, c.dim, seed_of(c, 5));
  const auto sel = random_selections(c.n, c.heads + 1, g);
  const VsIndex ix = cpu::vs_build_index(sel, c.n);
  const AttentionParams p = pr.params();
  ASSERT_EQ(cpu::attention_vs(p, view(ix), 1), Status::kOk);
  const auto sets = block_sets(sel, c.n, 1, c.heads);
  const auto ref = test::ref::attention(p, test::ref::vs_mask(sets));
  test::ref::expect_close(pr.o, ref.o, kTol, "o");
  test::ref::expect_lse_close(pr.lse, ref.lse, kTol, "lse");
}
INSTANTIATE_TEST_SUITE_P(Sizes, VsTest, testing::ValuesIn(cases(false)), case_name);

TEST(Vs, RingStepKeyShard) {
  // N = 1000; queries [640, 1000) attend the key shard [200, 700) of the global mask.
  const int64_t n = 1000;
  std::mt19937_64 g(test::ref::case_seed({11}));
  Problem pr(360, 500, 8, 2, 128, test::ref::case_seed({12}));
  pr.q_pos0 = 640;
  pr.k_pos0 = 200;
  const auto sel = random_selections(n, 8, g);
  const VsIndex ix = cpu::vs_build_index(sel, n);
  const AttentionParams p = pr.params();
  ASSERT_EQ(cpu::attention_vs(p, view(ix), 0), Status::kOk);
  const auto sets = block_sets(sel, n, 0, 8);
  const auto ref = test::ref::attention(p, test::ref::vs_mask(sets));
  test::ref::expect_close(pr.o, ref.o, kTol, "o");
  test::ref::expect_lse_close(pr.lse, ref.lse, kTol, "lse");
}

TEST(Vs, WithEstimatedIndex) {
  const int n = 1000, h = 8, kvh = 2, d = 64;
  Problem pr(n, n, h, kvh, d, test::ref::case_seed({13}));
  VsEstimateParams e;
  e.q_last = pr.q.data() + static_cast<size_t>(n - 64) * h * d;
  e.k = pr.k.data();
  e.q_row_stride = h * d, e.q_head_stride = d, e.k_row_stride = kvh * d, e.k_head_stride = d;
  e.n_last = 64, e.seq_len = n, e.n_k = n, e.k_pos0 = 0;
  e.num_heads = h, e.num_kv_heads = kvh, e.head_dim = d;
  e.scale = 1.f / std::sqrt(static_cast<float>(d));
  std::vector<int> vb = {30, 60, 100, 0, 200, 45, 31, 1000}, sb = {50, 60, 120, 0, 400, 51, 90, 5};
  std::vector<VsSelection> sel;
  ASSERT_EQ(cpu::vs_estimate(e, vb.data(), sb.data(), &sel), Status::kOk);
  const VsIndex ix = cpu::vs_build_index(sel, n);
  const AttentionParams p = pr.params();
  ASSERT_EQ(cpu::attention_vs(p, view(ix)), Status::kOk);
  const auto sets = block_sets(sel, n, 0, h);
  const auto ref = test::ref::attention(p, test::ref::vs_mask(sets));
  test::ref::expect_close(pr.o, ref.o, kTol, "o");
  test::ref::expect_lse_close(pr.lse, ref.lse, kTol, "lse");
}

TEST(Vs, RejectsBadInput) {
  const int n = 200;
  Problem pr(n, n, 4, 2, 64, 3);
  std::mt19937_64 g(3);
  const auto sel = random_selections(n, 4, g);
  VsIndex ix = cpu::vs_build_index(sel, n);
  AttentionParams p = pr.params();
  p.causal = false;
  EXPECT_EQ(cpu::attention_vs(p, view(ix)), Status::kInvalidArgument);
  p = pr.params();
  p.q_pos0 = 1;  // rows beyond the index's N
  EXPECT_EQ(cpu::attention_vs(p, view(ix)), Status::kInvalidArgument);
  p = pr.params();
  p.dtype = DType::kF16;
  EXPECT_EQ(cpu::attention_vs(p, view(ix)), Status::kUnsupported);
  p = pr.params();
  VsIndexView bad = view(ix);
  bad.nblocks += 1;
  EXPECT_EQ(cpu::attention_vs(p, bad), Status::kInvalidArgument);
  // A column inside a range would be attended twice: not a canonical index.
  VsIndex dup = ix;
  const int64_t hb = 3;  // head 0, block 3
  ASSERT_GT(dup.range_ptr[hb + 1], dup.range_ptr[hb]);
  const int inside = dup.range_lo[dup.range_ptr[hb]];
  dup.col.insert(dup.col.begin() + dup.col_ptr[hb], inside);
  for (size_t t = hb + 1; t < dup.col_ptr.size(); ++t) ++dup.col_ptr[t];
  EXPECT_EQ(cpu::attention_vs(p, view(dup)), Status::kInvalidArgument);
}

// ------------------------------------------------------------------------- block-sparse
// Random lists: the diagonal plus up to k - 1 random earlier blocks, ascending, -1 padded.
BlockSparseIndex random_block_index(int64_t n, int heads, int k, std::mt19937_64& g,
                                    std::vector<std::vector<std::set<int>>>* lists) {
  BlockSparseIndex ix;
  ix.seq_len = n, ix.num_heads = heads, ix.nblocks = num_blocks(n), ix.k = k;
  ix.blocks.assign(static_cast<size_t>(heads) * ix.nblocks * k, -1);
  lists->assign(heads, std::vector<std::set<int>>(ix.nblocks));
  for (int h = 0; h < heads; ++h)
    for (int64_t b = 0; b < ix.nblocks; ++b) {
      std::set<int>& s = (*lists)[h][b];
      s.insert(static_cast<int>(b));
      const int want = std::uniform_int_distribution<int>(1, k)(g);
      while (static_cast<int>(s.size()) < std::min<int64_t>(want, b + 1)) {
        s.insert(std::uniform_int_distribution<int>(0, static_cast<int>(b))(g));
      }
      std::copy(s.begin(), s.end(), ix.blocks.begin() + (h * ix.nblocks + b) * k);
    }
  return ix;
}

class BlockSparseTest : public testing::TestWithParam<Case> {};

TEST_P(BlockSparseTest, MatchesMaskedReference) {
  const Case c = GetParam();
  std::mt19937_64 g(seed_of(c, 6));
  Problem pr(c.n, c.n, c.heads, c.kv_heads, c.dim, seed_of(c, 7));
  std::vector<std::vector<std::set<int>>> lists;
  const BlockSparseIndex ix = random_block_index(c.n, c.heads + 2, 12, g, &lists);
  const AttentionParams p = pr.params();
  ASSERT_EQ(cpu::attention_block_sparse(p, view(ix), 2), Status::kOk);
  lists.erase(lists.begin(), lists.begin() + 2);
  const auto ref = test::ref::attention(p, test::ref::block_mask(lists));
  test::ref::expect_close(pr.o, ref.o, kTol, "o");
  test::ref::expect_lse_close(pr.lse, ref.lse, kTol, "lse");
}
INSTANTIATE_TEST_SUITE_P(Sizes, BlockSparseTest, testing::ValuesIn(cases(false)), case_name);

TEST(BlockSparse, RingStepKeyShard) {
  const int64_t n = 1100;
  std::mt19937_64 g(test::ref::case_seed({14}));
  Problem pr(400, 333, 8, 2, 64, test::ref::case_seed({15}));
  pr.q_pos0 = 700;
  pr.k_pos0 = 450;
  std::vector<std::vector<std::set<int>>> lists;
  const BlockSparseIndex ix = random_block_index(n, 8, 5, g, &lists);
  const AttentionParams p = pr.params();
  ASSERT_EQ(cpu::attention_block_sparse(p, view(ix)), Status::kOk);
  const auto ref = test::ref::attention(p, test::ref::block_mask(lists));
  test::ref::expect_close(pr.o, ref.o, kTol, "o");
  test::ref::expect_lse_close(pr.lse, ref.lse, kTol, "lse");
}

TEST(BlockSparse, RejectsBadInput) {
  const int64_t n = 300;
  std::mt19937_64 g(4);
  Problem pr(n, n, 4, 1, 64, 4);
  std::vector<std::vector<std::set<int>>> lists;
  BlockSparseIndex ix = random_block_index(n, 4, 3, g, &lists);
  AttentionParams p = pr.params();
  p.causal = false;
  EXPECT_EQ(cpu::attention_block_sparse(p, view(ix)), Status::kInvalidArgument);
  p = pr.params();
  BlockSparseIndex bad = ix;
  bad.blocks[4 * 3 + 0] = 4, bad.blocks[4 * 3 + 1] = 2;  // head 0 block 4: not ascending
  EXPECT_EQ(cpu::attention_block_sparse(p, view(bad)), Status::kInvalidArgument);
  bad = ix;
  bad.blocks[2 * 3 + 2] = 99;  // out of range
  EXPECT_EQ(cpu::attention_block_sparse(p, view(bad)), Status::kInvalidArgument);
  EXPECT_EQ(cpu::attention_block_sparse(p, view(ix)), Status::kOk);
}

}  // namespace
}  // namespace mprefill
