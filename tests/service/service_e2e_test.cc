// End to end with the real binaries: mprefill-coordinator, an mpirun group of
// mprefill-worker, mprefill-decoder, and the clients (`mprefill run / submit / status /
// cancel`, python/mprefill_client.py). The generated ids must equal single-process
// `mprefill generate`'s on stories15M (greedy, 16 decode steps).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include "engine/engine.h"
#include "kv/kv_cache.h"
#include "model/sampler.h"
#include "model/weights.h"
#include "tests/testutil.h"

namespace t = mprefill::test;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

std::string model() { return t::shared_dir() + "/models/stories15M/stories15M.bin"; }
std::string tokenizer() { return t::shared_dir() + "/models/stories15M/tokenizer.bin"; }
std::string bin(const std::string& name) { return t::bin_dir() + "/" + name; }

// Skips the test (from a void function) unless stories15M and its tokenizer are there.
#define SKIP_WITHOUT_STORIES()       \
  MPREFILL_SKIP_IF_MISSING(model()); \
  MPREFILL_SKIP_IF_MISSING(tokenizer())

// KV bytes per token of stories15M with fp32 KV: 2 x 6 layers x 6 heads x 48 x 4.
constexpr uint64_t kKvPerToken = 2 * 6 * 6 * 48 * 4;

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// The last line of output that parses as a JSON object.
json last_json(const std::string& out) {
  std::istringstream is(out);
  std::string line;
  json j;
  while (std::getline(is, line))
    if (!line.empty() && line[0] == '{') {
      try {
        j = json::parse(line);
      } catch (const std::exception&) {
      }
    }
  return j;
}

struct Prompt {
  std::string flag;  // "--prompt" or "--prompt-ids"
  std::string value;
};

const std::vector<Prompt>& prompts() {
  static const std::vector<Prompt> p = {
      {"--prompt", "Once upon a time"},
      {"--prompt", "The little dog ran to the park and saw a big red ball. He"},
      {"--prompt-ids", "1,365,2501,1554,263,6114,2000,1021,20888,29889,450"},
  };
  return p;
}

std::string prompt_args(const Prompt& p) {
  return "--tokenizer " + quote(tokenizer()) + " " + p.flag + " " + quote(p.value);
}

// generate --json of a prompt (cached: every test compares against the same reference).
json reference(const Prompt& p) {
  static std::map<std::string, json> cache;
  auto it = cache.find(p.value);
  if (it != cache.end()) return it->second;
  std::string out;
  const int rc = t::run_command(bin("mprefill") + " generate --model " + quote(model()) + " " +
                                    prompt_args(p) + " --decode 16 --json 2>&1",
                                &out);
  if (rc != 0) throw std::runtime_error("generate failed: " + out);
  json j = last_json(out);
  cache[p.value] = j;
  return j;
}

std::vector<int> ids_of(const json& j) { return j.at("generated_ids").get<std::vector<int>>(); }

