// A service strangers can share (issue 17), against the real binaries over 127.0.0.1:
//   Roles       a client key is not an infrastructure credential (finding 1); clients
//               refuse a server that does not ask for, or cannot prove, their key
//               (finding 7); keys reload and revoke without a restart.
//   Ownership   status and cancel see only the caller's jobs, admin all; per-client
//               limits answered with RESOURCE_EXHAUSTED naming the limit (finding 6).
//   PreHello    300 silent sockets do not lock clients out; refusal log <= 1 line/s
//               (finding 4).
//   HalfSent    8 half-sent 60 MiB frames hold bounded memory (finding 5).
//   TextFlood   64 MiB and 7 MiB texts, over and over (finding 5).
//   Roles.ForgedInfrastructureDuringJobs  forged worker groups / decoders (finding 1).
// Legitimate jobs run during each attack. Figures are printed as "[ figures ]".
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include "tests/hardening/harness.h"
#include "tests/testutil.h"

namespace h = mprefill::hardening;
namespace v1 = ::mprefill::v1;
namespace wire = ::mprefill::wire;
using Clock = std::chrono::steady_clock;

namespace {

const char* kModel = "random:tiny:7";

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

double ms_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

int count_lines(const std::string& text, const std::vector<std::string>& needles) {
  std::istringstream in(text);
  std::string line;
  int n = 0;
  while (std::getline(in, line))
    for (const auto& k : needles)
      if (line.find(k) != std::string::npos) {
        ++n;
        break;
      }
  return n;
}

// Credentials of one test: the infrastructure secret and three client keys.
struct Keys {
  std::string dir, infra, infra_file, keys_file;
  std::map<std::string, std::string> secret;  // name -> secret
  explicit Keys(const std::string& d) : dir(d) {
    const std::string tag = std::to_string(::getpid());
    infra = "infra-secret-" + tag + "-0123456789";
    infra_file = dir + "/infra.secret";
    h::write_file(infra_file, infra + "\n");
    for (const char* n : {"alice", "bob", "root"})
      secret[n] = std::string(n) + "-key-" + tag + "-abcdefghij";
    keys_file = dir + "/client.keys";
    write_keys({"alice", "bob", "root"});
  }
  void write_keys(const std::vector<std::string>& names) {
    std::string text = "# NAME SECRET [client|admin]\n";
    for (const auto& n : names) text += n + " " + secret.at(n) + (n == "root" ? " admin\n" : "\n");
    const std::string tmp = keys_file + ".tmp";
    h::write_file(tmp, text);
    ASSERT_EQ(std::rename(tmp.c_str(), keys_file.c_str()), 0);
  }
  std::string key_file(const std::string& n) {
    const std::string f = dir + "/" + n + ".key";
    h::write_file(f, n + " " + secret.at(n) + "\n");
    return f;
  }
  std::vector<std::string> args() const {
    return {"--secret-file", infra_file, "--client-keys", keys_file, "--heartbeat-ms", "200"};
  }
  h::Client client(uint16_t port, const std::string& n) {
    return h::Client(port, secret.at(n), "test-" + n, n);
  }
};

bool wait_keyed(Keys& k, uint16_t port, int groups, int decoders, int timeout_ms) {
  const auto end = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (Clock::now() < end) {
    try {
      auto c = k.client(port, "root");
      auto r = c.status(0, 2000);
      if (r.groups_size() >= groups && r.decoders_size() >= decoders) return true;
    } catch (const std::exception&) {
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  return false;
}

// A server that answers like a coordinator without knowing any key: ServerHello with
// auth_required as given, HelloAccepted with a made-up server proof, and a forged DONE
// result for any SubmitJob (what an impostor would print as the "answer").
class Impostor {
 public:
  explicit Impostor(bool ask_auth) : ask_auth_(ask_auth) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(a);
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&a), len) != 0 || ::listen(fd_, 16) != 0 ||
        ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len) != 0)
      throw std::runtime_error("impostor: cannot listen");
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] { serve(); });
  }
  ~Impostor() {
    stop_ = true;
    thread_.join();
    ::close(fd_);
  }
  std::string addr() const { return "127.0.0.1:" + std::to_string(port_); }
  int prompts() const { return prompts_; }

 private:
  void serve() {
    while (!stop_) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      int c = ::accept(fd_, nullptr, nullptr);
      if (c < 0) continue;
      timeval tv{0, 200 * 1000};
      ::setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
      handle(c);
      ::close(c);
    }
  }
  void put(int c, const v1::Envelope& e) {
    const std::string f = wire::encode_frame(e);
    (void)!::send(c, f.data(), f.size(), MSG_NOSIGNAL);
  }
  void handle(int c) {
    put(c, wire::make_server_hello(wire::random_nonce(), ask_auth_));
    wire::FrameParser parser;
    const auto end = Clock::now() + std::chrono::seconds(15);
    char buf[4096];
    while (!stop_ && Clock::now() < end) {
      v1::Envelope env;
      std::string err;
      auto r = parser.next(&env, &err);
      if (r == wire::FrameParser::Result::kError) return;
      if (r == wire::FrameParser::Result::kNeedMore) {
        ssize_t n = ::recv(c, buf, sizeof(buf), 0);
        if (n == 0) return;
        if (n > 0) parser.feed(buf, static_cast<size_t>(n));
        continue;
      }
      v1::Envelope out;
      out.set_version(wire::kProtocolVersion);
      if (env.has_client_hello()) {
        out.mutable_hello_accepted()->set_server("mprefill-coordinator");
        if (ask_auth_) out.mutable_hello_accepted()->set_server_proof(std::string(32, 'x'));
        put(c, out);
      } else if (env.has_submit()) {
        ++prompts_;
        out.mutable_accepted()->set_job_id(1);
        put(c, out);
        v1::Envelope res;
        res.set_version(wire::kProtocolVersion);
        res.mutable_result()->set_job_id(1);
        res.mutable_result()->set_state(v1::DONE);
        res.mutable_result()->add_generated_ids(777013);  // > 65535: no port number
        put(c, res);
      }
    }
  }
  bool ask_auth_;
  int fd_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> prompts_{0};
  std::thread thread_;
};

