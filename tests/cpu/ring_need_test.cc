// KV blocks of the sp ring that some downstream receiver reads (engine/ring_need.h), on
// zigzag layouts small enough to count by hand. Block b holds tokens [64 b, 64 b + 64).
#include "engine/ring_need.h"

#include <gtest/gtest.h>

#include <stdexcept>
#include <vector>

#include "model/parallel_plan.h"

namespace mprefill {
namespace {

// Only the fields ring_kv_need reads: 2 layers, 4 query heads over 2 KV heads.
ModelConfig small_model() {
  ModelConfig cfg;
  cfg.n_layers = 2;
  cfg.n_heads = 4;
  cfg.n_kv_heads = 2;
  return cfg;
}

// Every (layer, head) set to h (dense heads read none of it, but are indexed).
PrefillPlan plan_of(const ModelConfig& cfg, int64_t n, const HeadPlan& h) {
  PrefillPlan plan;
  plan.seq_len = n;
  plan.layers.assign(cfg.n_layers, std::vector<HeadPlan>(cfg.n_heads, h));
  return plan;
}

TEST(RingNeed, DenseSp2NeedsThreeQuarters) {
  // 16 blocks, zigzag chunks of 4: rank 0 holds blocks 0-3 and 12-15, rank 1 blocks 4-11.
  // One hop. Rank 1 (last query in block 11) reads rank 0's blocks 0-3, not 12-15; rank 0
  // (last query in block 15) reads all of rank 1's 8. Needed 4 + 8 of 16 per (layer, tp).
  const ModelConfig cfg = small_model();
  const int64_t n = 16 * 64;
  const auto layout = plan_sequence_parallel(n, 2);
  const PrefillPlan plan = plan_of(cfg, n, HeadPlan{});
  for (int tp : {1, 2}) {
    SCOPED_TRACE(tp);
    const RingNeed r = ring_kv_need(plan, SparsePolicy::dense(), cfg, layout, n, tp);
    EXPECT_EQ(r.sent_blocks, 16 * cfg.n_layers * tp);
    EXPECT_EQ(r.needed_blocks, 12 * cfg.n_layers * tp);
    EXPECT_DOUBLE_EQ(r.needed_fraction(), 0.75);
  }
}

TEST(RingNeed, DenseSp4NeedsSevenEighths) {
  // 24 blocks, 8 chunks c0..c7 of 3: rank i holds c_i and c_(7-i), its last query is in
  // c_(7-i), so it reads chunks c0..c_(7-i). Shard of src travels 3 hops; hop k reaches
  // ranks src+k .. src+3 (mod 4). Low chunk c_src: always read (src <= 3 < 4). High chunk
  // c_(7-src): read iff a reached rank r <= src. src 0 reaches {1,2,3}, {2,3}, {3}: never,
  // so 3 x 3 of 3 x 6 blocks; src 1, 2, 3 always reach rank 0: 3 x 6 each. 63 of 72.
  const ModelConfig cfg = small_model();
  const int64_t n = 24 * 64;
  const auto layout = plan_sequence_parallel(n, 4);
  const RingNeed r =
      ring_kv_need(plan_of(cfg, n, HeadPlan{}), SparsePolicy::dense(), cfg, layout, n, 1);
  EXPECT_EQ(r.sent_blocks, 72 * cfg.n_layers);
  EXPECT_EQ(r.needed_blocks, 63 * cfg.n_layers);
  EXPECT_DOUBLE_EQ(r.needed_fraction(), 0.875);
}

// 4 blocks at sp 2: rank 0 holds blocks 0 and 3, rank 1 blocks 1 and 2; one hop each way.
class RingNeedSp2FourBlocks : public ::testing::Test {
 protected:
  const ModelConfig cfg = small_model();
  const int64_t n = 4 * 64;
  const std::vector<TokenRanges> layout = plan_sequence_parallel(n, 2);
  double dense_fraction() const {
    return ring_kv_need(plan_of(cfg, n, HeadPlan{}), SparsePolicy::dense(), cfg, layout, n, 1)
        .needed_fraction();
  }
};

TEST_F(RingNeedSp2FourBlocks, BlockSparseReadingOnlyBlockZero) {
  // Every query block reads key block 0 only: rank 1 needs block 0 of rank 0's {0, 3};
  // rank 0 needs nothing of rank 1's {1, 2}. 1 of 4.
  HeadPlan h;
  h.kind = PatternKind::kBlockSparse;
  h.topk = 1;
  h.blocks = {0, 0, 0, 0};
  const SparsePolicy policy = SparsePolicy::uniform(cfg, HeadPattern::block_sparse(1), 0);
  const RingNeed r = ring_kv_need(plan_of(cfg, n, h), policy, cfg, layout, n, 2);
  EXPECT_EQ(r.sent_blocks, 4 * cfg.n_layers * 2);
  EXPECT_EQ(r.needed_blocks, 1 * cfg.n_layers * 2);
  EXPECT_DOUBLE_EQ(r.needed_fraction(), 0.25);
  EXPECT_LT(r.needed_fraction(), dense_fraction());
}

TEST_F(RingNeedSp2FourBlocks, BlockSparsePaddedLists) {
  // Query blocks 0..3 read {0}, {0}, {0, 1}, {0, 2} (-1: empty slot). Rank 0 (query
  // blocks 0, 3) reads {0, 2}: of rank 1's {1, 2}, block 2. Rank 1 (query blocks 1, 2)
  // reads {0, 1}: of rank 0's {0, 3}, block 0. 2 of 4.
  HeadPlan h;
  h.kind = PatternKind::kBlockSparse;
  h.topk = 2;
  h.blocks = {0, -1, 0, -1, 0, 1, 0, 2};
  const SparsePolicy policy = SparsePolicy::uniform(cfg, HeadPattern::block_sparse(2), 0);
  const RingNeed r = ring_kv_need(plan_of(cfg, n, h), policy, cfg, layout, n, 1);
  EXPECT_EQ(r.sent_blocks, 4 * cfg.n_layers);
  EXPECT_EQ(r.needed_blocks, 2 * cfg.n_layers);
}

TEST_F(RingNeedSp2FourBlocks, VerticalSlashOffsetOneBlock) {
  // No columns, one slash at offset 64: query q reads key q - 64. Rank 0's queries
  // [0, 64) and [192, 256) read keys [128, 192) = block 2 (rank 1's); rank 1's [64, 192)
  // read [0, 128) = blocks 0 (rank 0's) and 1. 2 of 4.
  HeadPlan h;
  h.kind = PatternKind::kVerticalSlash;
  h.vs.offsets = {64};
  const SparsePolicy policy = SparsePolicy::uniform(cfg, HeadPattern::vertical_slash(30, 50), 0);
  const RingNeed r = ring_kv_need(plan_of(cfg, n, h), policy, cfg, layout, n, 1);
  EXPECT_EQ(r.sent_blocks, 4 * cfg.n_layers);
  EXPECT_EQ(r.needed_blocks, 2 * cfg.n_layers);
  // Column 0 as well adds nothing (block 0 is already read by rank 1).
  h.vs.columns = {0};
  EXPECT_EQ(ring_kv_need(plan_of(cfg, n, h), policy, cfg, layout, n, 1).needed_blocks,
            2 * cfg.n_layers);
}

TEST_F(RingNeedSp2FourBlocks, OneRankSendsNothing) {
  const RingNeed r = ring_kv_need(plan_of(cfg, n, HeadPlan{}), SparsePolicy::dense(), cfg,
                                  plan_sequence_parallel(n, 1), n, 1);
  EXPECT_EQ(r.sent_blocks, 0);
  EXPECT_DOUBLE_EQ(r.needed_fraction(), 1.0);
}

TEST_F(RingNeedSp2FourBlocks, MismatchedPlansThrow) {
  const SparsePolicy dense = SparsePolicy::dense();
  PrefillPlan plan = plan_of(cfg, n, HeadPlan{});
  plan.layers.pop_back();  // one layer short
  EXPECT_THROW(ring_kv_need(plan, dense, cfg, layout, n, 1), std::runtime_error);
  plan = plan_of(cfg, n, HeadPlan{});
  plan.layers[1].pop_back();  // one head short
  EXPECT_THROW(ring_kv_need(plan, dense, cfg, layout, n, 1), std::runtime_error);
  // tp 3 does not divide 2 KV heads; tp 0 is no split.
  plan = plan_of(cfg, n, HeadPlan{});
  EXPECT_THROW(ring_kv_need(plan, dense, cfg, layout, n, 3), std::runtime_error);
  EXPECT_THROW(ring_kv_need(plan, dense, cfg, layout, n, 0), std::runtime_error);
  // Block-sparse index for 3 query blocks at 4, and an empty one.
  HeadPlan h;
  h.kind = PatternKind::kBlockSparse;
  h.topk = 1;
  h.blocks = {0, 0, 0};
  const SparsePolicy bs = SparsePolicy::uniform(cfg, HeadPattern::block_sparse(1), 0);
  EXPECT_THROW(ring_kv_need(plan_of(cfg, n, h), bs, cfg, layout, n, 1), std::runtime_error);
  EXPECT_THROW(ring_kv_need(plan_of(cfg, n, HeadPlan{}), bs, cfg, layout, n, 1),
               std::runtime_error);
}

}  // namespace
}  // namespace mprefill
