// The worker runs the coordinator's plan (issue 14, one plan owner): this process speaks
// the coordinator's side of the real protocol (wire::Listener, WorkerRegister /
// Assignment / WorkerDone) and the decoder's KV port (kv::KvReceiver) to a real mpirun
// group of mprefill-worker (tp 1 x sp 2, random:tiny). Assignments carry hand-made shard
// plans and policies:
//   - the zigzag plan, a balanced interleaved plan the worker would never choose, and an
//     unbalanced one: each is executed (WorkerDone.executed_plan) and gives the same first
//     token; the unbalanced one is re-balanced by the sparse-aware split and says so;
//   - a plan for another tp x sp, one with a gap, and a client-named config path without
//     a resolved policy are refused with one clear line, and the group keeps serving;
//   - a config path with the resolved policy runs (the worker never opens the path).
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "coordinator/planner.h"
#include "kv/kv_receiver.h"
#include "model/parallel_plan.h"
#include "proto/shard_plan.h"
#include "proto/wire.h"
#include "tests/hardening/harness.h"

namespace mprefill {
namespace {

namespace h = ::mprefill::hardening;
namespace v1 = ::mprefill::v1;
using Clock = std::chrono::steady_clock;

constexpr int kTokens = 512;  // 8 blocks of 64

struct Outcome {
  bool done = false;
  v1::WorkerDone result;
  v1::WorkerFailed failure;
};

class WorkerPlan : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = h::make_dir("worker_plan");
    listener_ = std::make_unique<wire::Listener>("127.0.0.1", 0);
    workers_ = h::start_workers(dir_, "127.0.0.1:" + std::to_string(listener_->port()),
                                "random:tiny:1", 2, "plan", "");
    std::string peer, err;
    const auto until = Clock::now() + std::chrono::seconds(120);
    while (!conn_ && Clock::now() < until) {
      conn_ = listener_->accept(1000, v1::WORKER, "", &peer, &err);
      ASSERT_TRUE(workers_->running()) << workers_->log();
    }
    ASSERT_TRUE(conn_) << "no worker group registered: " << err << "\n" << workers_->log();
    v1::Envelope env;
    ASSERT_TRUE(next(&env, 30000)) << workers_->log();
    ASSERT_TRUE(env.has_worker_register()) << env.DebugString();
    reg_ = env.worker_register();
    ASSERT_EQ(reg_.tp(), 1);
    ASSERT_EQ(reg_.sp(), 2);
    v1::Envelope ok;
    ok.mutable_worker_registered()->set_group(reg_.group());
    ok.mutable_worker_registered()->set_heartbeat_ms(1000);
    conn_->send(ok, 5000);
    kv::ReceiverOptions ro;
    ro.contract = reg_.kv();
    receiver_ = std::make_unique<kv::KvReceiver>(ro, [](uint64_t job, const std::string& m) {
      std::fprintf(stderr, "receiver: job %llu failed: %s\n", static_cast<unsigned long long>(job),
                   m.c_str());
    });
  }

  // The next message that is not a heartbeat or progress, within timeout_ms.
  bool next(v1::Envelope* env, int timeout_ms) {
    const auto until = Clock::now() + std::chrono::milliseconds(timeout_ms);
    while (Clock::now() < until) {
      if (!conn_->recv(env, 200)) continue;
      if (env->has_heartbeat() || env->has_worker_progress()) continue;
      return true;
    }
    return false;
  }

  v1::Assignment assignment(const v1::ShardPlan& plan) {
    v1::Assignment a;
    a.set_job_id(++job_);
    for (int i = 0; i < kTokens; ++i) a.add_token_ids(3 + (i * 7919) % 250);
    a.mutable_options()->set_kv_transport("tcp");
    *a.mutable_plan() = plan;
    *a.mutable_policy() = coord::policy_table(SparsePolicy::dense());
    a.mutable_decoder()->set_host("127.0.0.1");
    a.mutable_decoder()->set_port(receiver_->port());
    a.mutable_decoder()->set_transport("tcp");
    a.set_handoff_timeout_ms(30000);
    return a;
  }

  // Sends the job (the decoder expecting its KV when expect_kv) and waits for its answer.
  Outcome run(const v1::Assignment& a, bool expect_kv) {
    Outcome o;
    if (expect_kv) {
      v1::Expect e;
      e.set_job_id(a.job_id());
      e.set_prompt_tokens(a.token_ids_size());
      e.set_n_layers(reg_.kv().model().n_layers());
      e.set_senders(2);
      e.set_timeout_ms(30000);
      std::string why;
      EXPECT_TRUE(receiver_->expect(e, &why)) << why;
    }
    v1::Envelope env;
    env.set_version(wire::kProtocolVersion);
    *env.mutable_assignment() = a;
    conn_->send(env, 5000);
    v1::Envelope ans;
    EXPECT_TRUE(next(&ans, 120000)) << "no answer to job " << a.job_id() << "\n" << workers_->log();
    if (ans.has_worker_done()) {
      o.done = true;
      o.result = ans.worker_done();
      EXPECT_EQ(o.result.job_id(), a.job_id());
    } else {
      EXPECT_TRUE(ans.has_worker_failed()) << ans.DebugString();
      o.failure = ans.worker_failed();
      EXPECT_EQ(o.failure.job_id(), a.job_id());
    }
    if (expect_kv) {
      std::string why;
      if (o.done) {
        EXPECT_TRUE(receiver_->wait_complete(a.job_id(), &why)) << why;
      }
      receiver_->release(a.job_id());
    }
    return o;
  }