// One job on a fresh connection: its wall time in ms, or -1 (*why set).
// key_id / secret: a client key of --client-keys (empty: an open service).
double timed_job(uint16_t port, int seed, std::string* why, const std::string& secret = "",
                 const std::string& key_id = "") {
  const auto t0 = Clock::now();
  try {
    h::Client c(port, secret, "legit-" + std::to_string(seed), key_id);
    auto job = h::tiny_job(48, 4);
    job.mutable_options()->mutable_sampling()->set_seed(static_cast<uint64_t>(seed));
    v1::JobAccepted acc;
    v1::Error err;
    if (!c.submit(job, &acc, &err, 30000)) {
      *why = "refused: " + err.message();
      return -1;
    }
    v1::JobResult res;
    if (!c.wait_result(acc.job_id(), &res, &err, 60000) || res.state() != v1::DONE) {
      *why = "not DONE: " + err.message();
      return -1;
    }
  } catch (const std::exception& e) {
    *why = e.what();
    return -1;
  }
  return ms_since(t0);
}

// One worker group and one decoder on random:tiny; with keys, the infrastructure secret
// and client keys (legitimate jobs then run as alice).
struct OpenService {
  std::string dir, secret, key_id;
  std::unique_ptr<h::Coordinator> co;
  std::unique_ptr<h::Proc> dec, wrk;
  OpenService(const std::string& tag, std::vector<std::string> extra, Keys* keys = nullptr) {
    dir = keys ? keys->dir : h::make_dir(tag);
    extra.insert(extra.end(), {"--heartbeat-ms", "200"});
    if (keys) {
      extra.insert(extra.end(),
                   {"--secret-file", keys->infra_file, "--client-keys", keys->keys_file});
      secret = keys->secret.at("alice");
      key_id = "alice";
    }
    const std::string infra = keys ? keys->infra_file : "";
    co = std::make_unique<h::Coordinator>(dir, extra);
    dec = h::start_decoder(dir, co->addr(), kModel, "d0", infra);
    wrk = h::start_workers(dir, co->addr(), kModel, 1, "g0", infra);
    const bool up = keys ? wait_keyed(*keys, co->port, 1, 1, 120000)
                         : h::wait_registered(co->port, "", 1, 1, 120000);
    if (!up) throw std::runtime_error("service did not come up: " + co->proc->log());
  }
  double job(int seed, std::string* why) { return timed_job(co->port, seed, why, secret, key_id); }
  // The slowest of n unattacked jobs (after one warm-up).
  double baseline_ms(int n) {
    std::string why;
    EXPECT_GE(job(999, &why), 0) << why;
    double worst = 0;
    for (int i = 0; i < n; ++i) {
      const double ms = job(1000 + i, &why);
      EXPECT_GE(ms, 0) << why;
      worst = std::max(worst, ms);
    }
    return worst;
  }
};

}  // namespace

// Finding 1: with one shared secret a client registered a fake worker group and received
// another user's prompt. Now a client key proves nothing for worker groups or decoders,
// the infrastructure secret nothing for clients, and a proof is bound to its role.
TEST(Roles, ClientKeyCannotActAsInfrastructure) {
  const std::string dir = h::make_dir("roles");
  Keys k(dir);
  h::Coordinator co(dir, k.args());
  const std::string& alice = k.secret.at("alice");
  for (v1::Role role : {v1::WORKER, v1::DECODER}) {
    const std::string r = v1::Role_Name(role);
    std::string why;
    {
      h::RawPeer p(co.port);  // alice's key, named
      EXPECT_FALSE(p.hello(role, "fake", alice, &why, wire::kProtocolVersion, "alice")) << r;
      EXPECT_NE(why.find("UNAUTHENTICATED"), std::string::npos) << r << ": " << why;
    }
    {
      h::RawPeer p(co.port);  // alice's key as if it were the shared secret
      EXPECT_FALSE(p.hello(role, "fake", alice, &why)) << r;
      EXPECT_NE(why.find("UNAUTHENTICATED"), std::string::npos) << r << ": " << why;
    }
  }
  {  // The infrastructure secret is not a client key.
    h::RawPeer p(co.port);
    std::string why;
    EXPECT_FALSE(p.hello(v1::CLIENT, "c", k.infra, &why));
    EXPECT_NE(why.find("client key"), std::string::npos) << why;
  }
  {  // alice's valid CLIENT proof, relabelled WORKER on the same connection: refused.
    h::RawPeer p(co.port);
    v1::Envelope sh;
    ASSERT_EQ(p.next(&sh, 5000), h::RawPeer::Got::kFrame);
    v1::Envelope e;
    e.set_version(wire::kProtocolVersion);
    auto* ch = e.mutable_client_hello();
    ch->set_version(wire::kProtocolVersion);
    ch->set_role(v1::CLIENT);
    ch->set_key_id("alice");
    ch->set_client_nonce(wire::random_nonce());
    ch->set_proof(wire::hello_proof(alice, wire::binding_of(*ch, sh.server_hello().nonce())));
    ch->set_role(v1::WORKER);
    p.send(e);
    v1::Error err;
    ASSERT_TRUE(p.next_error(&err, 5000));
    EXPECT_EQ(err.code(), v1::UNAUTHENTICATED) << err.message();
  }
  {  // The keys work for their own role, and the server proves it holds them.
    auto a = k.client(co.port, "alice");
    EXPECT_EQ(a.conn().identity(), "alice");
    EXPECT_FALSE(a.conn().admin());
    auto root = k.client(co.port, "root");
    EXPECT_TRUE(root.conn().admin());
    EXPECT_EQ(root.status(0, 5000).jobs_size(), 0);
  }
  // The real worker binary with alice's secret as its secret file: refused, exits.
  const std::string alice_only = dir + "/alice-as-infra.secret";
  h::write_file(alice_only, alice + "\n");
  auto fake = h::start_workers(dir, co.addr(), kModel, 1, "fake", alice_only);
  int st = 0;
  ASSERT_TRUE(fake->wait_exit(90000, &st)) << "a worker group with a client key kept running";
  EXPECT_NE(st, 0);
  EXPECT_EQ(k.client(co.port, "root").status(0, 5000).groups_size(), 0);
  EXPECT_NE(co.proc->log().find("hello refused"), std::string::npos);
  // No key in any log.
  for (const auto& [n, s] : k.secret) EXPECT_EQ(co.proc->log().find(s), std::string::npos) << n;
}

