// Who may connect (issue 7): the coordinator listens on 127.0.0.1 by default; with a
// shared secret file every client, worker group and decoder proves it (HMAC over a fresh
// nonce) and peers without it or with another secret are refused with UNAUTHENTICATED;
// the secret appears in no log; the queue limit and the frame size limit hold.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "tests/hardening/harness.h"
#include "tests/testutil.h"

namespace h = mprefill::hardening;
namespace v1 = ::mprefill::v1;
namespace wire = ::mprefill::wire;

namespace {

const char* kModel = "random:tiny:7";

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// Local address (host byte order) of the TCP socket listening on port, from
// /proc/net/tcp ("sl local_address rem_address st ..."; st 0A = LISTEN). 0 when absent.
bool listen_address(uint16_t port, uint32_t* addr) {
  std::ifstream f("/proc/net/tcp");
  std::string line;
  std::getline(f, line);  // header
  while (std::getline(f, line)) {
    std::istringstream is(line);
    std::string sl, local, remote, st;
    is >> sl >> local >> remote >> st;
    const size_t colon = local.find(':');
    if (colon == std::string::npos || st != "0A") continue;
    if (std::stoul(local.substr(colon + 1), nullptr, 16) != port) continue;
    // The address is the raw 32-bit value printed as hex in host order (little-endian
    // hosts: 0100007F is 127.0.0.1).
    const uint32_t raw = static_cast<uint32_t>(std::stoul(local.substr(0, colon), nullptr, 16));
    *addr = __builtin_bswap32(raw);
    return true;
  }
  return false;
}

}  // namespace

TEST(Security, ListensOnLoopbackByDefault) {
  const std::string dir = h::make_dir("bind");
  h::Coordinator co(dir, {"--metrics-port", "0"});
  uint32_t a = 0;
  ASSERT_TRUE(listen_address(co.port, &a)) << "port " << co.port << " not in /proc/net/tcp";
  EXPECT_EQ(a, 0x7f000001u) << "service port bound to " << std::hex << a << ", not 127.0.0.1";
  // The metrics port too.
  std::istringstream ps(h::read_file(dir + "/port"));
  int port = 0, metrics = 0;
  ps >> port >> metrics;
  ASSERT_GT(metrics, 0);
  ASSERT_TRUE(listen_address(static_cast<uint16_t>(metrics), &a));
  EXPECT_EQ(a, 0x7f000001u) << "metrics port bound to " << std::hex << a;
  EXPECT_TRUE(h::file_contains(dir + "/coordinator.log", "listening on 127.0.0.1:"));
  // Issue 17 rough edge: the log said "metrics on :PORT" for a loopback bind.
  EXPECT_TRUE(h::file_contains(dir + "/coordinator.log", "metrics on 127.0.0.1:" +
                                                             std::to_string(metrics)));
}

