// The decoder's KV port under silent connections (issue 17 finding 3, issue 15): each
// connection says its hellos on its own thread, with its own small cap and short deadline,
// so 20 TCP connections that never speak delay no job's handoff; they are closed after the
// pre-hello deadline and the refusals are logged at most once a second.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "tests/hardening/harness.h"

namespace h = mprefill::hardening;
namespace v1 = ::mprefill::v1;
using Clock = std::chrono::steady_clock;

namespace {

const char* kModel = "random:tiny:5";

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// One job end to end; its wall time (submit -> result) in s, the result in *res.
double timed_job(uint16_t port, v1::JobResult* res) {
  h::Client c(port);
  v1::JobAccepted acc;
  v1::Error err;
  const auto t0 = Clock::now();
  EXPECT_TRUE(c.submit(h::tiny_job(512, 2), &acc, &err)) << err.message();
  EXPECT_TRUE(c.wait_result(acc.job_id(), res, &err, 60000)) << err.message();
  return seconds_since(t0);
}

int count_lines(const std::string& text, const std::string& needle) {
  int n = 0;
  for (size_t p = text.find(needle); p != std::string::npos; p = text.find(needle, p + 1)) ++n;
  return n;
}

}  // namespace

TEST(KvPort, TwentySilentSocketsDelayNoHandoff) {
  const std::string dir = h::make_dir("kvport");
  h::Coordinator co(dir, {});
  auto dec = h::start_decoder(dir, co.addr(), kModel, "d0", "");
  auto g = h::start_workers(dir, co.addr(), kModel, 1, "g0", "");
  ASSERT_TRUE(h::wait_registered(co.port, "", 1, 1, 120000)) << co.proc->log() << g->log();
  uint16_t kv_port = 0;
  {
    h::Client c(co.port);
    const auto s = c.status();
    ASSERT_EQ(s.decoders_size(), 1);
    const std::string ep = s.decoders(0).endpoint();
    kv_port = static_cast<uint16_t>(std::stoi(ep.substr(ep.rfind(':') + 1)));
  }
  v1::JobResult warm, base, attacked;
  timed_job(co.port, &warm);
  const double t_base = timed_job(co.port, &base);
  ASSERT_EQ(base.state(), v1::DONE);

  std::vector<std::unique_ptr<h::RawPeer>> silent;
  for (int i = 0; i < 20; ++i) silent.push_back(std::make_unique<h::RawPeer>(kv_port));
  const auto t_attack = Clock::now();
  const double t_job = timed_job(co.port, &attacked);
  ASSERT_EQ(attacked.state(), v1::DONE);
  EXPECT_EQ(std::vector<int>(attacked.generated_ids().begin(), attacked.generated_ids().end()),
            std::vector<int>(base.generated_ids().begin(), base.generated_ids().end()));
  EXPECT_LE(t_job, t_base + 1.0) << "the handoff waited behind silent connections";
  // The job result names the transport and the handoff's timing.
  EXPECT_EQ(attacked.kv_transport(), "tcp");
  EXPECT_GT(attacked.kv_gbps(), 0.0);
  EXPECT_GE(attacked.kv_ready_ms(), attacked.prefill_end_ms());
  EXPECT_NEAR(attacked.exposed_handoff_ms(), attacked.kv_ready_ms() - attacked.prefill_end_ms(),
              0.01);

  // The silent ones are dropped after the pre-hello deadline (2 s), all of them.
  int closed = 0;
  for (auto& p : silent) closed += p->closed_within(8000);
  EXPECT_EQ(closed, 20);
  const double window_s = seconds_since(t_attack);
  const int lines = count_lines(dec->log(), "KV stream refused");
  EXPECT_LE(lines, static_cast<int>(window_s) + 2) << dec->log();
  std::printf(
      "[ figures ] 20 silent KV-port sockets: job %.2f s (unattacked %.2f s), all closed "
      "within %.1f s, %d refusal lines; transport %s %.3f GB/s, prefill end %.1f ms, KV "
      "ready %.1f ms, exposed %.1f ms\n",
      t_job, t_base, window_s, lines, attacked.kv_transport().c_str(), attacked.kv_gbps(),
      attacked.prefill_end_ms(), attacked.kv_ready_ms(), attacked.exposed_handoff_ms());
}