// Keys are re-read on change: a removed key is cut off (its open connection closed), an
// added key works, all without a restart.
TEST(Roles, ClientKeysReloadAndRevokeWithoutRestart) {
  const std::string dir = h::make_dir("revoke");
  Keys k(dir);
  h::Coordinator co(dir, k.args());
  auto bob = k.client(co.port, "bob");
  EXPECT_EQ(bob.status(0, 5000).jobs_size(), 0);
  k.secret["carol"] = "carol-key-" + std::to_string(::getpid()) + "-klmnopqrst";
  k.write_keys({"alice", "root", "carol"});  // bob removed, carol added
  // bob's open connection gets UNAUTHENTICATED and is closed within ~1 s (mtime check).
  v1::Envelope env;
  bool revoked = false;
  const auto t0 = Clock::now();
  while (ms_since(t0) < 5000 && !revoked) {
    try {
      if (bob.conn().recv(&env, 500) && env.has_error())
        revoked = env.error().code() == v1::UNAUTHENTICATED;
    } catch (const wire::WireError&) {
      break;
    }
  }
  EXPECT_TRUE(revoked) << co.proc->log();
  EXPECT_THROW(k.client(co.port, "bob"), wire::WireError);
  EXPECT_EQ(k.client(co.port, "carol").status(0, 5000).jobs_size(), 0);
  EXPECT_NE(co.proc->log().find("client keys reloaded"), std::string::npos);
}

// Finding 7: the CLI (and the Python client), given a credential, sent the prompt to an
// impostor that answered auth_required=false and printed the forged result, exit 0.
TEST(Roles, ClientsRefuseAServerThatDoesNotProveTheKey) {
  const std::string dir = h::make_dir("impostor");
  Keys k(dir);
  const std::string py = "/usr/bin/python3";
  std::string probe;
  const bool have_py =
      mprefill::test::run_command(py + " -c 'import google.protobuf' 2>&1", &probe) == 0;
  for (bool ask_auth : {false, true}) {
    Impostor imp(ask_auth);
    std::vector<std::string> cmds = {
        h::bin("mprefill") + " submit --coordinator " + imp.addr() + " --key-file " +
            quote(k.key_file("alice")) + " --prompt-ids 5,6,7 --decode 2",
        h::bin("mprefill") + " submit --coordinator " + imp.addr() + " --secret-file " +
            quote(k.infra_file) + " --prompt-ids 5,6,7 --decode 2"};
    if (have_py)
      cmds.push_back(py + " " + mprefill::test::source_dir() +
                     "/python/mprefill_client.py --coordinator " + imp.addr() + " --key-file " +
                     quote(k.key_file("alice")) + " --prompt-ids 5,6,7 --decode 2");
    for (const auto& cmd : cmds) {
      std::string out;
      const int rc = mprefill::test::run_command(cmd + " 2>&1", &out);
      EXPECT_NE(rc, 0) << cmd << "\n" << out;
      EXPECT_EQ(count_lines(out, {"error"}), 1) << out;
      EXPECT_NE(out.find(ask_auth ? "did not prove" : "does not ask for authentication"),
                std::string::npos)
          << out;
      EXPECT_EQ(out.find("777013"), std::string::npos) << "forged result printed: " << out;
    }
    EXPECT_EQ(imp.prompts(), 0) << "a prompt went to the impostor";
  }
  if (!have_py) std::printf("[ figures ] python3 without google.protobuf: Python client not run\n");
}