TEST(Security, SharedSecretIsRequiredProvedAndNeverLogged) {
  const std::string dir = h::make_dir("secret");
  const std::string secret = "s3cr3t-" + std::to_string(::getpid()) + "-do-not-log";
  const std::string secret_file = dir + "/secret";
  const std::string wrong_file = dir + "/wrong";
  h::write_file(secret_file, secret + "\n");
  h::write_file(wrong_file, "another-secret-" + std::to_string(::getpid()) + "\n");
  h::Coordinator co(dir, {"--secret-file", secret_file, "--heartbeat-ms", "200"});

  // Raw peers of every role: no proof, wrong proof, a proof replayed from another
  // connection's nonce -> UNAUTHENTICATED and closed; the right proof -> accepted.
  for (v1::Role role : {v1::CLIENT, v1::WORKER, v1::DECODER}) {
    const std::string r = v1::Role_Name(role);
    {
      h::RawPeer p(co.port);
      std::string why;
      EXPECT_FALSE(p.hello(role, "nosecret", "", &why)) << r;
      EXPECT_NE(why.find("UNAUTHENTICATED"), std::string::npos) << r << ": " << why;
      EXPECT_TRUE(p.closed_within(5000)) << r;
    }
    {
      h::RawPeer p(co.port);
      std::string why;
      EXPECT_FALSE(p.hello(role, "wrong", "not-the-secret", &why)) << r;
      EXPECT_NE(why.find("UNAUTHENTICATED"), std::string::npos) << r << ": " << why;
      EXPECT_TRUE(p.closed_within(5000)) << r;
    }
    {  // Replay: the proof for connection A's nonce, sent on connection B.
      h::RawPeer a(co.port), b(co.port);
      v1::Envelope sa, sb;
      ASSERT_EQ(a.next(&sa, 5000), h::RawPeer::Got::kFrame);
      ASSERT_EQ(b.next(&sb, 5000), h::RawPeer::Got::kFrame);
      EXPECT_TRUE(sa.server_hello().auth_required());
      EXPECT_NE(sa.server_hello().nonce(), sb.server_hello().nonce()) << "nonce reused";
      EXPECT_EQ(sa.server_hello().nonce().size(), 32u);
      v1::Envelope e;
      e.set_version(wire::kProtocolVersion);
      e.mutable_client_hello()->set_version(wire::kProtocolVersion);
      e.mutable_client_hello()->set_role(role);
      e.mutable_client_hello()->set_client_nonce(wire::random_nonce());
      e.mutable_client_hello()->set_proof(
          wire::hello_proof(secret, wire::binding_of(e.client_hello(), sa.server_hello().nonce())));
      b.send(e);
      v1::Error err;
      ASSERT_TRUE(b.next_error(&err, 5000)) << r;
      EXPECT_EQ(err.code(), v1::UNAUTHENTICATED) << r << ": " << err.message();
      EXPECT_TRUE(b.closed_within(5000)) << r;
      // The same proof on its own connection is accepted (the proof itself is right).
      a.send(e);
      v1::Envelope ok;
      ASSERT_EQ(a.next(&ok, 5000), h::RawPeer::Got::kFrame);
      EXPECT_TRUE(ok.has_hello_accepted()) << r << ": " << ok.ShortDebugString();
    }
    {
      h::RawPeer p(co.port);
      std::string why;
      EXPECT_TRUE(p.hello(role, "right", secret, &why)) << r << ": " << why;
    }
  }
  // The blocking client refuses to connect without a secret, before sending anything.
  try {
    h::Client c(co.port, "");
    ADD_FAILURE() << "a client without the secret was accepted";
  } catch (const wire::WireError& e) {
    EXPECT_EQ(e.kind(), wire::WireError::Kind::kAuth) << e.what();
  }

  // The real binaries: CLI, decoder and worker group with the wrong secret exit non-zero
  // with a clear line; with the right one they register and a job runs.
  std::string out;
  const int rc = mprefill::test::run_command(h::bin("mprefill") + " status --coordinator " +
                                                 co.addr() + " --secret-file " + quote(wrong_file),
                                             &out);
  EXPECT_NE(rc, 0) << out;
  EXPECT_NE(out.find("authentication failed"), std::string::npos) << out;
  h::write_file(dir + "/cli-wrong.log", out);
  auto bad_dec = h::start_decoder(dir, co.addr(), kModel, "d-wrong", wrong_file);
  auto bad_wrk = h::start_workers(dir, co.addr(), kModel, 1, "g-wrong", wrong_file);
  int st = -1;
  ASSERT_TRUE(bad_dec->wait_exit(60000, &st)) << "decoder with a wrong secret kept running";
  EXPECT_NE(st, 0);
  EXPECT_TRUE(h::file_contains(bad_dec->log_path(), "authentication failed")) << bad_dec->log();
  ASSERT_TRUE(bad_wrk->wait_exit(90000, &st)) << "worker group with a wrong secret kept running";
  EXPECT_NE(st, 0);
  EXPECT_TRUE(h::file_contains(bad_wrk->log_path(), "authentication failed")) << bad_wrk->log();
  auto no_dec = h::start_decoder(dir, co.addr(), kModel, "d-none", "");
  ASSERT_TRUE(no_dec->wait_exit(60000, &st)) << "decoder without a secret kept running";
  EXPECT_NE(st, 0);
  EXPECT_TRUE(h::file_contains(no_dec->log_path(), "auth")) << no_dec->log();

  auto dec = h::start_decoder(dir, co.addr(), kModel, "d0", secret_file);
  auto wrk = h::start_workers(dir, co.addr(), kModel, 1, "g0", secret_file);
  ASSERT_TRUE(h::wait_registered(co.port, secret, 1, 1, 90000))
      << co.proc->log() << dec->log() << wrk->log();
  {
    h::Client c(co.port, secret);
    v1::JobAccepted acc;
    v1::Error err;
    ASSERT_TRUE(c.submit(h::tiny_job(64, 2), &acc, &err)) << err.message();
    v1::JobResult res;
    ASSERT_TRUE(c.wait_result(acc.job_id(), &res, &err, 60000)) << err.message();
    EXPECT_EQ(res.state(), v1::DONE);
  }
  const int rc2 = mprefill::test::run_command(
      h::bin("mprefill") + " submit --coordinator " + co.addr() + " --secret-file " +
          quote(secret_file) + " --prompt-ids 5,6,7,8 --decode 2 --json",
      &out);
  EXPECT_EQ(rc2, 0) << out;
  h::write_file(dir + "/cli-right.log", out);

  // The secret in no log of any process (checked after everything ran).
  dec.reset();
  wrk.reset();
  co.proc.reset();
  int logs = 0;
  for (const auto& f : std::filesystem::directory_iterator(dir)) {
    if (f.path().extension() != ".log") continue;
    ++logs;
    const std::string text = h::read_file(f.path().string());
    EXPECT_EQ(text.find(secret), std::string::npos) << f.path() << " contains the secret";
    EXPECT_EQ(text.find("another-secret-"), std::string::npos) << f.path();
  }
  EXPECT_GE(logs, 7);
}

