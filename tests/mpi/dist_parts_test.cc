// Parts of the distributed prefill under mpirun: the sparse-aware ring against
// single-process sparse attention, mask_tiles against a brute-force mask, distributed
// block-sparse estimation (bitwise equal to the single process), the weighted zigzag,
// and the KV gather with its coverage check.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "engine/distributed_estimate.h"
#include "engine/ring_attention.h"
#include "kernels/cpu/cpu.h"
#include "kv/kv_cache_sink.h"
#include "tests/mpi/mpi_testutil.h"

namespace mprefill {
namespace {

using test::mpi::expect_all_ranks_ok;
using test::mpi::random_tensor;
using test::mpi::slice;
using test::mpi::world;

// Brute force: does row r see key c under the head's mask (global positions)?
bool visible(const HeadMask& m, int64_t r, int64_t c) {
  if (c > r) return false;
  switch (m.kind) {
    case PatternKind::kDense:
      return true;
    case PatternKind::kAShape:
      return c < m.n_init || r - c < m.n_local;
    case PatternKind::kVerticalSlash: {
      const VsIndexView& ix = m.vs;
      const int64_t hb = m.vs_head * ix.nblocks + r / kBlock;
      for (int64_t t = ix.range_ptr[hb]; t < ix.range_ptr[hb + 1]; ++t)
        if (c >= ix.range_lo[t] && c < ix.range_hi[t]) return true;
      for (int64_t t = ix.col_ptr[hb]; t < ix.col_ptr[hb + 1]; ++t)
        if (ix.col[t] == c) return true;
      return false;
    }
    case PatternKind::kBlockSparse: {
      const int* list = m.bs.blocks + (m.bs_head * m.bs.nblocks + r / kBlock) * m.bs.k;
      for (int t = 0; t < m.bs.k && list[t] >= 0; ++t)
        if (c / kBlock == list[t]) return true;
      return false;
    }
  }
  return false;
}

// Four heads, one per kind, with random indices over n tokens.
struct Masks {
  std::vector<HeadMask> m;
  VsIndex vs;
  std::vector<VsSelection> sel;
  std::vector<int> blocks;
  Masks(int64_t n, uint32_t seed) {
    std::mt19937 g(seed);
    const int64_t nb = num_blocks(n);
    m.resize(4);
    m[0].kind = PatternKind::kDense;
    m[1].kind = PatternKind::kAShape;
    m[1].n_init = 70;
    m[1].n_local = 150;
    // Vertical-slash: random columns and offsets (0 included).
    VsSelection s;
    for (int64_t c = 0; c < n; ++c)
      if (g() % 23 == 0) s.columns.push_back(static_cast<int>(c));
    for (int64_t d = n - 1; d >= 1; --d)
      if (g() % 37 == 0) s.offsets.push_back(static_cast<int>(d));
    s.offsets.push_back(0);
    sel = {s};
    vs = cpu::vs_build_index(sel, n);
    m[2].kind = PatternKind::kVerticalSlash;
    m[2].vs = view(vs);
    // Block-sparse: diagonal plus up to 2 random earlier blocks, ascending, -1 padded.
    const int k = 3;
    blocks.assign(static_cast<size_t>(nb * k), -1);
    for (int64_t b = 0; b < nb; ++b) {
      std::vector<int> l{static_cast<int>(b)};
      for (int t = 0; t < 2 && b > 0; ++t) l.push_back(static_cast<int>(g() % b));
      std::sort(l.begin(), l.end());
      l.erase(std::unique(l.begin(), l.end()), l.end());
      std::copy(l.begin(), l.end(), blocks.begin() + b * k);
    }
    m[3].kind = PatternKind::kBlockSparse;
    m[3].bs = {n, nb, k, blocks.data()};
  }
};

TEST(DistParts, MaskTilesMatchBruteForce) {
  auto c = world();
  bool ok = true;
  for (int64_t n : {int64_t{1}, int64_t{200}, int64_t{577}}) {
    Masks ms(n, static_cast<uint32_t>(n));
    const int64_t nb = num_blocks(n);
    for (const HeadMask& m : ms.m)
      for (int64_t qb = 0; qb < nb; ++qb)
        for (int64_t kb = 0; kb < nb; ++kb)
          for (int64_t ke_blk = kb + 1; ke_blk <= nb; ke_blk += 2) {
            const int64_t k0 = kb * kBlock, k1 = std::min(n, ke_blk * kBlock);
            int64_t blocks_hit = 0;
            for (int64_t j = kb; j < ke_blk; ++j) {
              bool hit = false;
              for (int64_t r = qb * kBlock; r < std::min(n, qb * kBlock + kBlock) && !hit; ++r)
                for (int64_t cc = j * kBlock; cc < std::min(k1, j * kBlock + kBlock) && !hit; ++cc)
                  hit = visible(m, r, cc);
              blocks_hit += hit;
            }
            const int64_t got = mask_tiles(m, qb, k0, k1, n);
            // VS counts range pieces and gathered columns; the others count key blocks.
            const bool good = m.kind == PatternKind::kVerticalSlash ? (got > 0) == (blocks_hit > 0)
                                                                    : got == blocks_hit;
            if (!good && ok) {
              ADD_FAILURE() << to_string(m.kind) << " n " << n << " qb " << qb << " keys [" << k0
                            << ", " << k1 << "): mask_tiles " << got << ", brute force "
                            << blocks_hit << " blocks";
              ok = false;
            }
          }
  }
  expect_all_ranks_ok(*c, ok);
}

TEST(DistParts, SparseRingMatchesSingleProcess) {
  auto c = world();
  const int sp = c->size(), rank = c->rank();
  const int heads = 4, kv_heads = 2, d = 48;
  bool ok = true;
  for (int64_t n : {int64_t{1}, int64_t{200}, int64_t{1000}, int64_t{1283}}) {
    for (bool weighted : {false, true}) {
      const int64_t q_row = heads * d, kv_row = kv_heads * d, nb = num_blocks(n);
      const uint32_t seed = static_cast<uint32_t>(n * 7 + weighted);
      const auto q_all = random_tensor(n * q_row, seed);
      const auto k_all = random_tensor(n * kv_row, seed + 1);
      const auto v_all = random_tensor(n * kv_row, seed + 2);
      Masks ms(n, seed + 3);
      std::vector<double> bw(nb);
      for (int64_t b = 0; b < nb; ++b) bw[b] = 1.0 + (b % 5 == 0 ? 9.0 : 0.0);  // skewed
      const std::vector<TokenRanges> layout =
          weighted ? plan_sequence_parallel_weighted(n, sp, bw) : plan_sequence_parallel(n, sp);
      const TokenRanges& mine = layout[rank];
      const auto q = slice(q_all, mine, q_row), k = slice(k_all, mine, kv_row),
                 v = slice(v_all, mine, kv_row);
      const int64_t n_local = static_cast<int64_t>(q.size()) / q_row;
      const float scale = 1.f / std::sqrt(static_cast<float>(d));
      std::vector<float> o(n_local * q_row, std::nanf("")), lse(heads * n_local);
      RingStats rs;
      std::string err;
      const Status s =
          ring_attention_sparse_cpu(*c, layout, n, q.data(), k.data(), v.data(), o.data(),
                                    lse.data(), heads, kv_heads, d, scale, ms.m.data(), &rs, &err);
      EXPECT_EQ(s, Status::kOk) << err;
      ok &= s == Status::kOk;
      // Reference: each head's kernel over all keys, rows of this rank.
      double worst = 0, ref_max = 0;
      int64_t off = 0;
      for (auto [b, e] : mine) {
        for (int h = 0; h < heads; ++h) {
          std::vector<float> o_ref((e - b) * d), lse_ref(e - b);
          AttentionParams p;
          p.q = q.data() + off * q_row + h * d;
          p.k = k_all.data() + (h / 2) * d;
          p.v = v_all.data() + (h / 2) * d;
          p.o = o_ref.data();
          p.lse = lse_ref.data();
          p.q_row_stride = q_row;
          p.k_row_stride = p.v_row_stride = kv_row;
          p.o_row_stride = d;
          p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = d;
          p.lse_head_stride = e - b;
          p.n_q = static_cast<int>(e - b);
          p.n_k = static_cast<int>(e);
          p.num_heads = p.num_kv_heads = 1;
          p.head_dim = d;
          p.q_pos0 = b;
          p.scale = scale;
          const HeadMask& m = ms.m[h];
          Status rs2 = Status::kOk;
          AShapeParams a{&m.n_init, &m.n_local};
          switch (m.kind) {
            case PatternKind::kDense:
              rs2 = cpu::attention_dense(p);
              break;
            case PatternKind::kAShape:
              rs2 = cpu::attention_ashape(p, a);
              break;
            case PatternKind::kVerticalSlash:
              rs2 = cpu::attention_vs(p, m.vs, 0);
              break;
            case PatternKind::kBlockSparse:
              rs2 = cpu::attention_block_sparse(p, m.bs, 0);
              break;
          }
          ASSERT_EQ(rs2, Status::kOk);
          for (int64_t i = 0; i < e - b; ++i) {
            for (int j = 0; j < d; ++j) {
              const float got = o[(off + i) * q_row + h * d + j], want = o_ref[i * d + j];
              worst = std::max(worst, static_cast<double>(std::fabs(got - want)));
              ref_max = std::max(ref_max, static_cast<double>(std::fabs(want)));
              if (std::isnan(got)) worst = 1e30;
            }
            const float lg = lse[h * n_local + off + i], lw = lse_ref[i];
            if (!(std::fabs(lg - lw) <= 1e-4f * std::max(1.f, std::fabs(lw))) && lg != lw)
              worst = 1e30;
          }
        }
        off += e - b;
      }
      if (!(worst <= 1e-5 * std::max(ref_max, 1.0))) {
        ADD_FAILURE() << "n " << n << (weighted ? " weighted" : " zigzag") << " rank " << rank
                      << ": max|diff| " << worst << " (max|ref| " << ref_max << ")";
        ok = false;
      }
      // Dense and block-sparse tiles are exact key-block counts over the ring.
      int64_t tiles = rs.tiles, total = 0;
      ASSERT_EQ(c->all_reduce(&tiles, &total, 1, DType::kI64, comm::ReduceOp::kSum, nullptr),
                Status::kOk);
      int64_t want = 0;
      for (int h = 0; h < heads; ++h)
        for (int64_t qb = 0; qb < nb; ++qb) want += mask_tiles(ms.m[h], qb, 0, n, n);
      // VS pieces may split at shard edges: ring count >= global count.
      EXPECT_GE(total, want) << "n " << n;
    }
  }
  expect_all_ranks_ok(*c, ok);
}

TEST(DistParts, BlockSparseEstimateIsExactOverShards) {
  auto c = world();
  const int sp = c->size(), rank = c->rank();
  const int heads = 4, kv_heads = 2, d = 64;
  bool ok = true;
  for (int64_t n : {int64_t{1}, int64_t{63}, int64_t{1000}, int64_t{4099}}) {
    const int64_t q_row = heads * d, kv_row = kv_heads * d;
    const auto q_all = random_tensor(n * q_row, static_cast<uint32_t>(n));
    const auto k_all = random_tensor(n * kv_row, static_cast<uint32_t>(n + 1));
    const int topk[heads] = {1, 3, 5, 8};
    const float scale = 1.f / std::sqrt(static_cast<float>(d));
    cpu::BlockSparseEstimateParams e;
    e.q = q_all.data();
    e.k = k_all.data();
    e.q_row_stride = q_row;
    e.q_head_stride = d;
    e.k_row_stride = kv_row;
    e.k_head_stride = d;
    e.seq_len = n;
    e.num_heads = heads;
    e.num_kv_heads = kv_heads;
    e.head_dim = d;
    e.scale = scale;
    const TokenRanges mine = plan_sequence_parallel(n, sp)[rank];
    const auto q = slice(q_all, mine, q_row), k = slice(k_all, mine, kv_row);
    // Pooled, then antidiagonal (fixed and adaptive), each exactly the single process's.
    const double tau[heads] = {0.9, 0.5, 1.0, 0.8};
    for (const auto& [stride, tp] :
         {std::pair<int, const double*>{0, nullptr}, {8, nullptr}, {16, tau}, {1, tau}}) {
      if (stride == 1 && n > 1000) continue;  // N^2 d per head
      e.stride = stride;
      BlockSparseIndex ref, got;
      ASSERT_EQ(cpu::block_sparse_estimate(e, topk, &ref, tp), Status::kOk);
      std::string err;
      const Status s = block_sparse_estimate_distributed(
          *c, mine, n, q.data(), k.data(), heads, kv_heads, d, scale, topk, &got, &err, tp, stride);
      EXPECT_EQ(s, Status::kOk) << err;
      const bool same = s == Status::kOk && got.blocks == ref.blocks && got.k == ref.k;
      EXPECT_TRUE(same) << "n " << n << " stride " << stride;
      ok &= same;
    }
  }
  expect_all_ranks_ok(*c, ok);
}

TEST(DistParts, WeightedZigzagCoversAndBalances) {
  auto c = world();
  bool ok = true;
  for (int sp = 1; sp <= 5; ++sp)
    for (int64_t n : {int64_t{1}, int64_t{64}, int64_t{65}, int64_t{1000}, int64_t{4099}}) {
      const int64_t nb = num_blocks(n);
      std::vector<double> bw(nb);
      std::mt19937 g(static_cast<uint32_t>(n * 10 + sp));
      for (auto& w : bw) w = 1.0 + (g() % 100 < 10 ? 20.0 : 0.0);  // a few heavy blocks
      const auto layout = plan_sequence_parallel_weighted(n, sp, bw);
      std::vector<int> seen(n, 0);
      bool aligned = static_cast<int>(layout.size()) == sp;
      for (const auto& r : layout) {
        int64_t prev = -1;
        for (auto [b, e] : r) {
          aligned &= b % kBlock == 0 && (e % kBlock == 0 || e == n) && b > prev && e > b;
          prev = e;
          for (int64_t t = b; t < e; ++t) ++seen[t];
        }
      }
      const bool once = std::all_of(seen.begin(), seen.end(), [](int s) { return s == 1; });
      const double wz = layout_imbalance(plan_sequence_parallel(n, sp), bw);
      const double ww = layout_imbalance(layout, bw);
      // With a block as the unit, a rank can be off by at most the heaviest folded pair.
      const double total = std::accumulate(bw.begin(), bw.end(), 0.0);
      const double bound = 1.0 + sp * 42.0 / total;
      if (!aligned || !once || ww > std::max(wz, bound) + 1e-9) {
        ADD_FAILURE() << "sp " << sp << " n " << n << ": aligned " << aligned << " once " << once
                      << " imbalance weighted " << ww << " zigzag " << wz;
        ok = false;
      }
      if (c->rank() == 0 && n == 4099 && sp >= 2)
        std::printf("[ weighted zigzag ] sp %d n %lld: imbalance %.3f (plain zigzag %.3f)\n", sp,
                    static_cast<long long>(n), ww, wz);
    }
  expect_all_ranks_ok(*c, ok);
}

TEST(DistParts, GatherKvFindsGapsAndPlacesSlices) {
  auto c = world();
  const int size = c->size(), rank = c->rank();
  ModelConfig cfg = named_shape("tiny");
  const int64_t n = 333;
  const int hd = cfg.head_dim, kvd = cfg.kv_dim();
  const auto k_all = random_tensor(n * kvd, 5), v_all = random_tensor(n * kvd, 6);
  const TokenRanges mine = plan_sequence_parallel(n, size)[rank];
  auto run = [&](bool leave_gap) {
    KvCache local(cfg, n);
    KvCacheSink sink(&local, hd);
    for (int l = 0; l < cfg.n_layers; ++l) {
      if (leave_gap && l == 1 && rank == size - 1) continue;
      // Rows of this rank's ranges, all kv heads.
      const auto k = slice(k_all, mine, kvd), v = slice(v_all, mine, kvd);
      KvSlice s;
      s.layer = l;
      s.kv_heads = {0, 1};
      s.tokens = mine;
      s.head_dim = hd;
      s.k = k.data();
      s.v = v.data();
      if (!k.empty()) sink.put(s);
    }
    KvCache full(cfg, n);
    std::string error;
    try {
      gather_kv_cache(*c, sink, 0, n, rank == 0 ? &full : nullptr);
    } catch (const std::runtime_error& e) {
      error = e.what();
    }
    bool good = true;
    if (rank == 0 && !leave_gap) {
      for (int l = 0; l < cfg.n_layers; ++l)
        good &= std::equal(k_all.begin(), k_all.end(), full.k[l].begin()) &&
                std::equal(v_all.begin(), v_all.end(), full.v[l].begin()) && error.empty();
      good &= full.n_tokens == n;
    }
    if (rank == 0 && leave_gap) {
      good = error.find("came from no rank") != std::string::npos;
      EXPECT_TRUE(good) << "error: '" << error << "'";
    }
    return good;
  };
  bool ok = run(false);
  ok &= run(true);
  expect_all_ranks_ok(*c, ok);
}

}  // namespace
}  // namespace mprefill