// Finding 6: every client saw every job and any client cancelled another's running job.
TEST(Ownership, ClientsSeeAndCancelOnlyTheirOwnJobs) {
  const std::string dir = h::make_dir("owner");
  Keys k(dir);
  auto args = k.args();
  args.insert(args.end(), {"--client-max-jobs", "2", "--client-max-queued-tokens", "100",
                           "--heartbeat-timeout-ms", "120000"});
  h::Coordinator co(dir, args);
  auto dec = h::start_decoder(dir, co.addr(), kModel, "d0", k.infra_file);
  auto wrk = h::start_workers(dir, co.addr(), kModel, 1, "g0", k.infra_file);
  ASSERT_TRUE(wait_keyed(k, co.port, 1, 1, 120000)) << co.proc->log() << wrk->log();
  // The group stops: alice's first job stays RUNNING, later ones QUEUED.
  // Every process of the group is stopped before the first submit (an asan run once saw
  // job 1 DONE here: a late stop let the group finish it).
  ASSERT_TRUE(wrk->freeze(true)) << "the worker group did not stop";
  auto a1 = k.client(co.port, "alice"), a2 = k.client(co.port, "alice");
  auto b = k.client(co.port, "bob");
  auto root = k.client(co.port, "root");
  v1::JobAccepted j1, j2, j4;
  v1::Error err;
  ASSERT_TRUE(a1.submit(h::tiny_job(64, 2), &j1, &err)) << err.message();
  const auto t0 = Clock::now();
  while (a1.status(j1.job_id()).jobs(0).state() != v1::RUNNING && ms_since(t0) < 10000)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ASSERT_TRUE(a2.submit(h::tiny_job(64, 2), &j2, &err)) << err.message();  // 2nd connection
  // alice: two unfinished jobs over her two connections: the limit names itself.
  v1::JobAccepted no;
  EXPECT_FALSE(a2.submit(h::tiny_job(8, 2), &no, &err));
  EXPECT_EQ(err.code(), v1::RESOURCE_EXHAUSTED);
  EXPECT_NE(err.message().find("--client-max-jobs 2"), std::string::npos) << err.message();
  // bob has his own budget: 64 queued tokens fit, 64 + 50 do not.
  ASSERT_TRUE(b.submit(h::tiny_job(64, 2), &j4, &err)) << err.message();
  EXPECT_FALSE(b.submit(h::tiny_job(50, 2), &no, &err));
  EXPECT_EQ(err.code(), v1::RESOURCE_EXHAUSTED);
  EXPECT_NE(err.message().find("--client-max-queued-tokens 100"), std::string::npos)
      << err.message();
  // bob sees, and cancels, only his own jobs; alice's look like jobs that do not exist.
  auto bs = b.status(0);
  ASSERT_EQ(bs.jobs_size(), 1);
  EXPECT_EQ(bs.jobs(0).job_id(), j4.job_id());
  for (uint64_t id : {j1.job_id(), j2.job_id()}) {
    v1::Envelope e;
    e.set_version(wire::kProtocolVersion);
    e.mutable_status_request()->set_job_id(id);
    b.conn().send(e, 5000);
    v1::Envelope ans;
    ASSERT_TRUE(b.conn().recv(&ans, 5000));
    ASSERT_TRUE(ans.has_error()) << ans.ShortDebugString();
    EXPECT_EQ(ans.error().code(), v1::NOT_FOUND);
    v1::Envelope c;
    c.set_version(wire::kProtocolVersion);
    c.mutable_cancel()->set_job_id(id);
    b.conn().send(c, 5000);
    ASSERT_TRUE(b.conn().recv(&ans, 5000));
    ASSERT_TRUE(ans.has_error()) << ans.ShortDebugString();
    EXPECT_EQ(ans.error().code(), v1::NOT_FOUND);
    EXPECT_EQ(ans.error().message(), "no job " + std::to_string(id));
  }
  EXPECT_EQ(a1.status(j1.job_id()).jobs(0).state(), v1::RUNNING);
  EXPECT_EQ(a1.status(0).jobs_size(), 2);  // both of alice's, from either connection
  // The admin sees all three and may cancel bob's.
  EXPECT_EQ(root.status(0).jobs_size(), 3);
  v1::Envelope c;
  c.set_version(wire::kProtocolVersion);
  c.mutable_cancel()->set_job_id(j4.job_id());
  root.conn().send(c, 5000);
  v1::Envelope ans;
  ASSERT_TRUE(root.conn().recv(&ans, 5000));
  ASSERT_TRUE(ans.has_status_reply()) << ans.ShortDebugString();
  EXPECT_EQ(ans.status_reply().jobs(0).state(), v1::CANCELLED);
  ASSERT_TRUE(wrk->freeze(false)) << "the worker group did not resume";
  v1::JobResult r1, r2;
  ASSERT_TRUE(a1.wait_result(j1.job_id(), &r1, &err, 60000)) << err.message();
  ASSERT_TRUE(a2.wait_result(j2.job_id(), &r2, &err, 60000)) << err.message();
  EXPECT_EQ(r1.state(), v1::DONE);
  EXPECT_EQ(r2.state(), v1::DONE);
  const std::string log = co.proc->log();
  EXPECT_NE(log.find("accepted from client 'alice'"), std::string::npos) << log;
  EXPECT_NE(log.find("accepted from client 'bob'"), std::string::npos) << log;
  EXPECT_NE(log.find("(client 'bob') refused"), std::string::npos) << log;
}

// Legitimate jobs during an attack: n jobs, figures, and the checks every attack shares
// (>= 95% DONE within the unattacked time + 1 s, RSS <= 2x the baseline or rss_cap_kb,
// refusal log <= 1 line/s).
struct UnderAttack {
  OpenService& s;
  double base;
  long rss_base;
  size_t log_before;
  Clock::time_point t0 = Clock::now();
  UnderAttack(OpenService& svc, double b)
      : s(svc),
        base(b),
        rss_base(h::rss_kb(svc.co->proc->pid())),
        log_before(svc.co->proc->log().size()) {}
  // hold_ms: the attack goes on (the caller's threads or flood) until then from t0, before
  // the log is read (e.g. two hello deadlines, so that every silent socket timed out).
  void run_jobs(const char* what, int n, int seed, long rss_cap_kb = 0, double hold_ms = 0) {
    int ok = 0, in_time = 0;
    std::string why, last_why;
    for (int i = 0; i < n; ++i) {
      const double ms = s.job(seed + i, &why);
      ok += ms >= 0;
      in_time += ms >= 0 && ms <= base + 1000;
      if (ms < 0) last_why = why;
    }
    const long rss = h::rss_kb(s.co->proc->pid());
    while (ms_since(t0) < hold_ms) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const double attack_s = ms_since(t0) / 1000.0;
    const std::string log = s.co->proc->log().substr(log_before);
    const int lines = count_lines(
        log, {"ClientHello", "pre-hello", "refused", "bad frame", "closing", "exceeds"});
    std::printf(
        "[ figures ] %s: jobs DONE %d/%d, within unattacked %.0f ms + 1 s: %d; coordinator RSS "
        "%ld -> %ld KiB; refusal log lines %d over %.1f s\n",
        what, ok, n, base, in_time, rss_base, rss, lines, attack_s);
    EXPECT_GE(in_time, n * 95 / 100) << what << ": " << last_why;
    EXPECT_LE(rss, rss_cap_kb > 0 ? rss_cap_kb : 2 * rss_base) << what;
    EXPECT_LE(lines, static_cast<int>(attack_s) + 2) << what << ":\n" << log;
  }
};

