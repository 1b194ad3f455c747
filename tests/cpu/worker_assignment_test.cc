// worker/assignment.h: an Assignment's shard plan and policy as the worker decodes and
// checks them (one line per refusal), and model/parallel_plan.h check_sp_layout. The
// policy comes from the coordinator's own encoder (coordinator/planner.h policy_table), the
// plan from the shared codec (proto/shard_plan.h).
#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

#include "coordinator/planner.h"
#include "model/parallel_plan.h"
#include "proto/shard_plan.h"
#include "worker/assignment.h"

namespace mprefill {
namespace {

namespace v1 = ::mprefill::v1;

ModelConfig tiny() {
  ModelConfig c;
  c.n_layers = 2;
  c.hidden = 64;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.vocab = 300;
  c.max_position = 4096;
  return c;
}

// The message of decode_shard_plan's refusal ("" when it accepts).
std::string refusal(const v1::ShardPlan& p, DistTopology g, int64_t n) {
  try {
    (void)worker::decode_shard_plan(p, g, n);
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

TEST(WorkerAssignment, DecodesThePlanAsSent) {
  const std::vector<TokenRanges> mine = {{{0, 64}, {128, 192}, {320, 384}, {448, 500}},
                                         {{64, 128}, {192, 320}, {384, 448}}};
  EXPECT_EQ(worker::decode_shard_plan(wire::encode_shard_layout(mine, 2, 2), {2, 2}, 500), mine);
  const auto zz = plan_sequence_parallel(777, 3);
  EXPECT_EQ(worker::decode_shard_plan(wire::encode_shard_layout(zz, 1, 3), {1, 3}, 777), zz);
}

// proto/shard_plan.h: the one layout <-> ShardPlan codec, field by field.
TEST(WorkerAssignment, ShardLayoutCodecRoundTrips) {
  const std::vector<TokenRanges> layout = {{{256, 512}, {0, 128}}, {}, {{128, 256}}};
  const v1::ShardPlan p = wire::encode_shard_layout(layout, 2, 3);
  EXPECT_EQ(p.tp(), 2);
  EXPECT_EQ(p.sp(), 3);
  ASSERT_EQ(p.sp_shards_size(), 3);
  EXPECT_EQ(p.sp_shards(1).ranges_size(), 0);
  ASSERT_EQ(p.sp_shards(0).ranges_size(), 2);
  EXPECT_EQ(p.sp_shards(0).ranges(0).begin(), 256);
  EXPECT_EQ(p.sp_shards(0).ranges(1).end(), 128);
  EXPECT_EQ(p.tp_heads_size(), 0);
  EXPECT_EQ(wire::decode_shard_layout(p), layout);  // order and empty shards kept
  EXPECT_TRUE(wire::decode_shard_layout(v1::ShardPlan{}).empty());
}

TEST(WorkerAssignment, RefusesAPlanThatDoesNotFit) {
  const auto zz = plan_sequence_parallel(512, 2);
  EXPECT_EQ(refusal(v1::ShardPlan(), {1, 2}, 512),
            "shard plan: the assignment carries none (the coordinator plans)");
  EXPECT_EQ(refusal(wire::encode_shard_layout(zz, 2, 1), {1, 2}, 512),
            "shard plan: tp 2 x sp 1 does not match this group's tp 1 x sp 2");
  EXPECT_EQ(refusal(wire::encode_shard_layout(zz, 1, 2), {1, 2}, 513),
            "shard plan: token layout for 513 tokens over sp 2: tokens [512, 513) are held by "
            "no rank");
  EXPECT_EQ(refusal(wire::encode_shard_layout({{{0, 128}}, {{64, 512}}}, 1, 2), {1, 2}, 512),
            "shard plan: token layout for 512 tokens over sp 2: token 64 is held by two ranks");
  EXPECT_EQ(refusal(wire::encode_shard_layout({{{0, 100}}, {{100, 512}}}, 1, 2), {1, 2}, 512),
            "shard plan: token layout for 512 tokens over sp 2: sp rank 0 range [0, 100) does "
            "not fall on 64-token block edges");
  EXPECT_EQ(refusal(wire::encode_shard_layout({{{0, 64}}, {{64, 600}}}, 1, 2), {1, 2}, 512),
            "shard plan: token layout for 512 tokens over sp 2: sp rank 1 range [64, 600) is "
            "empty or outside the prompt");
  EXPECT_EQ(
      refusal(wire::encode_shard_layout({{{256, 512}, {0, 128}}, {{128, 256}}}, 1, 2), {1, 2}, 512),
      "shard plan: token layout for 512 tokens over sp 2: sp rank 0 range [0, 128) is not "
      "in ascending order");
}

// The KV-head placement of every layer, run as sent: decoded and checked (tiny: 2 layers,
// 2 KV heads), none sent leaves it to the executor.
TEST(WorkerAssignment, DecodesTheTpPlacementAsSent) {
  const ModelConfig cfg = tiny();
  v1::ShardPlan plan = wire::encode_shard_layout({{{0, 512}}}, 2, 1);
  EXPECT_TRUE(worker::decode_tp_placement(plan, cfg, 2).kv_heads.empty());
  const wire::TpHeads swapped = {{{1}, {0}}, {{0}, {1}}};
  wire::encode_tp_heads(swapped, &plan);
  const TpPlan p = worker::decode_tp_placement(plan, cfg, 2);
  EXPECT_EQ(p.tp, 2);
  EXPECT_EQ(p.kv_heads, swapped);
  EXPECT_FALSE(is_contiguous(p, cfg));
  auto placement_refusal = [&](const wire::TpHeads& h) -> std::string {
    v1::ShardPlan q = wire::encode_shard_layout({{{0, 512}}}, 2, 1);
    wire::encode_tp_heads(h, &q);
    try {
      (void)worker::decode_tp_placement(q, cfg, 2);
    } catch (const std::exception& e) {
      return e.what();
    }
    return "";
  };
  // Layer 0 only (what coordinators before the full plan sent).
  EXPECT_EQ(placement_refusal({{{0}, {1}}}),
            "shard plan: KV-head placement over tp 2: it has 1 layers, the model 2");
  EXPECT_EQ(placement_refusal({{{0}, {1}}, {{1}, {1}}}),
            "shard plan: KV-head placement over tp 2: layer 1: KV head 1 is placed twice");
  EXPECT_EQ(placement_refusal({{{0}, {1}}, {{0}, {7}}}),
            "shard plan: KV-head placement over tp 2: layer 1: KV head 7 is not one of 0..1");
  // A count that is not a multiple of tp leaves the last layer short.
  v1::ShardPlan odd = wire::encode_shard_layout({{{0, 512}}}, 2, 1);
  wire::encode_tp_heads({{{0}, {1}}, {{0}}}, &odd);
  try {
    (void)worker::decode_tp_placement(odd, cfg, 2);
    ADD_FAILURE() << "a placement with 3 rank entries for tp 2 was accepted";
  } catch (const std::exception& e) {
    EXPECT_STREQ(e.what(), "shard plan: KV-head placement over tp 2: layer 1: 1 ranks");
  }
}

TEST(WorkerAssignment, PolicyIsTheCoordinatorsAndNoPathIsOpened) {
  const ModelConfig cfg = tiny();
  SparsePolicy p = SparsePolicy::uniform(cfg, HeadPattern::vertical_slash(100, 200), 77);
  p.heads[3] = HeadPattern::a_shape(64, 128);
  p.heads[5] = HeadPattern::block_sparse(9);
  p.source = "configs/x.json";
  v1::Assignment a;
  *a.mutable_policy() = coord::policy_table(p);
  a.mutable_options()->set_sparse("/no/such/file.json");
  const SparsePolicy q = worker::decode_policy(a, cfg);
  EXPECT_EQ(q.source, p.source);
  EXPECT_EQ(q.dense_below, 77);
  EXPECT_EQ(q.heads, p.heads);
  EXPECT_EQ(q.summary_string(), p.summary_string());

  // Without a resolved policy only the names resolve; a path is refused, not opened.
  v1::Assignment b;
  b.mutable_options()->set_sparse("auto");
  EXPECT_EQ(worker::decode_policy(b, cfg).source, "auto");
  b.mutable_options()->set_sparse("/no/such/file.json");
  try {
    (void)worker::decode_policy(b, cfg);
    ADD_FAILURE() << "a path was accepted";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("carries no resolved policy"), std::string::npos)
        << e.what();
  }

  // A table that does not fit the model (or is malformed) is refused.
  v1::Assignment c = a;
  c.mutable_policy()->set_n_layers(3);
  EXPECT_THROW((void)worker::decode_policy(c, cfg), std::runtime_error);
  c = a;
  c.mutable_policy()->set_kind(0, 9);
  EXPECT_THROW((void)worker::decode_policy(c, cfg), std::runtime_error);
}

TEST(WorkerAssignment, AdaptiveThresholdsTravelWithThePolicy) {
  const ModelConfig cfg = tiny();
  SparsePolicy p = SparsePolicy::uniform(cfg, HeadPattern::vertical_slash(100, 200, 0.95), 77);
  p.heads[2] = HeadPattern::block_sparse(9, 0.5);
  p.heads[3] = HeadPattern::a_shape(64, 128);
  v1::Assignment a;
  *a.mutable_policy() = coord::policy_table(p);
  EXPECT_EQ(a.policy().tau_size(), static_cast<int>(p.heads.size()));
  EXPECT_EQ(worker::decode_policy(a, cfg).heads, p.heads);
  // A fixed policy sends no thresholds (the table stays as before).
  EXPECT_EQ(
      coord::policy_table(SparsePolicy::uniform(cfg, HeadPattern::vertical_slash(1, 2))).tau_size(),
      0);
  // The builtin spec resolves without a table too.
  v1::Assignment b;
  b.mutable_options()->set_sparse("adaptive:0.9");
  EXPECT_EQ(worker::decode_policy(b, cfg).heads[0], HeadPattern::vertical_slash(1000, 6096, 0.9));
  // Thresholds outside (0, 1] or of the wrong count are refused.
  v1::Assignment c = a;
  c.mutable_policy()->set_tau(1, 1.5);
  EXPECT_THROW((void)worker::decode_policy(c, cfg), std::runtime_error);
  c = a;
  c.mutable_policy()->mutable_tau()->RemoveLast();
  EXPECT_THROW((void)worker::decode_policy(c, cfg), std::runtime_error);
}

TEST(WorkerAssignment, AntidiagonalStridesTravelWithThePolicy) {
  const ModelConfig cfg = tiny();
  SparsePolicy p = SparsePolicy::uniform(cfg, HeadPattern::block_sparse(9, 0.9, 8), 77);
  p.heads[1] = HeadPattern::block_sparse(4, 0, 16);
  p.heads[2] = HeadPattern::block_sparse(5);  // pooled
  p.heads[3] = HeadPattern::vertical_slash(100, 200);
  v1::Assignment a;
  *a.mutable_policy() = coord::policy_table(p);
  EXPECT_EQ(a.policy().stride_size(), static_cast<int>(p.heads.size()));
  EXPECT_EQ(worker::decode_policy(a, cfg).heads, p.heads);
  // A pooled policy sends no strides (the table stays as before).
  EXPECT_EQ(
      coord::policy_table(SparsePolicy::uniform(cfg, HeadPattern::block_sparse(3))).stride_size(),
      0);
  v1::Assignment b;
  b.mutable_options()->set_sparse("xattn:0.9:7");
  EXPECT_EQ(worker::decode_policy(b, cfg).heads[0], HeadPattern::block_sparse(7, 0.9, 8));
  // A stride that does not divide 64, one on a vertical-slash head, or the wrong count.
  for (const auto& [head, stride] : {std::pair{0, 3}, std::pair{0, 128}, std::pair{3, 8}}) {
    v1::Assignment c = a;
    c.mutable_policy()->set_stride(head, stride);
    EXPECT_THROW((void)worker::decode_policy(c, cfg), std::runtime_error) << head << ":" << stride;
  }
  v1::Assignment c = a;
  c.mutable_policy()->mutable_stride()->RemoveLast();
  EXPECT_THROW((void)worker::decode_policy(c, cfg), std::runtime_error);
}

TEST(WorkerAssignment, DecodeAssignmentChecksThePrompt) {
  v1::Assignment a;
  a.set_job_id(7);
  for (int i = 0; i < 130; ++i) a.add_token_ids(i);
  *a.mutable_plan() = wire::encode_shard_layout(plan_sequence_parallel(130, 2), 1, 2);
  *a.mutable_policy() = coord::policy_table(SparsePolicy::dense());
  a.mutable_options()->set_audit_heads(2);
  const worker::JobSpec s = worker::decode_assignment(a, tiny(), {1, 2});
  EXPECT_EQ(s.id, 7u);
  EXPECT_EQ(s.ids.size(), 130u);
  EXPECT_EQ(s.sp_layout, plan_sequence_parallel(130, 2));
  EXPECT_EQ(s.audit.heads_per_layer, 2);
  a.set_token_ids(5, 300);  // outside the vocabulary
  EXPECT_THROW((void)worker::decode_assignment(a, tiny(), {1, 2}), std::runtime_error);
}

}  // namespace
}  // namespace mprefill