TEST(Security, QueueLimitIsEnforced) {
  const std::string dir = h::make_dir("queue");
  h::Coordinator co(dir, {"--queue-limit", "2", "--heartbeat-ms", "200"});
  auto dec = h::start_decoder(dir, co.addr(), kModel, "d0", "");
  // Two ranks: KV pages flow layer by layer (a 1-rank group sends none before its whole
  // prefill is done, see the report of issue 7).
  auto wrk = h::start_workers(dir, co.addr(), kModel, 2, "g0", "");
  ASSERT_TRUE(h::wait_registered(co.port, "", 1, 1, 90000)) << co.proc->log();
  // One long job occupies the only group; two more queue; the fourth is refused.
  h::Client c(co.port);
  std::vector<uint64_t> ids;
  v1::JobAccepted acc;
  v1::Error err;
  ASSERT_TRUE(c.submit(h::tiny_job(3072, 1), &acc, &err)) << err.message();
  ids.push_back(acc.job_id());
  ASSERT_TRUE(h::wait_status(co.port, "", 30000, [&](const v1::StatusReply& s) {
    for (const auto& j : s.jobs())
      if (j.job_id() == ids[0]) return j.state() == v1::RUNNING;
    return false;
  }));
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(c.submit(h::tiny_job(16, 1), &acc, &err)) << err.message();
    ids.push_back(acc.job_id());
  }
  ASSERT_FALSE(c.submit(h::tiny_job(16, 1), &acc, &err)) << "queue limit 2 not enforced";
  EXPECT_EQ(err.code(), v1::RESOURCE_EXHAUSTED);
  EXPECT_NE(err.message().find("queue full"), std::string::npos) << err.message();
  // The accepted ones all finish.
  for (uint64_t id : ids) {
    v1::JobResult res;
    EXPECT_TRUE(c.wait_result(id, &res, &err, 120000)) << id << ": " << err.message();
  }
}