  std::string dir_;
  std::unique_ptr<wire::Listener> listener_;
  std::unique_ptr<h::Proc> workers_;
  std::unique_ptr<wire::Connection> conn_;
  std::unique_ptr<kv::KvReceiver> receiver_;
  v1::WorkerRegister reg_;
  uint64_t job_ = 0;
};

TEST_F(WorkerPlan, RunsTheCoordinatorsPlanAndRefusesABadOne) {
  // 1. The coordinator's own plan (zigzag), as coordinator/planner.cc makes it.
  const v1::ShardPlan zigzag =
      coord::make_shard_plan(reg_.kv().model(), SparsePolicy::dense(), kTokens, 1, 2);
  const Outcome base = run(assignment(zigzag), true);
  ASSERT_TRUE(base.done) << base.failure.message();
  EXPECT_EQ(wire::decode_shard_layout(base.result.executed_plan()),
            plan_sequence_parallel(kTokens, 2));
  EXPECT_FALSE(base.result.sp_rebalanced());

  // 2. A plan for another group shape: one line, the group stays up.
  Outcome bad = run(assignment(wire::encode_shard_layout({{{0, kTokens}}}, 1, 1)), false);
  ASSERT_FALSE(bad.done);
  EXPECT_NE(
      bad.failure.message().find("shard plan: tp 1 x sp 1 does not match this group's tp 1 x sp 2"),
      std::string::npos)
      << bad.failure.message();
  EXPECT_EQ(bad.failure.message().find('\n'), std::string::npos);

  // 3. Balanced (18 causal tiles per rank), but not the zigzag: run as sent. The config
  // path is a client's name the worker must not open: the resolved policy travels.
  const std::vector<TokenRanges> interleaved = {{{0, 64}, {128, 192}, {320, 384}, {448, 512}},
                                                {{64, 128}, {192, 320}, {384, 448}}};
  ASSERT_NE(interleaved, plan_sequence_parallel(kTokens, 2));
  v1::Assignment a = assignment(wire::encode_shard_layout(interleaved, 1, 2));
  a.mutable_options()->set_sparse("/no/such/dir/config.json");
  const Outcome mine = run(a, true);
  ASSERT_TRUE(mine.done) << mine.failure.message();
  EXPECT_EQ(wire::decode_shard_layout(mine.result.executed_plan()), interleaved);
  EXPECT_FALSE(mine.result.sp_rebalanced());
  EXPECT_NEAR(mine.result.sp_imbalance_planned(), 1.0, 1e-9);
  EXPECT_EQ(mine.result.first_token_id(), base.result.first_token_id());
  EXPECT_NEAR(mine.result.first_token_logit(), base.result.first_token_logit(),
              1e-4 * std::fabs(base.result.first_token_logit()) + 1e-5);

  // 4. A gap in the token layout: refused naming the tokens nobody holds.
  bad = run(assignment(wire::encode_shard_layout({{{0, 64}}, {{64, 448}}}, 1, 2)), false);
  ASSERT_FALSE(bad.done);
  EXPECT_NE(bad.failure.message().find("tokens [448, 512) are held by no rank"), std::string::npos)
      << bad.failure.message();

  // 5. A client-named config without the resolved policy: refused, nothing opened.
  a = assignment(zigzag);
  a.clear_policy();
  a.mutable_options()->set_sparse("/no/such/dir/config.json");
  bad = run(a, false);
  ASSERT_FALSE(bad.done);
  EXPECT_NE(bad.failure.message().find("carries no resolved policy"), std::string::npos)
      << bad.failure.message();

  // 6. Contiguous halves: 10 vs 26 causal tiles (predicted max/mean 26/18). The
  // sparse-aware re-balance inside the plan replaces it and the result says so.
  const std::vector<TokenRanges> halves = {{{0, 256}}, {{256, 512}}};
  const Outcome rb = run(assignment(wire::encode_shard_layout(halves, 1, 2)), true);
  ASSERT_TRUE(rb.done) << rb.failure.message();
  EXPECT_TRUE(rb.result.sp_rebalanced());
  EXPECT_NEAR(rb.result.sp_imbalance_planned(), 26.0 / 18.0, 1e-6);
  const std::vector<TokenRanges> ran = wire::decode_shard_layout(rb.result.executed_plan());
  EXPECT_NE(ran, halves);
  EXPECT_NO_THROW(check_sp_layout(ran, kTokens, 2));
  EXPECT_LE(rb.result.sp_imbalance(), 1.10);
  EXPECT_EQ(rb.result.first_token_id(), base.result.first_token_id());
}

}  // namespace
}  // namespace mprefill
