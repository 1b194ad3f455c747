// Ring attention (dense, CPU, MPI backend) under mpirun: every rank builds the same
// global Q/K/V, runs the ring on its zigzag ranges and checks its rows against one
// cpu::attention_dense call over all keys of the sequence; failures are summed over ranks.
#include "engine/ring_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "comm/mpi_comm.h"
#include "comm/ring_pass.h"
#include "kernels/attention.h"
#include "kernels/cpu/cpu.h"
#include "tests/mpi/mpi_testutil.h"

namespace mprefill {
namespace {

using test::mpi::expect_all_ranks_ok;
using test::mpi::random_tensor;
using test::mpi::slice;
using test::mpi::world;

struct Case {
  int64_t n;
  int head_dim;
};

TEST(RingAttention, MatchesSingleProcessDense) {
  auto c = world();
  const int sp = c->size(), r = c->rank();
  const int heads = 8, kv_heads = 2;
  bool ok = true;
  for (Case cs : {Case{1, 48}, Case{63, 128}, Case{200, 48}, Case{1000, 128}, Case{4099, 48},
                  Case{4099, 128}, Case{1, 128}, Case{200, 128}}) {
    const int64_t n = cs.n;
    const int d = cs.head_dim;
    const int64_t q_row = int64_t{heads} * d, kv_row = int64_t{kv_heads} * d;
    const uint32_t seed = static_cast<uint32_t>(n * 131 + d);
    const auto q_all = random_tensor(n * q_row, seed);
    const auto k_all = random_tensor(n * kv_row, seed + 1);
    const auto v_all = random_tensor(n * kv_row, seed + 2);
    const TokenRanges mine = plan_sequence_parallel(n, sp)[r];
    const auto q = slice(q_all, mine, q_row), k = slice(k_all, mine, kv_row),
               v = slice(v_all, mine, kv_row);
    const int64_t n_local = static_cast<int64_t>(q.size()) / q_row;
    const float scale = 1.f / std::sqrt(static_cast<float>(d));

    std::vector<float> o(n_local * q_row, std::nanf("")), lse(heads * n_local, std::nanf(""));
    std::string err;
    const auto t0 = std::chrono::steady_clock::now();
    const Status s = ring_attention_cpu(*c, mine, n, q.data(), k.data(), v.data(), o.data(),
                                        lse.data(), heads, kv_heads, d, scale, &err);
    const float ring_ms =
        std::chrono::duration<float, std::milli>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_EQ(s, Status::kOk) << err;
    ok &= s == Status::kOk;

    // Reference: each local range's rows against every key of the sequence up to its end.
    std::vector<float> o_ref(n_local * q_row), lse_ref(heads * n_local);
    const auto t1 = std::chrono::steady_clock::now();
    int64_t off = 0;
    for (auto [b, e] : mine) {
      AttentionParams p;
      p.q = q.data() + off * q_row;
      p.k = k_all.data();
      p.v = v_all.data();
      p.o = o_ref.data() + off * q_row;
      p.lse = lse_ref.data() + off;
      p.n_q = static_cast<int>(e - b);
      p.n_k = static_cast<int>(e);
      p.num_heads = heads;
      p.num_kv_heads = kv_heads;
      p.head_dim = d;
      set_packed_strides(p);
      p.lse_head_stride = n_local;
      p.q_pos0 = b;
      p.k_pos0 = 0;
      p.scale = scale;
      ASSERT_EQ(cpu::attention_dense(p), Status::kOk);
      off += e - b;
    }
    const float ref_ms =
        std::chrono::duration<float, std::milli>(std::chrono::steady_clock::now() - t1).count();

    double diff2 = 0, ref2 = 0;
    for (size_t i = 0; i < o.size(); ++i) {
      diff2 += double(o[i] - o_ref[i]) * (o[i] - o_ref[i]);
      ref2 += double(o_ref[i]) * o_ref[i];
    }
    const double rel = ref2 > 0 ? std::sqrt(diff2 / ref2) : std::sqrt(diff2);
    EXPECT_LE(rel, 1e-5) << "rank " << r << " n " << n << " d " << d;
    ok &= rel <= 1e-5;
    int lse_bad = 0;
    for (size_t i = 0; i < lse.size(); ++i) {
      const float a = lse[i], b = lse_ref[i];
      const bool good = std::isinf(b) ? a == b : std::fabs(a - b) <= 1e-5f * (1.f + std::fabs(b));
      lse_bad += !good;
    }
    EXPECT_EQ(lse_bad, 0) << "rank " << r << " n " << n << " d " << d;
    ok &= lse_bad == 0;

    float times[2] = {ring_ms, ref_ms}, worst[2] = {0, 0};
    ASSERT_EQ(c->all_reduce(times, worst, 2, DType::kF32, comm::ReduceOp::kMax, nullptr),
              Status::kOk);
    if (r == 0) {
      std::printf(
          "[ sp %d ] n %5lld d %3d: ring %8.1f ms, per-rank reference %8.1f ms (max over "
          "ranks), rel err %.2e\n",
          sp, static_cast<long long>(n), d, worst[0], worst[1], rel);
    }
  }
  expect_all_ranks_ok(*c, ok);
}

// A query with no visible key cannot occur in full causal attention, but a rank whose
// first range starts after every key of a shard gets -inf partial states; the merged
// result must still be exact. Here, in addition, rows of all-equal scores (zero q) check
// that the merge is a plain average across shards.
// The ring plan's causal skipping (comm/ring_pass.h; the CUDA backend's ring sends what it
// says): a rank forwards at most what it received, every key a downstream receiver may
// read travels, and at sp 2 exactly 3/4 of the rows move (rank 1 never reads rank 0's
// second zigzag chunk). Host arithmetic only, on every rank.
TEST(RingPlan, CausalSkippingSendsWhatDownstreamReads) {
  for (int sp = 1; sp <= 5; ++sp)
    for (int64_t n : {int64_t{64} * sp, int64_t{1000}, int64_t{1536}, int64_t{4099}}) {
      if (n < int64_t{64} * sp) continue;
      comm::RingPlan whole, skip;
      whole.layout = skip.layout = plan_sequence_parallel(n, sp);
      skip.skip_causal = true;
      int64_t moved[2] = {0, 0};
      for (int owner = 0; owner < sp; ++owner) {
        int64_t received = skip.rows(owner);
        for (int hop = 0; hop + 1 < sp; ++hop) {
          const int sender = (owner + hop) % sp, receiver = (sender + 1) % sp;
          const int64_t sent = skip.sent_rows(sender, owner);
          EXPECT_LE(sent, received) << "sp " << sp << " n " << n << " owner " << owner;
          EXPECT_EQ(whole.sent_rows(sender, owner), whole.rows(owner));
          // Every key of the owner the receiver (and those after it) may read is in the
          // sent prefix: rows ascend, so count the owner's rows below key_end.
          int64_t need = 0;
          for (int r = receiver; r != owner; r = (r + 1) % sp) {
            int64_t below = 0;
            for (auto [b, e] : skip.layout[owner])
              below += std::max<int64_t>(0, std::min(e, skip.key_end(r)) - b);
            need = std::max(need, below);
          }
          EXPECT_GE(sent, need) << "sp " << sp << " n " << n << " owner " << owner;
          moved[0] += whole.sent_rows(sender, owner);
          moved[1] += sent;
          received = sent;
        }
      }
      EXPECT_LE(moved[1], moved[0]);
      if (sp == 2 && n == 1536) {
        EXPECT_EQ(moved[1] * 4, moved[0] * 3);
      }
      for (int r = 0; r < sp; ++r) {
        EXPECT_EQ(whole.key_end(r), n);
        EXPECT_LE(skip.key_end(r), n);
      }
    }
}

TEST(RingAttention, ZeroQueriesAverageValues) {
  auto c = world();
  const int sp = c->size(), r = c->rank();
  const int64_t n = 517;
  const int heads = 4, kv_heads = 4, d = 8;
  const auto v_all = random_tensor(n * kv_heads * d, 7);
  const auto k_all = random_tensor(n * kv_heads * d, 8);
  const TokenRanges mine = plan_sequence_parallel(n, sp)[r];
  const auto k = slice(k_all, mine, kv_heads * d), v = slice(v_all, mine, kv_heads * d);
  const int64_t n_local = static_cast<int64_t>(k.size()) / (kv_heads * d);
  std::vector<float> q(n_local * heads * d, 0.f), o(q.size()), lse(heads * n_local);
  std::string err;
  ASSERT_EQ(ring_attention_cpu(*c, mine, n, q.data(), k.data(), v.data(), o.data(), lse.data(),
                               heads, kv_heads, d, 0.125f, &err),
            Status::kOk)
      << err;
  bool ok = true;
  int64_t row = 0;
  for (auto [b, e] : mine) {
    for (int64_t t = b; t < e; ++t, ++row) {
      for (int h = 0; h < heads; ++h) {
        ok &= std::fabs(lse[h * n_local + row] - std::log(double(t + 1))) <
              1e-5 * (1 + std::log(double(t + 1)));
        for (int i = 0; i < d; ++i) {
          double mean = 0;
          for (int64_t j = 0; j <= t; ++j) mean += v_all[(j * kv_heads + h) * d + i];
          mean /= double(t + 1);
          ok &= std::fabs(o[(row * heads + h) * d + i] - mean) < 1e-5;
        }
      }
    }
  }
  EXPECT_TRUE(ok) << "rank " << r;
  expect_all_ranks_ok(*c, ok);
}

TEST(RingAttention, RejectsRangesNotFromThePlan) {
  auto c = world();
  const int sp = c->size(), r = c->rank();
  TokenRanges wrong = plan_sequence_parallel(300, sp)[r];
  wrong.emplace_back(1000, 1001);
  std::vector<float> buf(4096, 1.f), lse(4096);
  std::string err;
  EXPECT_EQ(ring_attention_cpu(*c, wrong, 300, buf.data(), buf.data(), buf.data(), buf.data(),
                               lse.data(), 2, 1, 8, 0.3f, &err),
            Status::kInvalidArgument);
  EXPECT_NE(err.find("rank " + std::to_string(r)), std::string::npos) << err;
  EXPECT_EQ(ring_attention_cpu(*c, plan_sequence_parallel(300, sp)[r], 300, buf.data(), buf.data(),
                               buf.data(), buf.data(), lse.data(), 3, 2, 8, 0.3f, &err),
            Status::kInvalidArgument);
}

// Rank 0 never joins: every other rank's ring step ends in a bounded timeout whose
// message names the rank and the step.
TEST(RingAttention, MissingRankTimesOut) {
  auto c = world(300);
  const int sp = c->size(), r = c->rank();
  if (sp < 2) GTEST_SKIP() << "needs 2 ranks";
  const int64_t n = 128 * sp;  // 128 tokens x 4 floats per rank: eager-sized messages
  const TokenRanges mine = plan_sequence_parallel(n, sp)[r];
  std::vector<float> buf(128 * 4, 0.5f), o(128 * 4), lse(128);
  bool ok = true;
  if (r != 0) {
    std::string err;
    const Status s = ring_attention_cpu(*c, mine, n, buf.data(), buf.data(), buf.data(), o.data(),
                                        lse.data(), 1, 1, 4, 0.5f, &err);
    ok &= s == Status::kTimeout;
    ok &= err.find("rank " + std::to_string(r) + ": step ") != std::string::npos;
    ok &= err.find("timed out") != std::string::npos;
    EXPECT_EQ(s, Status::kTimeout) << err;
    EXPECT_TRUE(ok) << err;
  }
  auto c2 = world();
  expect_all_ranks_ok(*c2, ok);
}

}  // namespace
}  // namespace mprefill