TEST(Security, AdmissionRefusesKvThatDoesNotFit) {
  const std::string dir = h::make_dir("admit");
  h::Coordinator co(dir, {"--heartbeat-ms", "200"});
  // 1 MiB of KV room: random:tiny needs 2 x 4 layers x 2 heads x 32 x 4 B = 2 KiB / token.
  auto dec = h::start_decoder(dir, co.addr(), kModel, "d0", "", {"--capacity-mb", "1"});
  auto wrk = h::start_workers(dir, co.addr(), kModel, 1, "g0", "");
  ASSERT_TRUE(h::wait_registered(co.port, "", 1, 1, 90000)) << co.proc->log();
  h::Client c(co.port);
  v1::JobAccepted acc;
  v1::Error err;
  ASSERT_FALSE(c.submit(h::tiny_job(1024, 1), &acc, &err));
  EXPECT_EQ(err.code(), v1::RESOURCE_EXHAUSTED) << err.message();
  EXPECT_NE(err.message().find("decoder capacity"), std::string::npos) << err.message();
  ASSERT_TRUE(c.submit(h::tiny_job(256, 1), &acc, &err)) << err.message();
  v1::JobResult res;
  EXPECT_TRUE(c.wait_result(acc.job_id(), &res, &err, 60000)) << err.message();
}

// ---- issue 17: clients never name server files ----

namespace {

// An MInference config for random:tiny (4 layers x 4 heads), every head `entry`.
std::string tiny_config(const std::string& entry) {
  std::string s = "[";
  for (int l = 0; l < 4; ++l) {
    s += l ? ",{" : "{";
    for (int hd = 0; hd < 4; ++hd) s += (hd ? ",\"" : "\"") + std::to_string(hd) + "\":" + entry;
    s += "}";
  }
  return s + "]";
}

std::string ids_arg(int n) {
  std::string ids;
  for (int i = 0; i < n; ++i) {
    if (i) ids += ',';
    ids += std::to_string(3 + (i * 7919) % 250);
  }
  return ids;
}

// The last line of output that parses as a JSON object.
nlohmann::json last_json(const std::string& out) {
  std::istringstream is(out);
  std::string line;
  nlohmann::json j;
  while (std::getline(is, line))
    if (!line.empty() && line[0] == '{') {
      try {
        j = nlohmann::json::parse(line);
      } catch (const std::exception&) {
      }
    }
  return j;
}

// The patterns of the audited heads of a --json result (every head the same pattern).
std::set<std::string> audited_patterns(const std::string& out) {
  std::set<std::string> p;
  const nlohmann::json j = last_json(out);
  if (j.is_object() && j.contains("audit"))
    for (const auto& a : j["audit"]) p.insert(a.at("pattern").get<std::string>());
  return p;
}

}  // namespace