// A process in its own process group (mpirun and its ranks are signalled together).
struct Proc {
  pid_t pid = -1;
  std::string log;
  Proc(const std::vector<std::string>& args, const std::string& log_path,
       const std::vector<std::string>& env = {})
      : log(log_path) {
    pid = ::fork();
    if (pid == 0) {
      ::setpgid(0, 0);
      int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      for (const auto& e : env) ::putenv(const_cast<char*>(e.c_str()));
      std::vector<char*> argv;
      for (const auto& s : args) argv.push_back(const_cast<char*>(s.c_str()));
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    ::setpgid(pid, pid);
  }
  bool running() {
    int st;
    return ::waitpid(pid, &st, WNOHANG) == 0;
  }
  ~Proc() {
    if (pid <= 0) return;
    ::kill(-pid, SIGTERM);
    for (int i = 0; i < 250 && running(); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ::kill(-pid, SIGKILL);
    int st;
    ::waitpid(pid, &st, 0);
  }
};

std::string read_file(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// A running service: coordinator + one worker group of `ranks` (tp) + one decoder, with a
// shared secret.
struct Service {
  std::string dir, secret_file, addr;
  std::string tls_cert;  // with tls: the coordinator's self-signed certificate (PEM)
  std::unique_ptr<Proc> coord, workers, decoder;

  // tls: the coordinator serves TLS 1.3 (a certificate for 127.0.0.1 made with the openssl
  // CLI); the group, the decoder and cli() connect over tls://, cli() verifying it.
  Service(const std::string& model_path, int ranks, int tp, const std::string& tag,
          const std::vector<std::string>& decoder_args = {}, bool tls = false) {
    dir = ::testing::TempDir() + "/svc_" + tag + "_" + std::to_string(::getpid());
    std::filesystem::create_directories(dir);
    secret_file = dir + "/secret";
    std::ofstream(secret_file) << "e2e-secret-" << ::getpid() << "\n";
    const std::string port_file = dir + "/port";
    std::vector<std::string> cargs{bin("mprefill-coordinator"),
                                   "--port",
                                   "0",
                                   "--port-file",
                                   port_file,
                                   "--secret-file",
                                   secret_file,
                                   "--tokenizer",
                                   tokenizer(),
                                   "--heartbeat-ms",
                                   "200"};
    if (tls) {
      tls_cert = dir + "/server.pem";
      const std::string out = t::make_self_signed_cert(dir, "server");
      if (!out.empty()) throw std::runtime_error("openssl req failed: " + out);
      cargs.insert(cargs.end(), {"--tls-cert", tls_cert, "--tls-key", dir + "/server.key"});
    }
    coord = std::make_unique<Proc>(cargs, dir + "/coordinator.log");
    const auto until = Clock::now() + std::chrono::seconds(20);
    while (!t::file_exists(port_file) && Clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    std::istringstream ps(read_file(port_file));
    int port = 0;
    ps >> port;
    if (port <= 0)
      throw std::runtime_error("coordinator did not start: " + read_file(dir + "/coordinator.log"));
    addr = "127.0.0.1:" + std::to_string(port);
    const std::string peer_addr = tls ? "tls://" + addr : addr;
    workers = std::make_unique<Proc>(
        std::vector<std::string>{MPREFILL_MPIEXEC, "--oversubscribe", "--bind-to", "none", "-np",
                                 std::to_string(ranks), bin("mprefill-worker"), "--coordinator",
                                 peer_addr, "--model", model_path, "--tp", std::to_string(tp),
                                 "--group", "g-" + tag, "--secret-file", secret_file},
        dir + "/workers.log",
        std::vector<std::string>{"OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1",
                                 "OMPI_MCA_rmaps_base_oversubscribe=1"});
    std::vector<std::string> dargs{bin("mprefill-decoder"),
                                   "--coordinator",
                                   peer_addr,
                                   "--model",
                                   model_path,
                                   "--name",
                                   "d-" + tag,
                                   "--secret-file",
                                   secret_file};
    dargs.insert(dargs.end(), decoder_args.begin(), decoder_args.end());
    decoder = std::make_unique<Proc>(dargs, dir + "/decoder.log");
    // Registered?
    const auto reg_until = Clock::now() + std::chrono::seconds(120);
    for (;;) {
      std::string out;
      t::run_command(cli("status") + " --json 2>&1", &out);
      json j = last_json(out);
      if (j.is_object() && j["groups"].size() == 1 && j["decoders"].size() == 1) break;
      if (Clock::now() > reg_until || !workers->running() || !decoder->running())
        throw std::runtime_error("service did not come up:\n" + logs());
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  std::string cli(const std::string& cmd) const {
    return bin("mprefill") + " " + cmd + " --coordinator " + addr + " --secret-file " +
           quote(secret_file) + (tls_cert.empty() ? "" : " --tls-ca " + quote(tls_cert));
  }
  std::string logs() const {
    return "--- coordinator\n" + read_file(dir + "/coordinator.log") + "--- workers\n" +
           read_file(dir + "/workers.log") + "--- decoder\n" + read_file(dir + "/decoder.log");
  }
};

void check_run_matches_generate(int ranks, int tp) {
  SKIP_WITHOUT_STORIES();
  for (const Prompt& p : prompts()) {
    const json ref = reference(p);
    std::string out;
    const int rc =
        t::run_command(bin("mprefill") + " run --ranks " + std::to_string(ranks) + " --tp " +
                           std::to_string(tp) + " --mpirun " + MPREFILL_MPIEXEC + " --model " +
                           quote(model()) + " " + prompt_args(p) + " --decode 16 --json 2>&1",
                       &out);
    ASSERT_EQ(rc, 0) << out;
    const json j = last_json(out);
    ASSERT_TRUE(j.is_object()) << out;
    EXPECT_EQ(j.value("status", ""), "DONE") << out;
    EXPECT_GE(j.value("job_id", 0), 1);
    EXPECT_EQ(ids_of(j), ids_of(ref)) << p.value << "\n" << out;
    EXPECT_EQ(ids_of(j).size(), 17u);
    EXPECT_EQ(j.at("prompt_tokens").get<int64_t>(), ref.at("prompt_tokens").get<int64_t>());
    EXPECT_EQ(j.at("kv_bytes_handed_off").get<uint64_t>(),
              kKvPerToken * j.at("prompt_tokens").get<uint64_t>());
    EXPECT_GT(j.at("handoff_ms").get<double>(), 0.0);
    EXPECT_EQ(j.at("sp").get<int>(), ranks / tp);
    // The work split the group reported (WorkerDone -> JobResult): max / mean >= 1.
    EXPECT_TRUE(j.at("sp_rebalanced").is_boolean()) << out;
    EXPECT_GE(j.at("sp_imbalance").get<double>(), 1.0) << out;
    EXPECT_GE(j.at("tp_imbalance").get<double>(), 1.0) << out;
    if (p.flag == "--prompt") {
      EXPECT_EQ(j.value("text", ""), ref.value("text", "")) << out;
    }
  }
}

}  // namespace

TEST(ServiceE2E, RunRanks2MatchesGenerate) { check_run_matches_generate(2, 1); }

TEST(ServiceE2E, RunRanks4Tp2MatchesGenerate) { check_run_matches_generate(4, 2); }

TEST(ServiceE2E, ConcurrentSubmissionsQueueAndAllFinish) {
  SKIP_WITHOUT_STORIES();
  Service s(model(), 2, 1, "conc");
  // Every prompt twice, all at once: one group, so they queue.
  std::string script;
  std::vector<std::string> outs;
  int k = 0;
  for (int rep = 0; rep < 2; ++rep)
    for (const Prompt& p : prompts()) {
      const std::string out = s.dir + "/submit" + std::to_string(k++) + ".json";
      outs.push_back(out);
      script +=
          s.cli("submit") + " " + prompt_args(p) + " --decode 16 --json > " + out + " 2>&1 & ";
    }
  std::string ignored;
  ASSERT_EQ(t::run_command("bash -c " + quote(script + "wait"), &ignored), 0);
  double max_queue_ms = 0;
  for (size_t i = 0; i < outs.size(); ++i) {
    const Prompt& p = prompts()[i % prompts().size()];
    const std::string text = read_file(outs[i]);
    const json j = last_json(text);
    ASSERT_TRUE(j.is_object()) << text << s.logs();
    EXPECT_EQ(j.value("status", ""), "DONE") << text;
    EXPECT_EQ(ids_of(j), ids_of(reference(p))) << p.value;
    max_queue_ms = std::max(max_queue_ms, j.value("queue_ms", 0.0));
  }
  EXPECT_GT(max_queue_ms, 0.0);  // someone waited for the group
  std::string st;
  t::run_command(s.cli("status") + " --json", &st);
  const json sj = last_json(st);
  int done = 0;
  for (const auto& j : sj["jobs"]) done += j["status"] == "DONE";
  EXPECT_EQ(done, 6) << st;
  EXPECT_EQ(sj["decoders"][0]["active_jobs"], 0) << st;
}

TEST(ServiceE2E, CancelMidRunThenTheServiceStillWorks) {
  // random:tiny at 6144 tokens: the prefill takes seconds on CPU, long enough to cancel
  // while RUNNING.
  Service s("random:tiny:7", 2, 1, "cancel");
  std::string ids;
  for (int i = 0; i < 6144; ++i) {
    if (i) ids += ',';  // not `(i ? "," : "") + ...`: gcc 12 -Wrestrict false positive
    ids += std::to_string(3 + (i * 7919) % 250);
  }
  const std::string ids_file = s.dir + "/ids.txt";
  std::ofstream(ids_file) << ids;
  std::string out;
  ASSERT_EQ(t::run_command(s.cli("submit") + " --prompt-ids \"$(cat " + ids_file +
                               ")\" --decode 4 --no-wait --json 2>&1",
                           &out),
            0)
      << out;
  const uint64_t id = last_json(out).value("job_id", uint64_t{0});
  ASSERT_GE(id, 1u) << out;
  // Wait until the prefill is under way (a layer done), then cancel.
  const auto until = Clock::now() + std::chrono::seconds(60);
  std::string state;
  int layer = 0;
  while (Clock::now() < until) {
    t::run_command(s.cli("status") + " --job " + std::to_string(id) + " --json", &out);
    const json js = last_json(out)["jobs"][0];
    state = js.value("status", "");
    layer = js.value("layer", 0);
    if (state == "RUNNING" && layer >= 1) break;
    ASSERT_TRUE(state == "QUEUED" || state == "RUNNING")
        << "the job ended before it could be cancelled mid-run (too fast a machine?)\n"
        << out << s.logs();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_LT(layer, 4);
  ASSERT_EQ(state, "RUNNING");
  ASSERT_EQ(t::run_command(s.cli("cancel") + " --job " + std::to_string(id) + " --json", &out), 0)
      << out << s.logs();
  EXPECT_EQ(last_json(out).value("status", ""), "CANCELLED") << out;
  // The group drops the job and takes the next one: a short job finishes.
  ASSERT_EQ(
      t::run_command(s.cli("submit") + " --prompt-ids 1,5,9,14,200 --decode 3 --json 2>&1", &out),
      0)
      << out << s.logs();
  const json j = last_json(out);
  EXPECT_EQ(j.value("status", ""), "DONE") << out;
  EXPECT_EQ(ids_of(j).size(), 4u);
  t::run_command(s.cli("status") + " --json", &out);
  const json sj = last_json(out);
  EXPECT_EQ(sj["decoders"][0]["active_jobs"], 0) << out;
  EXPECT_EQ(sj["groups"][0]["busy"], false) << out;
}

// Issue 17 leftover: while the decoder decodes, status says DECODING (not HANDING_OFF)
// and the client's progress stream reports it; the job then ends DONE with generate's ids.
TEST(ServiceE2E, StatusShowsDecodingWhileTheDecoderDecodes) {
  SKIP_WITHOUT_STORIES();
  Service s(model(), 1, 1, "dec");
  const Prompt& p = prompts()[2];
  // 230 decode steps (11 + 1 + 230 <= 256 positions): long enough to be seen decoding.
  Proc submit(
      {"/bin/sh", "-c", s.cli("submit") + " --prompt-ids " + p.value + " --decode 230 --json"},
      s.dir + "/submit.log");
  std::vector<std::string> seen;  // distinct states of job 1, in order
  const auto until = Clock::now() + std::chrono::seconds(120);
  while (Clock::now() < until) {
    std::string out;
    t::run_command(s.cli("status") + " --json 2>&1", &out);
    const json j = last_json(out);
    if (j.is_object() && j.contains("jobs"))
      for (const auto& job : j["jobs"])
        if (job.value("job_id", 0) == 1) {
          const std::string st = job.value("status", "");
          if (seen.empty() || seen.back() != st) seen.push_back(st);
        }
    if (!seen.empty() && (seen.back() == "DONE" || seen.back() == "FAILED")) break;
  }
  std::string trace;
  for (const auto& st : seen) trace += st + " ";
  ASSERT_FALSE(seen.empty()) << s.logs();
  EXPECT_EQ(seen.back(), "DONE") << trace << s.logs();
  ASSERT_GE(seen.size(), 2u) << trace;
  EXPECT_EQ(seen[seen.size() - 2], "DECODING") << trace;  // DONE comes from DECODING
  for (int i = 0; i < 100 && submit.running(); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const json r = last_json(read_file(s.dir + "/submit.log"));
  EXPECT_EQ(r.value("status", ""), "DONE") << read_file(s.dir + "/submit.log");
  EXPECT_EQ(ids_of(r).size(), 231u);
  EXPECT_NE(read_file(s.dir + "/coordinator.log")
                .find("job 1: KV complete on decoder 'd-dec'; "
                      "DECODING"),
            std::string::npos)
      << s.logs();
}

TEST(ServiceE2E, PythonClientRunsAJob) {
  SKIP_WITHOUT_STORIES();
  const std::string py = MPREFILL_PYTHON3;
  if (py.empty())
    GTEST_SKIP() << "no python3 with google.protobuf (launch/setup.sh installs python3-protobuf)";
  Service s(model(), 2, 1, "py");
  const Prompt& p = prompts()[2];
  std::string out;
  const int rc =
      t::run_command(py + " " + t::source_dir() + "/python/mprefill_client.py --coordinator " +
                         s.addr + " --secret-file " + quote(s.secret_file) + " --prompt-ids " +
                         p.value + " --decode 16 --json 2>&1",
                     &out);
  ASSERT_EQ(rc, 0) << out << s.logs();
  const json j = last_json(out);
  EXPECT_EQ(j.value("status", ""), "DONE") << out;
  EXPECT_EQ(ids_of(j), ids_of(reference(p)));
  EXPECT_EQ(j.at("kv_bytes_handed_off").get<uint64_t>(), kKvPerToken * 11);
  EXPECT_EQ(j.at("heads_run").at("dense").get<int>(), 36) << out;  // 6 layers x 6 heads
  // --dense-below reaches the workers: `auto` on these 11 tokens runs vertical-slash.
  ASSERT_EQ(
      t::run_command(py + " " + t::source_dir() + "/python/mprefill_client.py --coordinator " +
                         s.addr + " --secret-file " + quote(s.secret_file) + " --prompt-ids " +
                         p.value + " --sparse auto --dense-below 0 --json 2>&1",
                     &out),
      0)
      << out;
  EXPECT_EQ(last_json(out).at("heads_run").at("vertical_slash").get<int>(), 36) << out;
  // And a refusal comes back as a clear error with a non-zero status.
  const int rc2 = t::run_command(
      py + " " + t::source_dir() + "/python/mprefill_client.py --coordinator " + s.addr +
          " --secret-file " + quote(s.secret_file) + " --prompt-ids 5,32000 --json 2>&1",
      &out);
  EXPECT_NE(rc2, 0);
  EXPECT_NE(out.find("INVALID_ARGUMENT"), std::string::npos) << out;
  EXPECT_NE(out.find("token id 32000 at position 1"), std::string::npos) << out;
}

// The python client over TLS (issue 17 leftover): tls://HOST:PORT (proof bound to the
// exporter) and --tls-ca (certificate verified) run a job with the CLI's ids; a CA that
// does not vouch for the server, and plain TCP to the TLS port, fail with one line.
TEST(ServiceE2E, PythonClientOverTls) {
  SKIP_WITHOUT_STORIES();
  const std::string py = MPREFILL_PYTHON3;
  if (py.empty())
    GTEST_SKIP() << "no python3 with google.protobuf (launch/setup.sh installs python3-protobuf)";
  Service s(model(), 1, 1, "pytls", {}, /*tls=*/true);
  const Prompt& p = prompts()[2];
  const std::string client = py + " " + t::source_dir() + "/python/mprefill_client.py";
  const std::string secret = " --secret-file " + quote(s.secret_file);
  for (const std::string& how : {" --coordinator tls://" + s.addr,
                                 " --coordinator " + s.addr + " --tls-ca " + quote(s.tls_cert)}) {
    std::string out;
    const int rc = t::run_command(
        client + how + secret + " --prompt-ids " + p.value + " --decode 16 --json 2>&1", &out);
    ASSERT_EQ(rc, 0) << how << "\n" << out << s.logs();
    const json j = last_json(out);
    EXPECT_EQ(j.value("status", ""), "DONE") << out;
    EXPECT_EQ(ids_of(j), ids_of(reference(p))) << how;
  }
  // A CA file that does not vouch for the coordinator's certificate.
  const std::string other = s.dir + "/other.pem";
  ASSERT_EQ(t::make_self_signed_cert(s.dir, "other", "other"), "");
  std::string out;
  EXPECT_EQ(t::run_command(client + " --coordinator " + s.addr + " --tls-ca " + quote(other) +
                               secret + " --prompt-ids 5,6 2>&1",
                           &out),
            1);
  EXPECT_EQ(out.rfind("mprefill_client: error: TLS with 127.0.0.1:", 0), 0u) << out;
  EXPECT_NE(out.find("certificate not trusted"), std::string::npos) << out;
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
  // Plain TCP to the TLS port: the hint names TLS.
  EXPECT_EQ(
      t::run_command(client + " --coordinator " + s.addr + secret + " --prompt-ids 5,6 2>&1", &out),
      1);
  EXPECT_NE(out.find("a TLS port? use tls://HOST:PORT or --tls"), std::string::npos) << out;
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
}

// New-user edges of the python client (issue 17): option names are never abbreviated
// ("--prompt" once ran as "--prompt-ids"), and a python3 without protobuf gets one line
// saying what to install (python3 -S: no site packages, so no protobuf).
TEST(ServiceE2E, PythonClientRefusesAbbreviationsAndNamesMissingProtobuf) {
  const std::string py = MPREFILL_PYTHON3;
  if (py.empty())
    GTEST_SKIP() << "no python3 with google.protobuf (launch/setup.sh installs python3-protobuf)";
  const std::string client = t::source_dir() + "/python/mprefill_client.py";
  std::string out;
  int rc = t::run_command(py + " " + client + " --coordinator 127.0.0.1:9 --prompt-i 1 2>&1", &out);
  EXPECT_EQ(rc, 2) << out;
  EXPECT_NE(out.find("--prompt-ids --prompt/--text is required"), std::string::npos) << out;
  rc = t::run_command(py + " -S " + client + " --coordinator 127.0.0.1:9 --prompt hi 2>&1", &out);
  EXPECT_EQ(rc, 2) << out;
  EXPECT_EQ(out,
            "mprefill_client: error: this python3 has no protobuf module: install "
            "python3-protobuf (Debian; launch/setup.sh does) or 'pip install protobuf'\n");
}

TEST(ServiceE2E, AuditHeadsComeBackInTheResult) {
  // random:tiny, 700 tokens, every head sparse (auto, dense below 64): the group audits
  // two heads per layer against dense attention and the result carries them.
  Service s("random:tiny:5", 2, 1, "audit");
  std::string ids;
  for (int i = 0; i < 700; ++i) {
    if (i) ids += ',';  // not `(i ? "," : "") + ...`: gcc 12 -Wrestrict false positive
    ids += std::to_string(3 + (i * 7919) % 250);
  }
  std::string out;
  ASSERT_EQ(t::run_command(s.cli("submit") + " --prompt-ids " + ids +
                               " --sparse auto --dense-below 64 --audit-heads 2 --decode 1 "
                               "--json 2>&1",
                           &out),
            0)
      << out << s.logs();
  const json j = last_json(out);
  ASSERT_TRUE(j.is_object()) << out;
  EXPECT_EQ(j.value("status", ""), "DONE") << out;
  ASSERT_TRUE(j.contains("audit")) << out;
  const auto& audit = j["audit"];
  ASSERT_FALSE(audit.empty()) << out;
  std::set<int> layers;
  for (const auto& h : audit) {
    const double recall = h.at("recall").get<double>();
    EXPECT_GE(recall, 0.0);
    EXPECT_LE(recall, 1.0 + 1e-9);
    EXPECT_GE(h.at("output_rel_error").get<double>(), 0.0);
    EXPECT_NE(h.at("pattern").get<std::string>(), "dense");
    layers.insert(h.at("layer").get<int>());
  }
  EXPECT_GE(layers.size(), 2u) << out;  // every layer audits its own heads
}

// The coordinator owns the KV-head placement (issue 14): a tp 2 group of the stories15M
// shape (6 KV heads, 3 per rank) under a policy whose heads 0 and 1 are dense (block-sparse
// top-100) and 2..5 keep one block: the contiguous placement would put both heavy heads on
// rank 0 (1.33 of balanced), so the plan moves them apart; the job reports the move and a
// tp imbalance within 1.10, and its ids equal the single-process generate's under the same
// policy. The same job again and a dense job after it move nothing (the plan keeps the
// placement the group holds while it stays balanced).
TEST(ServiceE2E, CoordinatorPlacesKvHeadsAndTheGroupRunsThem) {
  const std::string model_spec = "random:stories15m:3";
  Service s(model_spec, 2, 2, "tpplace");
  const std::string policy_file = s.dir + "/skew.json";
  {
    std::ofstream f(policy_file);
    f << "[";
    for (int l = 0; l < 6; ++l) {
      f << (l ? ", " : "") << "{";
      for (int h = 0; h < 6; ++h)
        f << (h ? ", " : "") << "\"" << h << "\": [\"block_sparse\", " << (h < 2 ? 100 : 1)
          << ", 0, 0]";
      f << "}";
    }
    f << "]";
  }
  std::string ids;
  for (int i = 0; i < 240; ++i) {  // + 8 decoded within max_position 256
    if (i) ids += ',';
    ids += std::to_string(5 + (i * 7919) % 30000);
  }
  const std::string sparse = " --sparse " + quote(policy_file) + " --dense-below 1";
  auto submit = [&](const std::string& extra) {
    std::string out;
    const int rc = t::run_command(
        s.cli("submit") + " --prompt-ids " + ids + extra + " --decode 8 --json 2>&1", &out);
    EXPECT_EQ(rc, 0) << out << s.logs();
    const json j = last_json(out);
    EXPECT_TRUE(j.is_object()) << out;
    EXPECT_EQ(j.value("status", ""), "DONE") << out << s.logs();
    return j;
  };
  auto generate = [&](const std::string& extra) {
    std::string out;
    const int rc = t::run_command(bin("mprefill") + " generate --model " + model_spec +
                                      " --prompt-ids " + ids + extra + " --decode 8 --json 2>&1",
                                  &out);
    EXPECT_EQ(rc, 0) << out;
    return last_json(out);
  };
  const json first = submit(sparse);
  ASSERT_TRUE(first.contains("tp_replaced")) << first.dump();
  EXPECT_TRUE(first.at("tp_replaced").get<bool>()) << first.dump();
  EXPECT_LE(first.at("tp_imbalance").get<double>(), 1.10) << first.dump();
  EXPECT_GE(first.at("tp_replace_ms").get<double>(), 0.0);
  const json ref = generate(sparse);
  ASSERT_TRUE(ref.is_object());
  EXPECT_EQ(ids_of(first), ids_of(ref));
  const json again = submit(sparse);
  EXPECT_FALSE(again.at("tp_replaced").get<bool>()) << again.dump();
  EXPECT_EQ(ids_of(again), ids_of(first));
  const json dense = submit("");
  EXPECT_FALSE(dense.at("tp_replaced").get<bool>()) << dense.dump();
  EXPECT_DOUBLE_EQ(dense.at("tp_imbalance").get<double>(), 1.0);
  EXPECT_EQ(ids_of(dense), ids_of(generate("")));
}

// A bf16 model through the service (stories15M converted by mprefill-convert --dtype bf16):
// the KV crosses as bf16 pages (half the fp32 bytes), the decoder's ids equal an fp32-KV
// reference whose KV was rounded to bf16, and the capacity counts bf16 bytes (a decoder
// of 1 MiB takes 100 tokens, 6912 bytes each, that would need 1.3 MiB in fp32; 200 tokens
// are refused with the byte numbers).
TEST(ServiceE2E, Bf16ModelHandsOffBf16Kv) {
  SKIP_WITHOUT_STORIES();
  const std::string dir = ::testing::TempDir() + "/bf16_" + std::to_string(::getpid());
  const std::string hf = dir + "/stories15M_bf16";
  std::string out;
  ASSERT_EQ(t::run_command(bin("mprefill-convert") + " --in " + quote(model()) + " --out " +
                               quote(hf) + " --dtype bf16 --force 2>&1",
                           &out),
            0)
      << out;
  auto ids_csv = [](int n) {
    std::vector<int> ids{1};
    for (int i = 1; i < n; ++i) ids.push_back(3 + (i * 7919) % 31000);
    std::string s;
    for (int id : ids) {
      if (!s.empty()) s += ',';
      s += std::to_string(id);
    }
    return std::make_pair(ids, s);
  };
  const auto [ids, csv] = ids_csv(100);

  // Reference: fp32 prefill, its KV rounded to bf16, 16 greedy decode steps.
  const mprefill::ModelWeights w = mprefill::load_model(hf);
  ASSERT_EQ(w.stored_dtype, mprefill::DType::kBF16);
  mprefill::Engine eng(w);
  mprefill::KvCache f32(w.config, 100);
  const std::vector<float> logits = eng.prefill(ids, mprefill::SparsePolicy::dense(), &f32);
  mprefill::Sampler sampler(mprefill::SamplerOptions{});
  std::vector<int> want{sampler.sample(logits.data(), static_cast<int>(logits.size())).id};
  mprefill::KvCache b16 = mprefill::round_to_bf16(f32, 100 + 16);
  for (int step = 0; step < 16; ++step) {
    const std::vector<float> lg = eng.decode_step(want.back(), 100 + step, &b16);
    want.push_back(sampler.sample(lg.data(), static_cast<int>(lg.size())).id);
  }

  Service s(hf, 2, 1, "bf16", {"--capacity-mb", "1"});
  ASSERT_EQ(
      t::run_command(s.cli("submit") + " --prompt-ids " + csv + " --decode 16 --json 2>&1", &out),
      0)
      << out << s.logs();
  const json j = last_json(out);
  ASSERT_TRUE(j.is_object()) << out;
  EXPECT_EQ(j.value("status", ""), "DONE") << out << s.logs();
  // (a) bf16 on the wire: 2 x 6 layers x 6 heads x 48 x 2 bytes per token.
  EXPECT_EQ(j.at("kv_bytes_handed_off").get<uint64_t>(), kKvPerToken / 2 * 100) << out;
  // (b) the first token, and every decoded one, as the rounded-KV reference gives them.
  ASSERT_FALSE(ids_of(j).empty()) << out;
  EXPECT_EQ(ids_of(j)[0], want[0]) << out;
  EXPECT_EQ(ids_of(j), want) << out;
  // (c) a job that does not fit is refused with the byte numbers.
  const int rc = t::run_command(
      s.cli("submit") + " --prompt-ids " + ids_csv(200).second + " --decode 4 --json 2>&1", &out);
  EXPECT_NE(rc, 0) << out;
  EXPECT_NE(out.find("RESOURCE_EXHAUSTED"), std::string::npos) << out;
  EXPECT_NE(out.find("x 2 bytes per token"), std::string::npos) << out;
  EXPECT_NE(out.find("largest decoder capacity is 1.00 MiB (1048576 bytes)"), std::string::npos)
      << out;
  std::filesystem::remove_all(dir);
}

// Issue 19's equality check, on the CPU service path: the long-context probe model's
// retrieval samples (models/probe-kv32k/retrieval_1k.jsonl) through the coordinator, one
// 4-rank worker group and the decoder, at tp 1 x sp 4 and tp 2 x sp 2, give the ids of
// single-process `generate`: dense (then also the samples' answers) and under the searched
// config (docs/probe/searched_8k_b0.1.json: block-sparse and vertical-slash heads whose
// indices the group estimates over its sp ranks).
namespace {

struct ProbeSample {
  std::string ids_file;
  std::vector<int> answer;
};

std::string probe_dir() { return t::source_dir() + "/models/probe-kv32k"; }
std::string probe_config() { return t::source_dir() + "/docs/probe/searched_8k_b0.1.json"; }

std::vector<ProbeSample> probe_samples(const std::string& dir) {
  std::vector<ProbeSample> out;
  std::istringstream in(read_file(probe_dir() + "/retrieval_1k.jsonl"));
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const json j = json::parse(line);
    std::string csv;
    for (int id : j.at("ids").get<std::vector<int>>())
      csv += (csv.empty() ? "" : ",") + std::to_string(id);
    ProbeSample s;
    s.ids_file = dir + "/probe" + std::to_string(out.size()) + ".ids";
    std::ofstream(s.ids_file) << csv;
    s.answer = j.at("answer").get<std::vector<int>>();
    out.push_back(s);
  }
  return out;
}

std::string probe_args(const ProbeSample& s, const std::string& sparse) {
  return "--prompt-ids \"$(cat " + quote(s.ids_file) + ")\" --decode 1 --sparse " + quote(sparse) +
         " --dense-below 0 --json 2>&1";
}

void check_probe_through_service(int tp) {
  MPREFILL_SKIP_IF_MISSING(probe_dir() + "/model.safetensors");
  SKIP_WITHOUT_STORIES();  // the coordinator's tokenizer
  const std::string dir =
      ::testing::TempDir() + "/probe_tp" + std::to_string(tp) + "_" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  const std::vector<ProbeSample> samples = probe_samples(dir);
  ASSERT_EQ(samples.size(), 8u);
  Service s(probe_dir(), 4, tp, "probe" + std::to_string(tp));
  int dense_right = 0;
  for (const ProbeSample& p : samples) {
    for (const std::string& sparse : {std::string("dense"), probe_config()}) {
      std::string ref_out, out;
      ASSERT_EQ(t::run_command(bin("mprefill") + " generate --model " + quote(probe_dir()) + " " +
                                   probe_args(p, sparse),
                               &ref_out),
                0)
          << ref_out;
      ASSERT_EQ(t::run_command(s.cli("submit") + " " + probe_args(p, sparse), &out), 0)
          << out << s.logs();
      const json ref = last_json(ref_out), j = last_json(out);
      ASSERT_TRUE(j.is_object()) << out;
      EXPECT_EQ(j.value("status", ""), "DONE") << out;
      EXPECT_EQ(j.at("rank_breakdown").size(), 4u) << out;
      EXPECT_EQ(ids_of(j), ids_of(ref)) << p.ids_file << " " << sparse << "\n" << out;
      // What ran, over the group, as generate counts it: --dense-below 0 reaches the
      // workers (before, 0 on the wire meant the 32768 default and every head ran dense).
      EXPECT_EQ(j.at("sparse").at("heads_run"), ref.at("sparse").at("heads_run")) << out;
      EXPECT_EQ(j.at("sparse").at("heads_run").at("dense").get<int>(), sparse == "dense" ? 16 : 0)
          << out;
      if (sparse == "dense") dense_right += ids_of(j) == p.answer;
    }
  }
  EXPECT_EQ(dense_right, 8);  // every sample answered (tests/cpu/probe_model_test.cc: 8 of 8)
  // Without --json the DONE line names what ran (the searched config: layers 0, 2, 3
  // block-sparse, layer 1 vertical-slash, 4 heads each).
  std::string out;
  std::string args = probe_args(samples[0], probe_config());
  args.erase(args.find(" --json"), 7);
  ASSERT_EQ(t::run_command(s.cli("submit") + " " + args, &out), 0) << out;
  EXPECT_NE(out.find("heads: vertical_slash x4, block_sparse x12"), std::string::npos) << out;
  std::filesystem::remove_all(dir);
}

}  // namespace

TEST(ServiceE2E, ProbeAnswersAtTp1Sp4EqualTheEngine) { check_probe_through_service(1); }
TEST(ServiceE2E, ProbeAnswersAtTp2Sp2EqualTheEngine) { check_probe_through_service(2); }