// Finding 4: connections that never say hello filled --max-connections (1 of 72 jobs got
// in during a 15 s slowloris) and wrote a log line each. 300 silent sockets, each reopened
// as soon as the server closes it, held for 8 s (two hello deadlines); authenticated peers
// stay registered.
TEST(PreHello, SilentSocketsDoNotLockOutClients) {
  OpenService s("prehello", {});
  const double base = s.baseline_ms(4);
  UnderAttack u(s, base);
  h::SilentFlood flood(s.co->port, 300);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  u.run_jobs("300 silent sockets", 20, 0, 0, 8000);
  flood.stop();
  std::printf("[ figures ] silent sockets opened %d\n", flood.opened());
  EXPECT_GT(flood.opened(), 300) << "the server closed none of the silent sockets";
  EXPECT_TRUE(s.co->proc->running());
  EXPECT_TRUE(h::wait_registered(s.co->port, "", 1, 1, 5000));
}

// The pre-hello pool is its own, small: over --max-pre-hello the oldest silent connection
// is closed for a new one, so a client that says hello promptly still gets in.
TEST(PreHello, FullPoolClosesTheOldestNotTheNewClient) {
  OpenService s("prehello-pool", {"--max-pre-hello", "32", "--hello-timeout-ms", "20000"});
  std::vector<int> fds;
  for (int i = 0; i < 300; ++i) fds.push_back(h::connect_nonblocking(s.co->port));
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  int ok = 0;
  std::string why;
  for (int i = 0; i < 10; ++i) ok += timed_job(s.co->port, i, &why) >= 0;
  EXPECT_EQ(ok, 10) << why;
  int closed = 0;  // the server closed all but the newest 32 of them
  char buf[4096];
  for (int fd : fds) {
    ssize_t n;
    do n = ::recv(fd, buf, sizeof(buf), 0);
    while (n > 0);
    closed += n == 0;
    ::close(fd);
  }
  std::printf("[ figures ] 300 silent sockets, --max-pre-hello 32: %d closed by the server\n",
              closed);
  EXPECT_GE(closed, 300 - 32);
}

// Finding 5 (rest): 8 half-sent 60 MiB frames held 572 MB for 30 s. A client frame over
// --max-client-frame (8 MiB) is refused at its length prefix; 8 half-sent frames just under
// it hold at most the large-frame budget (--max-large-frame-bytes, 16 MiB) plus a small
// buffer per waiting connection.
struct HalfSentFigures {
  int closed = 0, ok = 0, in_time = 0;
  long rss0 = 0, rss1 = 0;
  size_t sent_mib = 0;
};

HalfSentFigures half_sent_attack(OpenService& s, double base, size_t frame, int seed) {
  HalfSentFigures f;
  f.rss0 = h::rss_kb(s.co->proc->pid());
  const size_t half = frame / 2, piece = size_t{1} << 20;
  std::atomic<size_t> sent{0};
  std::vector<std::unique_ptr<h::RawPeer>> peers;
  std::vector<std::thread> senders;
  for (int i = 0; i < 8; ++i) {
    peers.push_back(std::make_unique<h::RawPeer>(s.co->port));
    std::string why;
    EXPECT_TRUE(peers.back()->hello(v1::CLIENT, "half-" + std::to_string(i), "", &why)) << why;
  }
  for (int i = 0; i < 8; ++i)
    senders.emplace_back([&, i] {
      // Blocking sends of the header and half the body in 1 MiB pieces; what the server
      // does not read stays in the socket buffers, a closed connection ends the sends.
      std::string head(4, '\0');
      const uint32_t len = static_cast<uint32_t>(frame - 4);
      for (int b = 0; b < 4; ++b) head[b] = static_cast<char>((len >> (8 * b)) & 0xff);
      peers[i]->send_bytes(head);
      for (size_t done = 0; done < half; done += piece) {
        peers[i]->send_bytes(std::string(std::min(piece, half - done), '\x0a'));
        sent += std::min(piece, half - done);
      }
    });
  std::this_thread::sleep_for(std::chrono::seconds(3));
  std::string why;
  for (int i = 0; i < 5; ++i) {
    const double ms = timed_job(s.co->port, seed + i, &why);
    f.ok += ms >= 0;
    f.in_time += ms >= 0 && ms <= base + 1000;
  }
  f.rss1 = h::rss_kb(s.co->proc->pid());
  EXPECT_EQ(f.in_time, 5) << why;
  for (auto& p : peers) f.closed += p->closed_within(200);
  for (auto& p : peers) p->shutdown();  // wakes the blocked senders
  for (auto& t : senders) t.join();
  f.sent_mib = sent.load() >> 20;
  std::printf(
      "[ figures ] 8 half-sent %zu MiB frames: closed by the server %d/8, coordinator RSS %ld "
      "-> %ld KiB; jobs DONE %d/5 (%d within %.0f ms + 1 s)\n",
      frame >> 20, f.closed, f.rss0, f.rss1, f.ok, f.in_time, base);
  return f;
}

TEST(HalfSent, LargeFramesHoldBoundedMemory) {
  OpenService s("halfsent", {});
  const double base = s.baseline_ms(3);
  const long rss_base = h::rss_kb(s.co->proc->pid());
  // The attack: refused at the prefix (8 MiB client limit), nothing held.
  const HalfSentFigures over = half_sent_attack(s, base, size_t{60} << 20, 50);
  EXPECT_EQ(over.closed, 8) << "a 60 MiB client frame was not refused at its prefix";
  EXPECT_LE(over.rss1, 2 * rss_base) << "issue 17: <= 2x the baseline";
  // Just under the limit: parsed only once granted; the budget bounds what is held.
  const HalfSentFigures under = half_sent_attack(s, base, (size_t{8} << 20) - 4096, 60);
  EXPECT_EQ(under.closed, 0) << "frames under the client limit are legal until their deadline";
  EXPECT_LE(under.rss1 - rss_base, 16 * 1024 + 8 * 512)
      << "RSS " << rss_base << " -> " << under.rss1;
  EXPECT_TRUE(s.co->proc->running());
}