// Issue 17 finding 2: a sparse config named as a path was opened by the coordinator
// (under its lock): an oracle that echoed the first bytes of files (of the secret file
// too), a FIFO froze the service. Now: names of --config-dir or JSON inline only.
TEST(Security, ClientsNeverNameServerFiles) {
  const std::string dir = h::make_dir("cfgdir");
  const std::string cfg = dir + "/configs";
  ASSERT_EQ(::mkdir(cfg.c_str(), 0700), 0);
  const std::string secret = "sekrit-" + std::to_string(::getpid()) + "-never-echoed";
  const std::string secret_file = dir + "/secret";
  h::write_file(secret_file, secret + "\n");
  h::write_file(cfg + "/ashape.json", tiny_config("[\"stream_llm\", 4, 16, 0.9]"));
  h::write_file(cfg + "/big.json",
                tiny_config("[\"stream_llm\", 4, 16, 0.9]") + std::string(5000, ' ') + secret);
  ASSERT_EQ(::mkfifo((cfg + "/fifo.json").c_str(), 0600), 0);
  ASSERT_EQ(::symlink(secret_file.c_str(), (cfg + "/link.json").c_str()), 0);
  // A client's own files (outside the config directory): sent inline by the CLI.
  h::write_file(dir + "/local-vs.json", tiny_config("[\"vertical_and_slash\", 8, 16, 0.9]"));
  h::write_file(dir + "/local-big.json",
                tiny_config("[\"vertical_and_slash\", 8, 16, 0.9]") + std::string(5000, ' '));
  h::Coordinator co(dir, {"--secret-file", secret_file, "--config-dir", cfg, "--max-config-bytes",
                          "4096", "--heartbeat-ms", "200"});
  auto dec = h::start_decoder(dir, co.addr(), kModel, "d0", secret_file);
  auto wrk = h::start_workers(dir, co.addr(), kModel, 1, "g0", secret_file);
  ASSERT_TRUE(h::wait_registered(co.port, secret, 1, 1, 90000))
      << co.proc->log() << dec->log() << wrk->log();

  h::Client c(co.port, secret);
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"../../etc/passwd", "not a built-in (dense, auto) nor a config name"},
      {"/etc/passwd", "not a built-in"},
      {secret_file, "not a built-in"},
      {"../secret", "not a built-in"},
      {"fifo", "'fifo': is not a regular file (refused)"},
      {"link", "'link': is a symbolic link (refused)"},
      {"big", "over the coordinator's limit of 4096 (--max-config-bytes)"},
  };
  for (const auto& [name, text] : cases) {
    auto j = h::tiny_job(80, 1);
    j.mutable_options()->set_sparse(name);
    v1::JobAccepted acc;
    v1::Error err;
    const auto t0 = h::Clock::now();
    ASSERT_FALSE(c.submit(j, &acc, &err, 5000)) << name << " was accepted";
    EXPECT_LT(h::Clock::now() - t0, std::chrono::seconds(2)) << name;
    EXPECT_EQ(err.code(), v1::INVALID_ARGUMENT) << name << ": " << err.message();
    EXPECT_NE(err.message().find(text), std::string::npos) << name << ": " << err.message();
    EXPECT_EQ(err.message().find('\n'), std::string::npos) << err.message();
    EXPECT_EQ(err.message().find(secret), std::string::npos) << "file bytes echoed";
    EXPECT_EQ(err.message().find(cfg), std::string::npos) << "server path echoed";
    // The service answers another client right away (a FIFO is never opened).
    const auto t1 = h::Clock::now();
    EXPECT_EQ(h::Client(co.port, secret).status(0, 2000).groups_size(), 1) << name;
    EXPECT_LT(h::Clock::now() - t1, std::chrono::seconds(2)) << name;
  }

  // The CLI: a name of --config-dir runs those patterns; a local file goes inline; an
  // oversize one is refused with one line.
  const std::string cli = h::bin("mprefill") + " submit --coordinator " + co.addr() +
                          " --secret-file " + quote(secret_file) + " --prompt-ids " + ids_arg(80) +
                          " --dense-below 64 --audit-heads 1 --decode 1 --json";
  std::string out;
  ASSERT_EQ(mprefill::test::run_command(cli + " --sparse ashape 2>&1", &out), 0) << out;
  EXPECT_EQ(audited_patterns(out), std::set<std::string>{"a_shape"}) << out;
  ASSERT_EQ(mprefill::test::run_command(
                cli + " --sparse " + quote(dir + "/local-vs.json") + " 2>&1", &out),
            0)
      << out;
  EXPECT_EQ(audited_patterns(out), std::set<std::string>{"vertical_slash"}) << out;
  EXPECT_NE(mprefill::test::run_command(
                cli + " --sparse " + quote(dir + "/local-big.json") + " 2>&1", &out),
            0);
  EXPECT_NE(out.find("mprefill: error: job 0 REFUSED: INVALID_ARGUMENT: sparse config sent "
                     "inline has "),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("over the coordinator's limit of 4096 (--max-config-bytes)"),
            std::string::npos)
      << out;
  co.proc.reset();
  EXPECT_EQ(h::read_file(dir + "/coordinator.log").find(secret), std::string::npos);
}

