// The attention skeleton's sparse key-tile walk (kernels/cuda/attn/sparse_walk.h, the
// code the GPU producer runs) replayed on the CPU: for every CTA of a launch, the cells
// (row, key) its consumers compute must be exactly the mask of kernels/sparse.h, each
// once, and a tile a consumer does not mask must be wholly visible to it. Vertical-slash
// (random, clustered, uniform and column-heavy selections), block-sparse lists and
// A-shape windows, at awkward sizes, ring shards and query sub-ranges, union gathers on
// and off.
#include "kernels/cuda/attn/sparse_walk.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kernels/cpu/cpu.h"
#include "model/index_sets.h"
#include "tests/cpu/reference.h"

namespace mprefill {
namespace {

namespace walk = cuda::walk;

// What the walk reads of a launch's Params.
struct WalkParams {
  walk::Kind kind = walk::Kind::kVs;
  int64_t k_pos0 = 0;
  int32_t n_k = 0;
  int head_offset = 0;
  int64_t nblocks = 0;
  const int64_t* range_ptr = nullptr;
  const int* range_lo = nullptr;
  const int* range_hi = nullptr;
  const int64_t* col_ptr = nullptr;
  const int* col = nullptr;
  const int* blocks = nullptr;
  int bs_k = 0;
  int64_t n_init = 0, n_local = 0;
};

// Query rows [q0, q0 + nq) and key shard [k0, k0 + nk) of one launch over N tokens.
struct Launch {
  int64_t n, q0, nq, k0, nk;
};

using Visible = std::function<bool(int64_t, int64_t)>;  // (row, key), global positions

// Replays the launch for one head; counts each (row, key) cell the consumers keep.
void replay_one(const WalkParams& p0, const Launch& l, const Visible& ref, bool union_gather,
                int owner_max, const std::string& what) {
  SCOPED_TRACE(what + (union_gather ? " (union gathers" : " (alternating gathers") +
               ", owner tiles up to " + std::to_string(owner_max) + " keys)");
  WalkParams p = p0;
  p.k_pos0 = l.k0;
  p.n_k = int32_t(l.nk);
  const int64_t block_first = l.q0 / 64;
  const int64_t num_m_blocks = (l.q0 + l.nq - 1) / 64 - block_first + 1;
  const int64_t num_pairs = (num_m_blocks + 1) / 2;
  const auto is_ashape = p.kind == walk::Kind::kAShape;
  auto kernel_visible = [&](int64_t key, int64_t row) {
    bool vis = key <= row;
    if (is_ashape) vis = vis && (key < p.n_init || row - key < p.n_local);
    return vis;
  };
  for (int64_t pair = 0; pair < num_pairs; ++pair) {
    const int64_t block_a = block_first + 2 * pair;
    const bool valid_b = block_a + 1 <= block_first + num_m_blocks - 1;
    const int64_t m0a = block_a * 64;
    // Each CTA twice: from the walk as the producer runs it, and from the tile plan
    // (plan_cta's records: keys and membership without walker state), same checks.
    for (const bool planned : {false, true}) {
      SCOPED_TRACE(planned ? "tile plan" : "walk");
      // count[w][r][c]: cells of consumer w's row m0w + r, keys k0 + c.
      std::vector<std::vector<int>> count(128, std::vector<int>(size_t(l.nk), 0));
      // One tile: flags, key ranges, key of row t, membership of consumer w's row t.
      auto check_tile = [&](uint32_t flags, int ts, int te, int ts2, int te2,
                            const std::function<int(int)>& key_of,
                            const std::function<bool(int, int, int)>& member_of) {
        ASSERT_GT(te, ts);
        ASSERT_LE(te - ts, 128);
        if (flags & walk::kHalves) {
          ASSERT_LE(te - ts, 64);
          ASSERT_LE(te2 - ts2, 64);
          ASSERT_GE(te2, ts2);
          ASSERT_GT(owner_max, 0) << "owner tile with owner tiles off";
          const bool use_a = flags & walk::kUse0, use_b = flags & (walk::kUse0 << 1);
          ASSERT_NE(use_a, use_b) << "owner tile of both consumers";
        }
        for (int w = 0; w < 2; ++w) {
          if (!(flags & (walk::kUse0 << w))) continue;
          ASSERT_TRUE(w == 0 || valid_b) << "tile used by the absent block B";
          const bool masked = flags & (walk::kMask0 << w);
          const int64_t m0w = m0a + 64 * w;
          for (int t = 0; t < 128; ++t) {
            const int key = key_of(t);
            const bool member = member_of(w, t, key);
            for (int r = 0; r < 64; ++r) {
              const int64_t row = m0w + r;
              if (masked) {
                if (member && kernel_visible(key, row)) {
                  ASSERT_GE(key, l.k0);
                  ASSERT_LT(key, l.k0 + l.nk);
                  ++count[64 * w + r][size_t(key - l.k0)];
                }
              } else {
                // Unmasked: the kernel keeps all 128 cells of the row.
                ASSERT_TRUE(member && kernel_visible(key, row))
                    << "unmasked tile [" << ts << ", " << te << ") of consumer " << w
                    << " holds an invisible cell: row " << row << " key row " << t << " key "
                    << key;
                ASSERT_GE(key, l.k0);
                ASSERT_LT(key, l.k0 + l.nk);
                ++count[64 * w + r][size_t(key - l.k0)];
              }
            }
          }
        }
      };
      if (!planned) {
        walk::SparseWalk<128> wk;
        wk.init(p, 0, m0a, valid_b, union_gather, owner_max);
        int tiles = 0;
        for (;;) {
          walk::TileDesc d;
          wk.next(p, d);
          if (d.end) break;
          ASSERT_LT(++tiles, 1 << 20) << "walk does not end";
          check_tile(
              d.flags, d.ts, d.te, d.ts2, d.te2,
              [&](int t) { return walk::SparseWalk<128>::key(p, d, t); },
              [&](int w, int t, int key) {
                return w == 0 ? wk.member_a(p, d, t, key) : wk.member_b(d, t);
              });
          if (testing::Test::HasFatalFailure()) return;
        }
      } else {
        const walk::ScalarSpan span{p.col};
        const int64_t n_tiles =
            walk::plan_cta<128>(p, 0, m0a, valid_b, union_gather, owner_max, span, nullptr);
        ASSERT_LT(n_tiles, 1 << 20) << "walk does not end";
        std::vector<walk::TileRec> recs(static_cast<size_t>(n_tiles));
        ASSERT_EQ(
            walk::plan_cta<128>(p, 0, m0a, valid_b, union_gather, owner_max, span, recs.data()),
            n_tiles);
        for (const walk::TileRec& r : recs) {
          int kmax = INT32_MIN;
          for (int t = 0; t < 128; ++t) {
            const int key = walk::rec_key(p, r, t);
            if (key != INT32_MAX) kmax = std::max(kmax, key);
          }
          ASSERT_EQ(r.kmax, kmax) << "planned tile's largest key";
          check_tile(
              r.flags, r.ts, r.te, r.ts2, r.te2, [&](int t) { return walk::rec_key(p, r, t); },
              [&](int w, int t, int) { return walk::rec_member(r, w, t); });
          if (testing::Test::HasFatalFailure()) return;
        }
      }
      for (int rr = 0; rr < 128; ++rr) {
        const int64_t row = m0a + rr;
        if (row < l.q0 || row >= l.q0 + l.nq) continue;  // not stored
        for (int64_t c = 0; c < l.nk; ++c) {
          const int want = ref(row, l.k0 + c) ? 1 : 0;
          ASSERT_EQ(count[rr][size_t(c)], want) << "row " << row << " key " << l.k0 + c;
        }
      }
    }
  }
}

// Every walk mode: owner tiles off, for intervals up to 256 keys (the kernel's choice),
// and for every interval.
void replay(const WalkParams& p, const Launch& l, const Visible& ref, bool union_gather,
            const std::string& what) {
  for (const int owner_max : {0, 256, 1 << 30}) {
    replay_one(p, l, ref, union_gather, owner_max, what);
    if (testing::Test::HasFatalFailure()) return;
  }
}

std::vector<Launch> launches(int64_t n) {
  std::vector<Launch> out = {{n, 0, n, 0, n}};  // whole sequence
  if (n >= 8) {
    const int64_t a = n / 3, b = (2 * n) / 3;
    out.push_back({n, b, n - b, a, b - a});                    // ring step: shard in the past
    out.push_back({n, a + 1, b - a, a, n - a});                // odd query start inside the shard
    out.push_back({n, 0, a + 1, b, n - b});                    // shard wholly in the future
    out.push_back({n, a, n - a, 0, std::min<int64_t>(n, 5)});  // tiny shard at 0
  }
  return out;
}

void check_vs(const VsSelection& sel, int64_t n, const std::string& what) {
  const VsIndex ix = cpu::vs_build_index({sel}, n);
  const test::ref::VsBlockSets sets(sel, n);
  WalkParams p;
  p.kind = walk::Kind::kVs;
  p.nblocks = ix.nblocks;
  p.range_ptr = ix.range_ptr.data();
  p.range_lo = ix.range_lo.data();
  p.range_hi = ix.range_hi.data();
  p.col_ptr = ix.col_ptr.data();
  p.col = ix.col.data();
  for (const Launch& l : launches(n)) {
    const Visible ref = [&](int64_t r, int64_t c) { return sets.visible(r, c); };
    for (const bool u : {true, false}) {
      replay(p, l, ref, u,
             what + " N=" + std::to_string(n) + " q=[" + std::to_string(l.q0) + "+" +
                 std::to_string(l.nq) + ") k=[" + std::to_string(l.k0) + "+" +
                 std::to_string(l.nk) + ")");
      if (testing::Test::HasFatalFailure()) return;
    }
  }
}

TEST(SparseWalk, VerticalSlashRandomSelections) {
  std::mt19937_64 g(7);
  for (const int64_t n : {1, 63, 65, 127, 200, 1000, 4099}) {
    for (const auto& [nv, ns] : {std::pair{4, 3}, {30, 50}, {300, 12}, {2, 200}}) {
      check_vs(test::ref::random_selection(n, nv, ns, g), n,
               "random v" + std::to_string(nv) + " s" + std::to_string(ns));
      if (HasFatalFailure()) return;
    }
  }
}

TEST(SparseWalk, VerticalSlashIndexSets) {
  // The benchmark's styled selections, column-heavy included, scaled to test sizes.
  for (const int64_t n : {1000, 4099}) {
    for (const auto kind : {IndexSetKind::kClustered, IndexSetKind::kUniform}) {
      for (const auto& [v, s] : {std::pair{1000, 600}, {30, 80}, {350, 10}, {100, 80}}) {
        check_vs(synthetic_vs(kind, n, v, s, uint64_t(v * 7 + s)), n,
                 std::string(kind == IndexSetKind::kClustered ? "clustered" : "uniform") + " v" +
                     std::to_string(v) + " s" + std::to_string(s));
        if (HasFatalFailure()) return;
      }
    }
  }
}

TEST(SparseWalk, BlockSparseLists) {
  std::mt19937_64 g(11);
  for (const int64_t n : {1, 65, 200, 1000, 4099}) {
    const int64_t nb = num_blocks(n);
    for (const int k : {1, 3, 8}) {
      // Block b lists itself and up to k - 1 random earlier blocks, ascending, -1 padded.
      std::vector<int> blocks(size_t(nb) * k, -1);
      std::vector<std::set<int>> lists(static_cast<size_t>(nb));
      for (int64_t b = 0; b < nb; ++b) {
        std::set<int> s{int(b)};
        for (int i = 1; i < k && b > 0; ++i) s.insert(int(g() % uint64_t(b)));
        int t = 0;
        for (int j : s) blocks[size_t(b) * k + t++] = j;
        lists[size_t(b)] = s;
      }
      WalkParams p;
      p.kind = walk::Kind::kBlockSparse;
      p.nblocks = nb;
      p.blocks = blocks.data();
      p.bs_k = k;
      const Visible ref = [&](int64_t r, int64_t c) {
        return c <= r && lists[size_t(r / 64)].count(int(c / 64)) > 0;
      };
      for (const Launch& l : launches(n)) {
        replay(p, l, ref, true, "block-sparse N=" + std::to_string(n) + " k=" + std::to_string(k));
        if (HasFatalFailure()) return;
      }
    }
  }
}

TEST(SparseWalk, AShapeWindows) {
  for (const int64_t n : {1, 65, 200, 1000, 4099}) {
    for (const auto& [ni, nl] :
         {std::pair<int64_t, int64_t>{4, 64}, {0, 100}, {128, 0}, {n, 0}, {64, 1000}, {3, 1}}) {
      WalkParams p;
      p.kind = walk::Kind::kAShape;
      p.n_init = ni;
      p.n_local = nl;
      const Visible ref = [&](int64_t r, int64_t c) { return c <= r && (c < ni || r - c < nl); };
      for (const Launch& l : launches(n)) {
        replay(p, l, ref, true,
               "a-shape N=" + std::to_string(n) + " init " + std::to_string(ni) + " local " +
                   std::to_string(nl));
        if (HasFatalFailure()) return;
      }
    }
  }
}

}  // namespace
}  // namespace mprefill
