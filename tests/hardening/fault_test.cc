// Faults against the real service (issue 7): kill -9 of one worker rank mid-job, a
// decoder killed mid-handoff, a coordinator restart, a client that disconnects. The job
// in the way fails with a message (or is cancelled), the service keeps serving with what
// is left, and nothing leaks (group freed, decoder room returned, worker memory back).
// Long jobs: random:tiny at 4096 tokens on 2 ranks, seconds of CPU prefill per layer, so
// kills land mid-job (after the first layer's progress and KV handoff).
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <thread>

#include "tests/hardening/harness.h"

namespace h = mprefill::hardening;
namespace v1 = ::mprefill::v1;
using Clock = std::chrono::steady_clock;

namespace {

const char* kModel = "random:tiny:7";
constexpr int kLongPrompt = 4096;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// pid of world rank `rank` among mpirun's children.
pid_t rank_pid(h::Proc& mpirun, int rank) {
  const auto until = Clock::now() + std::chrono::seconds(10);
  while (Clock::now() < until) {
    for (pid_t c : h::children_of(mpirun.pid()))
      if (h::environ_of(c, "OMPI_COMM_WORLD_RANK") == std::to_string(rank)) return c;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return -1;
}

long group_rss_kb(h::Proc& mpirun) {
  long kb = 0;
  for (pid_t c : h::children_of(mpirun.pid())) kb += h::rss_kb(c);
  return kb;
}

// Submits a long job with progress events and waits until the group reports `layers`
// layers done (the prefill and its KV handoff are under way).
uint64_t start_long_job(h::Client& c, const std::string& group, int layers) {
  auto job = h::tiny_job(kLongPrompt, 2);
  job.mutable_options()->set_want_progress(true);
  if (!group.empty()) job.mutable_options()->set_group(group);
  v1::JobAccepted acc;
  v1::Error err;
  if (!c.submit(job, &acc, &err)) throw std::runtime_error("long job refused: " + err.message());
  const auto until = Clock::now() + std::chrono::seconds(120);
  while (Clock::now() < until) {
    v1::Envelope e;
    if (!c.conn().recv(&e, 1000)) continue;
    if (e.has_progress() && e.progress().job_id() == acc.job_id() &&
        e.progress().state() == v1::RUNNING && e.progress().layer() >= layers)
      return acc.job_id();
    if (e.has_error() || e.has_result())
      throw std::runtime_error("long job ended early: " + e.ShortDebugString());
  }
  throw std::runtime_error("long job made no progress within 120 s");
}

v1::JobStatus job_status(uint16_t port, uint64_t id) {
  h::Client c(port);
  const auto s = c.status(id);
  if (s.jobs_size() != 1) throw std::runtime_error("no status for job " + std::to_string(id));
  return s.jobs(0);
}

void expect_good_job(uint16_t port, const std::string& after, const std::string& group = "") {
  h::Client c(port);
  auto job = h::tiny_job(48, 3);
  if (!group.empty()) job.mutable_options()->set_group(group);
  v1::JobAccepted acc;
  v1::Error err;
  ASSERT_TRUE(c.submit(job, &acc, &err)) << after << ": " << err.message();
  v1::JobResult res;
  ASSERT_TRUE(c.wait_result(acc.job_id(), &res, &err, 90000)) << after << ": " << err.message();
  EXPECT_EQ(res.state(), v1::DONE) << after;
  EXPECT_EQ(res.generated_ids_size(), 4) << after;
}

}  // namespace

TEST(Faults, KillOneWorkerRankMidJob) {
  const std::string dir = h::make_dir("killrank");
  h::Coordinator co(dir, {"--heartbeat-ms", "200", "--heartbeat-timeout-ms", "3000"});
  auto dec = h::start_decoder(dir, co.addr(), kModel, "d0", "");
  auto ga = h::start_workers(dir, co.addr(), kModel, 2, "g-a", "");
  auto gb = h::start_workers(dir, co.addr(), kModel, 1, "g-b", "");
  ASSERT_TRUE(h::wait_registered(co.port, "", 2, 1, 120000))
      << co.proc->log() << ga->log() << gb->log();

  h::Client c(co.port);
  const uint64_t id = start_long_job(c, "g-a", 1);
  const pid_t victim = rank_pid(*ga, 1);
  ASSERT_GT(victim, 0) << "rank 1 of g-a not found";
  const auto t_kill = Clock::now();
  ASSERT_EQ(::kill(victim, SIGKILL), 0);

  v1::JobResult res;
  v1::Error err;
  ASSERT_FALSE(c.wait_result(id, &res, &err, 30000)) << "job finished despite a dead rank";
  const double fail_s = seconds_since(t_kill);
  EXPECT_LT(fail_s, 30.0);
  // Whoever notices first (the coordinator: group connection lost, heartbeat; the
  // decoder: the dead rank's KV stream ended early, DecodeFailed.sender_failed), the job
  // is the worker group's failure.
  EXPECT_EQ(err.code(), v1::WORKER_FAILED)
      << v1::ErrorCode_Name(err.code()) << ": " << err.message();
  EXPECT_TRUE(err.message().find("g-a") != std::string::npos ||
              err.message().find("rank 1") != std::string::npos)
      << err.message();
  std::printf("[ figures ] rank 1 of g-a killed mid-job: job FAILED after %.2f s: %s\n", fail_s,
              err.message().c_str());
  EXPECT_EQ(job_status(co.port, id).state(), v1::FAILED);
  // The dead group is gone from the service (heartbeat or connection loss) and reported.
  EXPECT_TRUE(h::wait_status(co.port, "", 15000, [](const v1::StatusReply& s) {
    for (const auto& g : s.groups())
      if (g.name() == "g-a" && g.alive()) return false;
    return true;
  })) << co.proc->log();
  EXPECT_TRUE(h::file_contains(co.dir + "/coordinator.log", "worker group 'g-a' removed"))
      << co.proc->log();
  // Its mpirun ends (no orphan ranks left holding memory).
  int st = -1;
  EXPECT_TRUE(ga->wait_exit(30000, &st)) << "mpirun of the broken group still running";
  // The other group keeps serving.
  expect_good_job(co.port, "a dead rank in another group", "g-b");
  expect_good_job(co.port, "a dead rank in another group (any group)");
  const auto s = h::Client(co.port).status();
  ASSERT_EQ(s.decoders_size(), 1);
  EXPECT_EQ(s.decoders(0).active_jobs(), 0) << "decoder room of the failed job not returned";
}

TEST(Faults, DecoderKilledMidHandoff) {
  const std::string dir = h::make_dir("killdec");
  h::Coordinator co(dir, {"--heartbeat-ms", "200", "--heartbeat-timeout-ms", "3000"});
  auto dec = h::start_decoder(dir, co.addr(), kModel, "d0", "");
  // Two ranks (DistEngine): each layer's KV is handed off as soon as it is computed.
  auto g = h::start_workers(dir, co.addr(), kModel, 2, "g0", "");
  ASSERT_TRUE(h::wait_registered(co.port, "", 1, 1, 120000)) << co.proc->log() << g->log();
  expect_good_job(co.port, "warm-up");
  const long rss_before = group_rss_kb(*g);

  h::Client c(co.port);
  const uint64_t id = start_long_job(c, "", 1);
  const long rss_mid = group_rss_kb(*g);
  const auto t_kill = Clock::now();
  dec->signal_group(SIGKILL);
  v1::JobResult res;
  v1::Error err;
  ASSERT_FALSE(c.wait_result(id, &res, &err, 30000)) << "job finished without its decoder";
  const double fail_s = seconds_since(t_kill);
  EXPECT_LT(fail_s, 30.0);
  EXPECT_TRUE(err.code() == v1::DECODER_FAILED || err.code() == v1::WORKER_FAILED)
      << v1::ErrorCode_Name(err.code()) << ": " << err.message();
  EXPECT_FALSE(err.message().empty());
  std::printf("[ figures ] decoder killed mid-handoff: job FAILED after %.2f s: %s\n", fail_s,
              err.message().c_str());
  // The group drops the job and its KV buffers: idle again, memory back near the level
  // before the job.
  ASSERT_TRUE(h::wait_status(
      co.port, "", 60000,
      [](const v1::StatusReply& s) { return s.groups_size() == 1 && !s.groups(0).busy(); }))
      << co.proc->log() << g->log();
  std::this_thread::sleep_for(std::chrono::seconds(1));
  const long rss_after = group_rss_kb(*g);
  std::printf(
      "[ figures ] worker group RSS: before %ld KiB, mid-job %ld KiB, after failure %ld KiB\n",
      rss_before, rss_mid, rss_after);
  // (Not under sanitizers: ASan's quarantine keeps freed memory resident.)
  if (std::getenv("MPREFILL_SANITIZER_RUN") == nullptr)
    EXPECT_LT(rss_after, rss_before + 8 * 1024) << "worker memory not released";

  // A new decoder registers; the next job succeeds on the same group.
  auto dec2 = h::start_decoder(dir, co.addr(), kModel, "d1", "");
  ASSERT_TRUE(h::wait_status(co.port, "", 60000, [](const v1::StatusReply& s) {
    return s.decoders_size() == 1 && s.decoders(0).name() == "d1";
  })) << co.proc->log();
  expect_good_job(co.port, "a killed decoder");
}

TEST(Faults, CoordinatorRestart) {
  const std::string dir = h::make_dir("restart");
  auto co =
      std::make_unique<h::Coordinator>(dir, std::vector<std::string>{"--heartbeat-ms", "200"});
  const uint16_t port = co->port;
  auto dec = h::start_decoder(dir, co->addr(), kModel, "d0", "", {"--reconnect-s", "60"});
  auto g = h::start_workers(dir, co->addr(), kModel, 2, "g0", "", {"--reconnect-s", "60"});
  ASSERT_TRUE(h::wait_registered(port, "", 1, 1, 120000)) << co->proc->log();
  expect_good_job(port, "first coordinator");
  const pid_t dec_pid = dec->pid(), g_pid = g->pid();

  co->proc->signal_group(SIGKILL);
  int st = -1;
  ASSERT_TRUE(co->proc->wait_exit(5000, &st));
  co.reset();
  // Down for a while: the peers retry with backoff meanwhile.
  std::this_thread::sleep_for(std::chrono::seconds(3));
  EXPECT_TRUE(dec->running()) << dec->log();
  EXPECT_TRUE(g->running()) << g->log();
  const auto t_up = Clock::now();
  co = std::make_unique<h::Coordinator>(h::make_dir("restart_second"),
                                        std::vector<std::string>{"--heartbeat-ms", "200"}, port);
  // The same decoder and worker group (not restarted) register with the new coordinator.
  ASSERT_TRUE(h::wait_registered(port, "", 1, 1, 20000))
      << co->proc->log() << dec->log() << g->log();
  const double rereg_s = seconds_since(t_up);
  EXPECT_EQ(dec->pid(), dec_pid);
  EXPECT_EQ(g->pid(), g_pid);
  EXPECT_TRUE(dec->running());
  EXPECT_TRUE(g->running());
  EXPECT_TRUE(h::file_contains(dec->log_path(), "re-registered as 'd0'")) << dec->log();
  EXPECT_TRUE(h::file_contains(g->log_path(), "group 'g0' re-registered")) << g->log();
  const auto s = h::Client(port).status();
  ASSERT_EQ(s.groups_size(), 1);
  EXPECT_EQ(s.groups(0).name(), "g0");
  ASSERT_EQ(s.decoders_size(), 1);
  EXPECT_EQ(s.decoders(0).name(), "d0");
  std::printf(
      "[ figures ] coordinator kill -9, down 3 s, restarted: decoder and worker group "
      "re-registered %.2f s after it came back\n",
      rereg_s);
  expect_good_job(port, "a coordinator restart (same group, same decoder)");
  expect_good_job(port, "a coordinator restart, second job");
}

TEST(Faults, CoordinatorGoneForGoodEndsPeersWithAMessage) {
  const std::string dir = h::make_dir("gone");
  auto co =
      std::make_unique<h::Coordinator>(dir, std::vector<std::string>{"--heartbeat-ms", "200"});
  auto dec = h::start_decoder(dir, co->addr(), kModel, "d0", "", {"--reconnect-s", "2"});
  auto g = h::start_workers(dir, co->addr(), kModel, 1, "g0", "", {"--reconnect-s", "2"});
  ASSERT_TRUE(h::wait_registered(co->port, "", 1, 1, 120000)) << co->proc->log();
  co->proc->signal_group(SIGKILL);
  int st = -1;
  ASSERT_TRUE(co->proc->wait_exit(5000, &st));
  const auto t_kill = Clock::now();
  int ds = -1, gs = -1;
  ASSERT_TRUE(dec->wait_exit(20000, &ds)) << "decoder still running: " << dec->log();
  ASSERT_TRUE(g->wait_exit(30000, &gs)) << "worker group still running: " << g->log();
  const double gone_s = seconds_since(t_kill);
  EXPECT_EQ(ds, 1) << dec->log();
  EXPECT_NE(gs, 0) << g->log();
  EXPECT_TRUE(h::file_contains(dec->log_path(), "did not come back within 2 s")) << dec->log();
  EXPECT_TRUE(h::file_contains(g->log_path(), "did not come back within 2 s")) << g->log();
  std::printf(
      "[ figures ] coordinator gone for good: decoder exit %d, worker group exit %d, "
      "%.1f s after the kill (--reconnect-s 2)\n",
      ds, gs, gone_s);
}

TEST(Faults, ClientDisconnectDoesNotLeakItsJobs) {
  const std::string dir = h::make_dir("disconnect");
  h::Coordinator co(dir, {"--heartbeat-ms", "200"});
  auto dec = h::start_decoder(dir, co.addr(), kModel, "d0", "");
  auto g = h::start_workers(dir, co.addr(), kModel, 2, "g0", "");
  ASSERT_TRUE(h::wait_registered(co.port, "", 1, 1, 120000)) << co.proc->log();
  uint64_t running = 0, queued = 0;
  {
    h::Client c(co.port);
    running = start_long_job(c, "", 1);
    v1::JobAccepted acc;
    v1::Error err;
    ASSERT_TRUE(c.submit(h::tiny_job(kLongPrompt, 1), &acc, &err)) << err.message();
    queued = acc.job_id();
    c.close();  // gone without a CancelJob
  }
  // Both jobs end as CANCELLED, the group and the decoder are free again.
  ASSERT_TRUE(h::wait_status(
      co.port, "", 60000,
      [&](const v1::StatusReply& s) {
        int cancelled = 0;
        for (const auto& j : s.jobs())
          if ((j.job_id() == running || j.job_id() == queued) && j.state() == v1::CANCELLED)
            ++cancelled;
        return cancelled == 2 && s.groups_size() == 1 && !s.groups(0).busy() &&
               s.decoders_size() == 1 && s.decoders(0).active_jobs() == 0;
      }))
      << co.proc->log() << g->log();
  EXPECT_NE(job_status(co.port, running).error().find("client disconnected"), std::string::npos);
  expect_good_job(co.port, "a client that disconnected");
}

// Issue 17 rough edge: a decoder signalled while it registers (here with a coordinator
// port that accepts TCP but never answers) stops at once and exits 0; before, it sat in
// the hello for its whole 10 s I/O timeout and was killed.
TEST(Faults, DecoderStopsAtOnceWhileRegistering) {
  const std::string dir = h::make_dir("dec-stop");
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(fd, 8), 0);  // never accept(): the kernel completes the connect
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len), 0);
  const std::string addr = "127.0.0.1:" + std::to_string(ntohs(a.sin_port));
  auto dec = h::start_decoder(dir, addr, kModel, "d-stop", "");
  // In the hello: model loaded, connected, waiting for an answer that never comes. (A fixed
  // 1.5 s sleep was too short under ASan in CI.)
  ASSERT_TRUE(dec->wait_log("registering with " + addr, 60000)) << dec->log();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  ASSERT_TRUE(dec->running()) << dec->log();
  const auto t0 = Clock::now();
  dec->signal_group(SIGTERM);
  int status = -1;
  ASSERT_TRUE(dec->wait_exit(5000, &status)) << dec->log();
  const double s = seconds_since(t0);
  ::close(fd);
  EXPECT_EQ(status, 0) << dec->log();
  EXPECT_LT(s, 1.0) << dec->log();
  EXPECT_EQ(dec->log().find("error"), std::string::npos) << dec->log();
}