// `mprefill run --config-dir DIR --sparse NAME`: a named config end to end on the CPU
// service (the patterns the audited heads ran are the config's).
TEST(Security, RunTakesASparseConfigByNameFromItsConfigDir) {
  const std::string dir = h::make_dir("runcfg");
  const std::string cfg = dir + "/configs";
  ASSERT_EQ(::mkdir(cfg.c_str(), 0700), 0);
  h::write_file(cfg + "/ashape.json", tiny_config("[\"stream_llm\", 4, 16, 0.9]"));
  const std::string run = h::bin("mprefill") + " run --mpirun " + MPREFILL_MPIEXEC + " --model " +
                          kModel + " --prompt-ids " + ids_arg(100) +
                          " --dense-below 64 --audit-heads 2 --decode 2 --json --config-dir " +
                          quote(cfg);
  std::string out;
  ASSERT_EQ(mprefill::test::run_command(run + " --sparse ashape 2>&1", &out), 0) << out;
  EXPECT_EQ(last_json(out).value("status", ""), "DONE") << out;
  EXPECT_EQ(audited_patterns(out), std::set<std::string>{"a_shape"}) << out;
  // A name the directory does not hold: one line, exit 1.
  EXPECT_EQ(mprefill::test::run_command(run + " --sparse nope 2>&1", &out), 1) << out;
  EXPECT_NE(out.find("INVALID_ARGUMENT: sparse config 'nope': no such config"), std::string::npos)
      << out;
}

namespace {

// A listening TCP socket: its address as text, whether it is loopback, and its port.
struct Listening {
  std::string addr;
  bool loopback = false;
  unsigned port = 0;
};

// Listening sockets (/proc/net/tcp and tcp6, st 0A) by inode.
std::map<std::string, Listening> listening_sockets() {
  std::map<std::string, Listening> out;
  for (const char* file : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream f(file);
    std::string line;
    std::getline(f, line);  // header
    while (std::getline(f, line)) {
      std::istringstream is(line);
      std::string sl, local, remote, st, txq, tr, retr, uid, timeout, inode;
      is >> sl >> local >> remote >> st >> txq >> tr >> retr >> uid >> timeout >> inode;
      const size_t colon = local.find(':');
      if (st != "0A" || colon == std::string::npos) continue;
      Listening l;
      l.addr = local.substr(0, colon);
      l.port = static_cast<unsigned>(std::stoul(local.substr(colon + 1), nullptr, 16));
      // Hex of the raw address words in host order: IPv4 127.x.x.x ends in 7F; IPv6 ::1
      // is 0...0 01000000; an IPv4-mapped ::ffff:127.x.x.x ends in FFFF0000 ..7F.
      l.loopback =
          (l.addr.size() == 8 && l.addr.substr(6) == "7F") ||
          l.addr == "00000000000000000000000001000000" ||
          (l.addr.size() == 32 && l.addr.substr(16, 8) == "FFFF0000" && l.addr.substr(30) == "7F");
      out[inode] = l;
    }
  }
  return out;
}

// The listening sockets a process holds (its /proc/PID/fd links "socket:[INODE]").
std::vector<Listening> listeners_of(pid_t pid, const std::map<std::string, Listening>& all) {
  std::vector<Listening> out;
  std::error_code ec;
  for (const auto& e :
       std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec)) {
    const std::string link = std::filesystem::read_symlink(e.path(), ec).string();
    if (link.rfind("socket:[", 0) != 0) continue;
    auto it = all.find(link.substr(8, link.size() - 9));
    if (it != all.end()) out.push_back(it->second);
  }
  return out;
}