// Finding 1 under load: forged worker groups and decoders (a client key, or no key) hello
// over and over from 4 threads while alice's jobs run; none registers.
TEST(Roles, ForgedInfrastructureDuringJobs) {
  Keys k(h::make_dir("forged"));
  OpenService s("forged", {}, &k);
  const double base = s.baseline_ms(4);
  UnderAttack u(s, base);
  const std::string alice = k.secret.at("alice");
  std::atomic<bool> stop{false};
  std::atomic<int> tries{0}, registered{0};
  std::vector<std::thread> forgers;
  for (int t = 0; t < 4; ++t)
    forgers.emplace_back([&, t] {
      const v1::Role role = t % 2 ? v1::WORKER : v1::DECODER;
      while (!stop) {
        try {
          h::RawPeer p(s.co->port);
          std::string why;
          const bool ok =
              t < 2 ? p.hello(role, "forged", alice, &why, wire::kProtocolVersion, "alice")
                    : p.hello(role, "forged", "", &why);
          ++tries;
          registered += ok;
        } catch (const std::exception&) {
          ++tries;  // refused at connect (a full pool): still an attempt
        }
      }
    });
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  u.run_jobs("forged worker groups and decoders", 20, 200);
  while (ms_since(u.t0) < 5000) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  stop = true;
  for (auto& t : forgers) t.join();
  std::printf("[ figures ] forged infrastructure hellos %d, registered %d\n", tries.load(),
              registered.load());
  EXPECT_GT(tries.load(), 100);
  EXPECT_EQ(registered.load(), 0);
  const v1::StatusReply st = k.client(s.co->port, "root").status(0, 5000);
  EXPECT_EQ(st.groups_size(), 1);
  EXPECT_EQ(st.decoders_size(), 1);
}

// Finding 5 under load: texts sent over and over from 4 threads while jobs run. 64 MiB
// (over the client frame limit): refused at the length prefix, nothing held; 7 MiB (under
// it): read once granted, refused by --max-prompt-bytes before tokenizing, the large-frame
// budget (16 MiB, twice a frame) bounds what is held.
TEST(TextFlood, HugeTextsDuringJobs) {
  OpenService s("textflood", {});
  const double base = s.baseline_ms(4);
  for (const size_t mib : {64, 7}) {
    v1::Envelope e;
    e.set_version(wire::kProtocolVersion);
    e.mutable_submit()->set_text(std::string(mib << 20, 'a'));
    const std::string frame = wire::encode_frame(e);
    const v1::ErrorCode want = mib == 64 ? v1::BAD_FRAME : v1::INVALID_ARGUMENT;
    UnderAttack u(s, base);
    std::atomic<bool> stop{false};
    std::atomic<int> sent{0}, answered{0};
    std::vector<std::thread> senders;
    for (int t = 0; t < 4; ++t)
      senders.emplace_back([&, t] {
        while (!stop) {
          try {
            h::RawPeer p(s.co->port);
            std::string why;
            if (!p.hello(v1::CLIENT, "flood-" + std::to_string(t), "", &why)) continue;
            p.send_bytes(frame);
            ++sent;
            v1::Error err;
            answered += p.next_error(&err, 10000) && err.code() == want;
          } catch (const std::exception&) {
          }
        }
      });
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    const std::string what = std::to_string(mib) + " MiB texts";
    u.run_jobs(what.c_str(), 20, 300 + static_cast<int>(mib),
               mib == 64 ? 0 : u.rss_base + 16 * 1024 + 8 * 1024);
    while (ms_since(u.t0) < 4000) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    stop = true;
    for (auto& t : senders) t.join();
    std::printf("[ figures ] %s: %d submissions, answered with %s %d\n", what.c_str(), sent.load(),
                v1::ErrorCode_Name(want).c_str(), answered.load());
    EXPECT_GT(sent.load(), 8) << what;
    EXPECT_GE(answered.load(), sent.load() * 9 / 10) << what;
  }
  EXPECT_TRUE(s.co->proc->running());
}

namespace {

int metrics_port_of(const std::string& dir) {
  std::istringstream ps(h::read_file(dir + "/port"));
  int port = 0, metrics = 0;
  ps >> port >> metrics;
  return metrics;
}

}  // namespace

// Item 5: beyond loopback TLS and credentials are required; --insecure lifts it with a
// warning and a gauge.
TEST(Tls, BeyondLoopbackNeedsTlsAndCredentialsOrInsecure) {
  const std::string dir = h::make_dir("tls-bind");
  ASSERT_EQ(mprefill::test::make_self_signed_cert(dir, "server"), "");
  const std::string coord = h::bin("mprefill-coordinator") + " --port 0 --host 0.0.0.0";
  std::string out;
  EXPECT_EQ(mprefill::test::run_command(coord + " 2>&1", &out), 1) << out;
  EXPECT_NE(out.find("TLS is required (--tls-cert, --tls-key), or --insecure"), std::string::npos)
      << out;
  EXPECT_EQ(count_lines(out, {"error"}), 1) << out;
  const std::string tls = " --tls-cert " + dir + "/server.pem --tls-key " + dir + "/server.key";
  EXPECT_EQ(mprefill::test::run_command(coord + tls + " 2>&1", &out), 1) << out;
  EXPECT_NE(out.find("credentials are required in addition"), std::string::npos) << out;
  // The shared secret alone is not enough: clients need keys of their own there.
  Keys k(dir);
  EXPECT_EQ(
      mprefill::test::run_command(coord + tls + " --secret-file " + k.infra_file + " 2>&1", &out),
      1)
      << out;
  EXPECT_NE(out.find("--client-keys for clients; with the secret alone every client is an admin"),
            std::string::npos)
      << out;
  EXPECT_EQ(count_lines(out, {"error"}), 1) << out;
  {  // TLS, the secret and client keys: it serves.
    auto args = k.args();
    args.insert(args.end(), {"--host", "0.0.0.0", "--tls-cert", dir + "/server.pem", "--tls-key",
                             dir + "/server.key"});
    h::Coordinator full(h::make_dir("tls-bind-keys"), args);
    EXPECT_TRUE(full.proc->running()) << full.proc->log();
  }
  h::Coordinator co(dir, {"--host", "0.0.0.0", "--insecure", "--metrics-port", "0"});
  EXPECT_NE(co.proc->log().find("warning: --insecure"), std::string::npos) << co.proc->log();
  ASSERT_EQ(mprefill::test::run_command("curl -s --max-time 5 http://127.0.0.1:" +
                                            std::to_string(metrics_port_of(dir)) + "/metrics",
                                        &out),
            0);
  EXPECT_NE(out.find("\nmprefill_insecure 1"), std::string::npos) << out;
}