// Issue 17 rough edge: `mprefill run` ends within 1 s of printing the result, exit 0, with
// no re-registration (it stops the decoder and the ranks while its coordinator still
// serves; mpirun exits 0 with its ranks). Before: ~7 s, "re-registering ... within 60 s".
TEST(Faults, RunExitsPromptlyAfterTheResult) {
  const std::string dir = h::make_dir("run-exit");
  h::Proc run({h::bin("mprefill"), "run", "--model", kModel, "--prompt-ids", "5,6,7,8", "--decode",
               "2", "--json", "--mpirun", MPREFILL_MPIEXEC},
              dir + "/run.log");
  Clock::time_point t_result{};
  const auto until = Clock::now() + std::chrono::seconds(120);
  while (Clock::now() < until && t_result == Clock::time_point{}) {
    if (run.log().find("\"status\":\"DONE\"") != std::string::npos) t_result = Clock::now();
    if (!run.running()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_NE(t_result, Clock::time_point{}) << run.log();
  int status = -1;
  ASSERT_TRUE(run.wait_exit(10000, &status)) << run.log();
  const double s = seconds_since(t_result);
  EXPECT_EQ(status, 0) << run.log();
  EXPECT_LT(s, 1.0) << run.log();
  EXPECT_EQ(run.log().find("re-registering"), std::string::npos) << run.log();
  EXPECT_EQ(run.log().find("error"), std::string::npos) << run.log();
}