std::string describe(const std::vector<Listening>& ls) {
  std::string s;
  for (const auto& l : ls) s += l.addr + ":" + std::to_string(l.port) + " ";
  return s;
}

}  // namespace

// Issue 17 item 7: during `mprefill run` (every rank on this host) MPI stays off the
// network: the ranks listen on nothing (shared memory between them; before, each rank's
// TCP BTL listened on 0.0.0.0:1024+), the decoder and the in-process coordinator only on
// loopback, and no child holds the coordinator's listening socket (it was inherited by
// the decoder and mpirun). mpirun's own OOB listener binds the wildcard address in
// OpenMPI 4.1 whatever oob_tcp_if_include says: not asserted (see launch/serve.sh).
TEST(Security, RunKeepsMpiOffTheNetwork) {
  const std::string dir = h::make_dir("run-lo");
  std::string ids;
  for (int i = 0; i < 3000; ++i) {
    if (i) ids += ',';
    ids += std::to_string(3 + (i * 7919) % 250);
  }
  h::Proc run({h::bin("mprefill"), "run", "--model", kModel, "--ranks", "2", "--prompt-ids", ids,
               "--decode", "2", "--json", "--mpirun", MPREFILL_MPIEXEC},
              dir + "/run.log");
  // Once the group registered, the ranks are up and connected to each other.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (std::chrono::steady_clock::now() < until &&
         run.log().find("group 'run' registered") == std::string::npos && run.running())
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_NE(run.log().find("group 'run' registered"), std::string::npos) << run.log();
  const auto all = listening_sockets();
  const auto own = listeners_of(run.pid(), all);
  pid_t mpirun = -1, decoder = -1;
  for (pid_t c : h::children_of(run.pid())) {  // the decoder, and the launcher (mpiexec)
    const std::string comm = h::read_file("/proc/" + std::to_string(c) + "/comm");
    (comm.rfind("mprefill-decode", 0) == 0 ? decoder : mpirun) = c;
  }
  ASSERT_GT(mpirun, 0) << run.log();
  ASSERT_GT(decoder, 0) << run.log();
  const auto ranks = h::children_of(mpirun);
  ASSERT_EQ(ranks.size(), 2u) << run.log();
  ASSERT_FALSE(own.empty());  // the coordinator's service port
  for (const auto& l : own) EXPECT_TRUE(l.loopback) << "mprefill: " << describe(own);
  const auto dec = listeners_of(decoder, all);
  EXPECT_EQ(dec.size(), 1u) << "decoder (its KV port only): " << describe(dec);
  for (const auto& l : dec) EXPECT_TRUE(l.loopback) << "decoder: " << describe(dec);
  for (pid_t r : ranks) {
    const auto rl = listeners_of(r, all);
    EXPECT_TRUE(rl.empty()) << "rank pid " << r << " listens on " << describe(rl);
    // NCCL's bootstrap (GPU groups) would bind the interface NCCL picks, never lo.
    EXPECT_EQ(h::environ_of(r, "NCCL_SOCKET_IFNAME"), "lo") << "rank pid " << r;
  }
  EXPECT_EQ(h::environ_of(decoder, "NCCL_SOCKET_IFNAME"), "lo");
  const auto ml = listeners_of(mpirun, all);
  for (const auto& o : own)
    for (const auto& m : ml)
      EXPECT_NE(m.port, o.port) << "mpirun holds the coordinator's port " << o.port;
  int status = -1;
  ASSERT_TRUE(run.wait_exit(120000, &status)) << run.log();
  EXPECT_EQ(status, 0) << run.log();
  EXPECT_NE(run.log().find("\"status\":\"DONE\""), std::string::npos) << run.log();
}