// Item 5: TLS on the service and metrics ports; clients, worker groups and decoders over
// it; the hello proof covers the TLS exporter, so a proof made without it is refused.
TEST(Tls, ServiceOverTlsWithProofsBoundToTheChannel) {
  const std::string dir = h::make_dir("tls");
  ASSERT_EQ(mprefill::test::make_self_signed_cert(dir, "server"), "");
  ASSERT_EQ(mprefill::test::make_self_signed_cert(dir, "other"), "");
  Keys k(dir);
  auto args = k.args();
  args.insert(args.end(), {"--tls-cert", dir + "/server.pem", "--tls-key", dir + "/server.key",
                           "--metrics-port", "0"});
  h::Coordinator co(dir, args);
  const std::string addr = co.addr(), tls_addr = "tls://" + co.addr();
  {  // A proof without the exporter is refused over TLS; with it, accepted.
    for (bool bound : {false, true}) {
      auto c = wire::Connection::connect("127.0.0.1", co.port, 5000);
      c->start_tls(wire::TlsClientOptions{true, dir + "/server.pem"}, 5000);
      ASSERT_EQ(c->channel_binding().size(), 32u);
      v1::Envelope sh;
      ASSERT_TRUE(c->recv(&sh, 5000));
      ASSERT_TRUE(sh.has_server_hello());
      v1::Envelope e;
      e.set_version(wire::kProtocolVersion);
      auto* ch = e.mutable_client_hello();
      ch->set_version(wire::kProtocolVersion);
      ch->set_role(v1::CLIENT);
      ch->set_key_id("alice");
      ch->set_client_nonce(wire::random_nonce());
      ch->set_proof(wire::hello_proof(
          k.secret.at("alice"),
          wire::binding_of(*ch, sh.server_hello().nonce(), bound ? c->channel_binding() : "")));
      c->send(e, 5000);
      v1::Envelope ans;
      ASSERT_TRUE(c->recv(&ans, 5000));
      if (bound) {
        EXPECT_TRUE(ans.has_hello_accepted()) << ans.ShortDebugString();
      } else {
        ASSERT_TRUE(ans.has_error()) << ans.ShortDebugString();
        EXPECT_EQ(ans.error().code(), v1::UNAUTHENTICATED);
      }
    }
  }
  std::string out;
  const std::string status = h::bin("mprefill") + " status --coordinator ";
  const std::string alice = " --key-file " + quote(k.key_file("alice"));
  EXPECT_EQ(mprefill::test::run_command(
                status + addr + alice + " --tls-ca " + dir + "/server.pem --json 2>&1", &out),
            0)
      << out;
  // Plain TCP to a TLS port, and a certificate the CA file does not vouch for: exit != 0.
  EXPECT_NE(mprefill::test::run_command(status + addr + alice + " 2>&1", &out), 0) << out;
  EXPECT_NE(mprefill::test::run_command(
                status + addr + alice + " --tls-ca " + dir + "/other.pem 2>&1", &out),
            0)
      << out;
  EXPECT_NE(out.find("certificate"), std::string::npos) << out;
  // Worker group and decoder over TLS (tls://), then a job through the CLI over TLS.
  auto dec = h::start_decoder(dir, tls_addr, kModel, "d0", k.infra_file);
  auto wrk = h::start_workers(dir, tls_addr, kModel, 1, "g0", k.infra_file);
  const auto t0 = Clock::now();
  bool up = false;
  while (!up && ms_since(t0) < 120000) {
    up = mprefill::test::run_command(
             status + tls_addr + " --key-file " + quote(k.key_file("root")) + " --json 2>&1",
             &out) == 0 &&
         out.find("\"groups\":[{") != std::string::npos &&
         out.find("\"decoders\":[{") != std::string::npos;
    if (!up) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  }
  ASSERT_TRUE(up) << out << co.proc->log() << dec->log() << wrk->log();
  EXPECT_EQ(
      mprefill::test::run_command(h::bin("mprefill") + " submit --coordinator " + addr + alice +
                                      " --tls --prompt-ids 5,6,7,8 --decode 2 "
                                      "--json 2>&1",
                                  &out),
      0)
      << out << co.proc->log();
  EXPECT_NE(out.find("\"status\":\"DONE\""), std::string::npos) << out;
  // Metrics over HTTPS only.
  const std::string murl = "127.0.0.1:" + std::to_string(metrics_port_of(dir)) + "/metrics";
  EXPECT_EQ(mprefill::test::run_command(
                "curl -s --max-time 5 --cacert " + dir + "/server.pem https://" + murl, &out),
            0);
  EXPECT_NE(out.find("\nmprefill_insecure 0"), std::string::npos) << out;
  EXPECT_NE(mprefill::test::run_command("curl -s --max-time 5 http://" + murl, &out), 0);
}

