// Distributed vertical-slash estimation (CPU, MPI backend) under mpirun: every rank builds
// the same global Q/K, estimates from its zigzag shards and checks scores and selections
// against one single-process cpu::vs_estimate (and its own score arrays) over all keys;
// failures are summed over ranks.
#include "engine/distributed_estimate.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "comm/mpi_comm.h"
#include "kernels/cpu/cpu.h"
#include "tests/mpi/mpi_testutil.h"

namespace mprefill {
namespace {

using test::mpi::expect_all_ranks_ok;
using test::mpi::random_tensor;
using test::mpi::slice;
using test::mpi::world;

constexpr float kRelTol = 1e-5f;  // scores: fp32 sums in another order

struct Reference {
  std::vector<VsSelection> sel;
  VsGlobalScores scores;
};

// Single process: cpu::vs_estimate for the selections, the two passes for the scores.
Reference single_process(const std::vector<float>& q_all, const std::vector<float>& k_all,
                         int64_t n, int heads, int kv_heads, int d, float scale, const int* vb,
                         const int* sb) {
  const int n_last = static_cast<int>(std::min<int64_t>(kBlock, n));
  VsEstimateParams p;
  p.q_last = q_all.data() + (n - n_last) * heads * d;
  p.k = k_all.data();
  p.q_row_stride = int64_t{heads} * d;
  p.q_head_stride = d;
  p.k_row_stride = int64_t{kv_heads} * d;
  p.k_head_stride = d;
  p.n_last = n_last;
  p.seq_len = n;
  p.n_k = static_cast<int>(n);
  p.k_pos0 = 0;
  p.num_heads = heads;
  p.num_kv_heads = kv_heads;
  p.head_dim = d;
  p.scale = scale;
  Reference ref;
  EXPECT_EQ(cpu::vs_estimate(p, vb, sb, &ref.sel), Status::kOk);
  RowStats st;
  EXPECT_EQ(cpu::vs_row_stats(p, &st), Status::kOk);
  ref.scores.col.assign(static_cast<size_t>(heads) * n, 0.f);
  ref.scores.slash.assign(ref.scores.col.size(), 0.f);
  EXPECT_EQ(cpu::vs_scores(p, st, ref.scores.col.data(), ref.scores.slash.data()), Status::kOk);
  return ref;
}

bool close(float a, float b) {
  return std::fabs(a - b) <= kRelTol * std::max(std::fabs(a), std::fabs(b)) + 1e-30f;
}

// Every score within tolerance; a selection mismatch only between entries whose scores
// tie within the tolerance (the boundary of the top-k). Returns the mismatch count.
int compare(const Reference& ref, const std::vector<VsSelection>& got, const VsGlobalScores& gs,
            int64_t n, int heads, const std::string& what, bool* ok) {
  int mismatches = 0;
  for (int h = 0; h < heads; ++h) {
    const float* rc = ref.scores.col.data() + h * n;
    const float* rs = ref.scores.slash.data() + h * n;
    const float* gc = gs.col.data() + h * n;
    const float* gsl = gs.slash.data() + h * n;
    for (int64_t i = 0; i < n; ++i) {
      if (!close(rc[i], gc[i]) || !close(rs[i], gsl[i])) {
        ADD_FAILURE() << what << " head " << h << " index " << i << ": col " << gc[i] << " vs "
                      << rc[i] << ", slash " << gsl[i] << " vs " << rs[i];
        *ok = false;
        return mismatches;
      }
    }
    auto check = [&](const std::vector<int>& a, const std::vector<int>& b, const float* s,
                     const char* kind) {
      if (a.size() != b.size()) {
        ADD_FAILURE() << what << " head " << h << " " << kind << " count " << a.size() << " vs "
                      << b.size();
        *ok = false;
        return;
      }
      std::vector<int> only_a, only_b;
      std::vector<int> sa(a), sb(b);
      std::sort(sa.begin(), sa.end());
      std::sort(sb.begin(), sb.end());
      std::set_difference(sa.begin(), sa.end(), sb.begin(), sb.end(), std::back_inserter(only_a));
      std::set_difference(sb.begin(), sb.end(), sa.begin(), sa.end(), std::back_inserter(only_b));
      for (size_t i = 0; i < only_a.size(); ++i) {
        ++mismatches;
        if (!close(s[only_a[i]], s[only_b[i]])) {
          ADD_FAILURE() << what << " head " << h << " " << kind << ": " << only_a[i] << " vs "
                        << only_b[i] << " not a near-tie (" << s[only_a[i]] << ", " << s[only_b[i]]
                        << ")";
          *ok = false;
        }
      }
    };
    check(got[h].columns, ref.sel[h].columns, rc, "columns");
    check(got[h].offsets, ref.sel[h].offsets, rs, "offsets");
    if (!std::is_sorted(got[h].columns.begin(), got[h].columns.end()) ||
        !std::is_sorted(got[h].offsets.rbegin(), got[h].offsets.rend())) {
      ADD_FAILURE() << what << " head " << h << ": selection not in canonical order";
      *ok = false;
    }
  }
  return mismatches;
}

// All ranks must return the same selections: compare a hash through a MAX/SUM reduce.
bool same_on_all_ranks(comm::Communicator& c, const std::vector<VsSelection>& sel) {
  uint32_t hsh = 2166136261u;
  auto mix = [&](int v) { hsh = (hsh ^ static_cast<uint32_t>(v)) * 16777619u; };
  for (const auto& s : sel) {
    for (int v : s.columns) mix(v);
    mix(-1);
    for (int v : s.offsets) mix(v);
    mix(-2);
  }
  int32_t mine = static_cast<int32_t>(hsh & 0x7fffffff), mx = 0, mn = 0, neg = -mine;
  if (c.all_reduce(&mine, &mx, 1, DType::kI32, comm::ReduceOp::kMax, nullptr) != Status::kOk ||
      c.all_reduce(&neg, &mn, 1, DType::kI32, comm::ReduceOp::kMax, nullptr) != Status::kOk) {
    return false;
  }
  return mx == -mn;
}

TEST(DistributedEstimate, MatchesSingleProcess) {
  auto c = world();
  const int sp = c->size(), r = c->rank();
  const int heads = 8, kv_heads = 2, d = 64;
  const float scale = 1.f / 8.f;
  // Per head: below the clamps, at them, and well above.
  const int vb[heads] = {1, 30, 31, 45, 100, 257, 1000, 5000};
  const int sb[heads] = {0, 50, 99, 100, 101, 160, 700, 5000};
  bool ok = true;
  int mismatches = 0;
  for (int64_t n : {1, 63, 200, 1000, 4099}) {
    const int64_t q_row = int64_t{heads} * d, k_row = int64_t{kv_heads} * d;
    const uint32_t seed = static_cast<uint32_t>(n * 977 + 5);
    const auto q_all = random_tensor(n * q_row, seed, 2.f);
    const auto k_all = random_tensor(n * k_row, seed + 1, 2.f);
    const TokenRanges mine = plan_sequence_parallel(n, sp)[r];
    const auto q = slice(q_all, mine, q_row), k = slice(k_all, mine, k_row);
    std::vector<VsSelection> got;
    VsGlobalScores gs;
    std::string err;
    const Status s = vs_estimate_distributed(*c, mine, n, q.empty() ? nullptr : q.data(),
                                             k.empty() ? nullptr : k.data(), heads, kv_heads, d,
                                             scale, vb, sb, &got, &err, &gs);
    const std::string what = "n " + std::to_string(n) + " rank " + std::to_string(r);
    if (s != Status::kOk) {
      ADD_FAILURE() << what << ": " << err;
      ok = false;
      continue;
    }
    const Reference ref = single_process(q_all, k_all, n, heads, kv_heads, d, scale, vb, sb);
    mismatches += compare(ref, got, gs, n, heads, what, &ok);
    if (!same_on_all_ranks(*c, got)) {
      ADD_FAILURE() << what << ": selections differ between ranks";
      ok = false;
    }
  }
  EXPECT_EQ(mismatches, 0) << "near-tie mismatches with random data";
  expect_all_ranks_ok(*c, ok);
}

// Adaptive thresholds (issue 18): the selections are cpu::vs_select's mass cut of the global
// scores (compared with the single process within tolerance), the same on every rank.
// The cut is checked against the run's own scores: fp32 sums in another order may move a
// cut whose cumulative mass lies within rounding of tau.
TEST(DistributedEstimate, AdaptiveThresholdsCutTheGlobalScores) {
  auto c = world();
  const int sp = c->size(), r = c->rank();
  const int heads = 4, kv_heads = 2, d = 32;
  const float scale = 1.f / 4.f;
  const int vb[heads] = {1000, 40, 5000, 300}, sb[heads] = {1000, 100, 5000, 300};
  const double tau[heads] = {0.5, 0.9, 1.0, 0.8};
  bool ok = true;
  for (int64_t n : {63, 700, 2050}) {
    const int64_t q_row = int64_t{heads} * d, k_row = int64_t{kv_heads} * d;
    const uint32_t seed = static_cast<uint32_t>(n * 31 + 7);
    const auto q_all = random_tensor(n * q_row, seed, 2.f);
    const auto k_all = random_tensor(n * k_row, seed + 1, 2.f);
    const TokenRanges mine = plan_sequence_parallel(n, sp)[r];
    const auto q = slice(q_all, mine, q_row), k = slice(k_all, mine, k_row);
    std::vector<VsSelection> got;
    VsGlobalScores gs;
    std::string err;
    const std::string what = "n " + std::to_string(n) + " rank " + std::to_string(r);
    if (vs_estimate_distributed(*c, mine, n, q.empty() ? nullptr : q.data(),
                                k.empty() ? nullptr : k.data(), heads, kv_heads, d, scale, vb, sb,
                                &got, &err, &gs, tau) != Status::kOk) {
      ADD_FAILURE() << what << ": " << err;
      ok = false;
      continue;
    }
    const Reference ref = single_process(q_all, k_all, n, heads, kv_heads, d, scale, vb, sb);
    for (int h = 0; h < heads; ++h) {
      const VsSelection want =
          cpu::vs_select(gs.col.data() + h * n, gs.slash.data() + h * n, n, vb[h], sb[h], tau[h]);
      if (got[h].columns != want.columns || got[h].offsets != want.offsets) {
        ADD_FAILURE() << what << " head " << h << ": not the mass cut of the global scores";
        ok = false;
      }
      for (int64_t i = 0; i < n; ++i)
        if (!close(gs.col[h * n + i], ref.scores.col[h * n + i]) ||
            !close(gs.slash[h * n + i], ref.scores.slash[h * n + i])) {
          ADD_FAILURE() << what << " head " << h << " index " << i << ": scores differ";
          ok = false;
          break;
        }
      // tau 1 with caps >= N: every column and diagonal.
      if (tau[h] == 1.0 && (got[h].columns.size() != static_cast<size_t>(n) ||
                            got[h].offsets.size() != static_cast<size_t>(n))) {
        ADD_FAILURE() << what << " head " << h << ": tau 1 kept " << got[h].columns.size()
                      << " columns, " << got[h].offsets.size() << " offsets";
        ok = false;
      }
    }
    if (!same_on_all_ranks(*c, got)) {
      ADD_FAILURE() << what << ": selections differ between ranks";
      ok = false;
    }
    // A threshold outside (0, 1] fails on every rank.
    const double bad[heads] = {0.5, 1.5, 0.5, 0.5};
    if (vs_estimate_distributed(*c, mine, n, q.empty() ? nullptr : q.data(),
                                k.empty() ? nullptr : k.data(), heads, kv_heads, d, scale, vb, sb,
                                &got, &err, nullptr, bad) != Status::kInvalidArgument) {
      ADD_FAILURE() << what << ": tau 1.5 accepted";
      ok = false;
    }
  }
  expect_all_ranks_ok(*c, ok);
}

// Planted pattern across shard boundaries: query row i of the last block is 8 e_i (+ small
// noise); the keys at global positions c0 + i (i < 64), which straddle the shard edge
// c0 + 32 between two ranks, are 8 e_i, so offset dp = N - 64 - c0 dominates the slash
// scores; three keys (one in the shard before that edge, one after it, one elsewhere) are
// 5 in every component, so every row attends them and they dominate the column scores.
TEST(DistributedEstimate, PlantedAcrossShards) {
  auto c = world();
  const int sp = c->size(), r = c->rank();
  const int heads = 8, kv_heads = 2, d = 64;
  const float scale = 1.f / 8.f;
  const int64_t n = 4099;
  const auto plan = plan_sequence_parallel(n, sp);
  // A shard edge with room for the planted diagonal (offset >= 100, all cells causal).
  int64_t edge = -1;
  for (const auto& ranges : plan) {
    for (auto [b, e] : ranges) {
      if (b >= 64 && b + 32 <= n - 64 - 100) edge = std::max(edge, b);
    }
  }
  ASSERT_GT(edge, 0) << "no shard edge usable for sp " << sp;
  auto owner = [&](int64_t t) {
    for (int i = 0; i < sp; ++i) {
      for (auto [b, e] : plan[i]) {
        if (t >= b && t < e) return i;
      }
    }
    return -1;
  };
  ASSERT_NE(owner(edge - 1), owner(edge)) << "edge " << edge << " lies inside one rank";
  const int64_t c0 = edge - 32, dp = n - 64 - c0;
  const int64_t q_row = int64_t{heads} * d, k_row = int64_t{kv_heads} * d;
  auto q_all = random_tensor(n * q_row, 11, 0.1f);
  auto k_all = random_tensor(n * k_row, 12, 0.1f);
  for (int i = 0; i < 64; ++i) {
    const int64_t row = n - 64 + i, key = c0 + i;
    for (int h = 0; h < heads; ++h) q_all[row * q_row + h * d + i] += 8.f;
    for (int g = 0; g < kv_heads; ++g) k_all[key * k_row + g * d + i] += 8.f;
  }
  const std::vector<int64_t> planted_cols = {edge - 1 - 64, edge + 64 + 1, n - 64 - 200};
  for (int64_t key : planted_cols) {
    for (int g = 0; g < kv_heads; ++g) {
      for (int i = 0; i < d; ++i) k_all[key * k_row + g * d + i] += 5.f;
    }
  }
  const std::vector<int> vb(heads, 40), sb(heads, 101);  // one free slot beyond 0..99
  const TokenRanges mine = plan[r];
  const auto q = slice(q_all, mine, q_row), k = slice(k_all, mine, k_row);
  std::vector<VsSelection> got;
  VsGlobalScores gs;
  std::string err;
  bool ok = true;
  ASSERT_EQ(vs_estimate_distributed(*c, mine, n, q.data(), k.data(), heads, kv_heads, d, scale,
                                    vb.data(), sb.data(), &got, &err, &gs),
            Status::kOk)
      << err;
  for (int h = 0; h < heads; ++h) {
    const auto& cols = got[h].columns;
    for (int64_t key : planted_cols) {
      if (!std::binary_search(cols.begin(), cols.end(), static_cast<int>(key))) {
        ADD_FAILURE() << "rank " << r << " head " << h << ": planted column " << key
                      << " not selected";
        ok = false;
      }
    }
    if (std::find(got[h].offsets.begin(), got[h].offsets.end(), static_cast<int>(dp)) ==
        got[h].offsets.end()) {
      ADD_FAILURE() << "rank " << r << " head " << h << ": planted offset " << dp
                    << " not selected";
      ok = false;
    }
  }
  const Reference ref =
      single_process(q_all, k_all, n, heads, kv_heads, d, scale, vb.data(), sb.data());
  EXPECT_EQ(compare(ref, got, gs, n, heads, "planted rank " + std::to_string(r), &ok), 0);
  expect_all_ranks_ok(*c, ok);
}

// A rank with inconsistent arguments fails with a one-line message naming it.
TEST(DistributedEstimate, RejectsBadRanges) {
  auto c = world();
  const int heads = 8, kv_heads = 2, d = 64;
  const std::vector<int> vb(heads, 40), sb(heads, 60);
  std::vector<VsSelection> got;
  std::string err;
  const TokenRanges bad = {{10, 5}};
  const Status s = vs_estimate_distributed(*c, bad, 100, nullptr, nullptr, heads, kv_heads, d,
                                           0.125f, vb.data(), sb.data(), &got, &err);
  EXPECT_EQ(s, Status::kInvalidArgument);
  EXPECT_NE(err.find("rank " + std::to_string(c->rank())), std::string::npos) << err;
  EXPECT_EQ(err.find('\n'), std::string::npos);
}

}  // namespace
}  // namespace mprefill