// Issue 17 leftover: TLS on the decoder's KV port. Beyond loopback it follows the
// coordinator's rule; with --tls-cert the workers' KV crosses over TLS 1.3 (verified with
// their --tls-ca), the stream proofs cover the exporter, a plain-TCP peer is told in one
// line that the port speaks TLS, a certificate the CA does not vouch for is refused, and
// the decoder serves on after each.
TEST(Tls, DecoderKvPortOverTls) {
  const std::string dir = h::make_dir("kv-tls");
  ASSERT_EQ(mprefill::test::make_self_signed_cert(dir, "server"), "");
  ASSERT_EQ(mprefill::test::make_self_signed_cert(dir, "other"), "");
  Keys k(dir);
  const std::string cert = dir + "/server.pem", key = dir + "/server.key";
  {  // Beyond loopback: TLS, then credentials, are required (or --insecure).
    const std::string dec = h::bin("mprefill-decoder") + " --coordinator 127.0.0.1:1 --model " +
                            kModel + " --threads 1 --reconnect-s 0 --listen 0.0.0.0:0";
    std::string out;
    EXPECT_EQ(mprefill::test::run_command(dec + " 2>&1", &out), 1) << out;
    EXPECT_NE(out.find("decoder: --listen 0.0.0.0 is beyond loopback: TLS is required "
                       "(--tls-cert, --tls-key), or --insecure"),
              std::string::npos)
        << out;
    EXPECT_EQ(count_lines(out, {"error"}), 1) << out;
    const std::string tls = " --tls-cert " + cert + " --tls-key " + key;
    EXPECT_EQ(mprefill::test::run_command(dec + tls + " 2>&1", &out), 1) << out;
    EXPECT_NE(out.find("credentials are required in addition to TLS (--secret-file)"),
              std::string::npos)
        << out;
    EXPECT_EQ(mprefill::test::run_command(dec + " --insecure 2>&1", &out), 1) << out;
    EXPECT_NE(out.find("warning: --insecure: 0.0.0.0 is beyond loopback without TLS"),
              std::string::npos)
        << out;
    EXPECT_EQ(mprefill::test::run_command(dec + " --tls-cert " + cert + " 2>&1", &out), 1) << out;
    EXPECT_NE(out.find("--tls-cert and --tls-key go together"), std::string::npos) << out;
  }
  h::Coordinator co(dir, k.args());
  auto dec = h::start_decoder(dir, co.addr(), kModel, "d0", k.infra_file,
                              {"--tls-cert", cert, "--tls-key", key});
  auto wrk = h::start_workers(dir, co.addr(), kModel, 1, "g0", k.infra_file, {"--tls-ca", cert});
  ASSERT_TRUE(wait_keyed(k, co.port, 1, 1, 120000)) << co.proc->log() << dec->log() << wrk->log();
  std::string ep;
  {
    auto root = k.client(co.port, "root");
    auto r = root.status(0, 5000);
    ASSERT_EQ(r.decoders_size(), 1);
    ep = r.decoders(0).endpoint();
  }
  ASSERT_EQ(ep.rfind("tls://127.0.0.1:", 0), 0u) << ep;
  const uint16_t kv_port = static_cast<uint16_t>(std::stoi(ep.substr(ep.rfind(':') + 1)));
  auto run_job = [&](int tokens) {
    auto alice = k.client(co.port, "alice");
    v1::JobAccepted acc;
    v1::Error err;
    if (!alice.submit(h::tiny_job(tokens, 2), &acc, &err)) return "refused: " + err.message();
    v1::JobResult res;
    if (!alice.wait_result(acc.job_id(), &res, &err, 60000)) return "failed: " + err.message();
    if (res.state() != v1::DONE || res.kv_bytes_handed_off() == 0)
      return "state " + v1::JobState_Name(res.state());
    return std::string("DONE");
  };
  EXPECT_EQ(run_job(37), "DONE") << dec->log() << wrk->log();

  // A worker's stream proof without the TLS exporter is refused; with it, accepted.
  for (bool bound : {false, true}) {
    auto c = wire::Connection::connect("127.0.0.1", kv_port, 5000, wire::kDefaultMaxFrame,
                                       wire::TlsClientOptions{true, cert});
    ASSERT_EQ(c->channel_binding().size(), 32u);
    v1::Envelope sh;
    ASSERT_TRUE(c->recv(&sh, 5000));
    ASSERT_TRUE(sh.has_server_hello());
    v1::Envelope e;
    e.set_version(wire::kProtocolVersion);
    auto* ch = e.mutable_client_hello();
    ch->set_version(wire::kProtocolVersion);
    ch->set_role(v1::WORKER);
    ch->set_client_nonce(wire::random_nonce());
    ch->set_proof(wire::hello_proof(k.infra, wire::binding_of(*ch, sh.server_hello().nonce(),
                                                              bound ? c->channel_binding() : "")));
    c->send(e, 5000);
    v1::Envelope ans;
    ASSERT_TRUE(c->recv(&ans, 5000));
    if (bound) {
      EXPECT_TRUE(ans.has_hello_accepted()) << ans.ShortDebugString();
    } else {
      ASSERT_TRUE(ans.has_error()) << ans.ShortDebugString();
      EXPECT_EQ(ans.error().code(), v1::UNAUTHENTICATED);
    }
  }

  // Plain TCP to the TLS port: the peer is told why, in one line, within the hello bound.
  {
    auto c = wire::Connection::connect("127.0.0.1", kv_port, 5000);
    const auto t0 = Clock::now();
    try {
      c->client_handshake(v1::WORKER, "plain-peer", k.infra, 10000);
      ADD_FAILURE() << "a plain-TCP hello to a TLS KV port was accepted";
    } catch (const wire::WireError& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("this port speaks TLS 1.3: connect with TLS"), std::string::npos) << what;
      EXPECT_EQ(what.find('\n'), std::string::npos) << what;
    }
    EXPECT_LT(ms_since(t0), 4000.0);  // the KV port's pre-hello deadline (2 s)
  }
  // A certificate the CA file does not vouch for.
  try {
    wire::Connection::connect("127.0.0.1", kv_port, 5000, wire::kDefaultMaxFrame,
                              wire::TlsClientOptions{true, dir + "/other.pem"});
    ADD_FAILURE() << "a TLS connection to an untrusted certificate was accepted";
  } catch (const wire::WireError& e) {
    EXPECT_NE(std::string(e.what()).find("certificate not trusted"), std::string::npos) << e.what();
  }
  // The decoder served on; one refusal line per bad peer (rate limit: a second apart).
  EXPECT_EQ(run_job(41), "DONE") << dec->log() << wrk->log();
  EXPECT_EQ(count_lines(dec->log(), {"plain TCP to a TLS port"}), 1) << dec->log();
  EXPECT_TRUE(dec->running());
}
