// `mprefill run`: a coordinator in this process, a decoder and an mpirun worker group as
// children (own process groups, stopped on every exit path), one job, its result.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <thread>
#include <vector>

#include "coordinator/coordinator.h"
#include "proto/hmac.h"
#include "tools/service_client.h"

namespace mprefill::cli {

using Clock = std::chrono::steady_clock;

namespace {

std::string self_dir() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return ".";
  std::string p(buf, static_cast<size_t>(n));
  return p.substr(0, p.rfind('/'));
}

// Processes whose parent is pid (/proc/*/stat field 4).
std::vector<pid_t> children_of(pid_t pid) {
  std::vector<pid_t> out;
  DIR* d = ::opendir("/proc");
  if (!d) return out;
  while (dirent* e = ::readdir(d)) {
    const pid_t p = static_cast<pid_t>(std::atoi(e->d_name));
    if (p <= 0) continue;
    std::ifstream f("/proc/" + std::string(e->d_name) + "/stat");
    std::string stat;
    std::getline(f, stat);
    const size_t close = stat.rfind(')');  // the command name may hold spaces
    if (close == std::string::npos) continue;
    char state = 0;
    int ppid = 0;
    if (std::sscanf(stat.c_str() + close + 1, " %c %d", &state, &ppid) == 2 && ppid == pid)
      out.push_back(p);
  }
  ::closedir(d);
  return out;
}

// A child in its own process group (so that mpirun and every rank it starts can be
// signalled together); its stdout goes to our stderr (stdout stays clean for --json).
struct Child {
  std::string what;
  pid_t pid = -1;
  int status = 0;
  bool exited = false;

  void spawn(const std::vector<std::string>& args, const std::vector<std::string>& env_extra) {
    std::vector<char*> argv;
    for (const auto& s : args) argv.push_back(const_cast<char*>(s.c_str()));
    argv.push_back(nullptr);
    pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork failed for " + what + ": " + std::strerror(errno));
    if (pid == 0) {
      ::setpgid(0, 0);
      ::dup2(STDERR_FILENO, STDOUT_FILENO);
      signal(SIGINT, SIG_DFL);
      signal(SIGTERM, SIG_DFL);
      signal(SIGPIPE, SIG_DFL);
      for (const auto& e : env_extra) ::putenv(const_cast<char*>(e.c_str()));
      ::execvp(argv[0], argv.data());
      std::fprintf(stderr, "mprefill: error: cannot run %s: %s\n", argv[0], std::strerror(errno));
      ::_exit(127);
    }
    ::setpgid(pid, pid);  // also from the parent: no race with the signal below
  }
  // Non-blocking: true when it has exited (status recorded).
  bool poll() {
    if (pid <= 0 || exited) return exited;
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) exited = true;
    return exited;
  }
  std::string exit_text() const {
    if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
    if (WIFSIGNALED(status)) return "killed by signal " + std::to_string(WTERMSIG(status));
    return "ended";
  }
  // SIGTERM to the process group, up to grace_ms, then SIGKILL. children_first (mpirun):
  // SIGTERM goes to the leader's children (the ranks, in process groups of their own)
  // first: each stops at once and finalizes, and mpirun exits 0 with them (mpirun itself
  // signalled waits ~2 s before it forwards the signal, then exits 1). The leader's group
  // is signalled only if they have not ended within grace_ms / 2.
  void stop(int grace_ms, bool children_first = false) {
    if (pid <= 0 || poll()) return;
    const auto until = Clock::now() + std::chrono::milliseconds(grace_ms);
    auto wait_until = [&](Clock::time_point t) {
      while (Clock::now() < t && !poll())
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      return exited;
    };
    std::vector<pid_t> kids;
    if (children_first) {
      kids = children_of(pid);
      for (pid_t k : kids) ::kill(k, SIGTERM);
    }
    if (kids.empty() || !wait_until(Clock::now() + std::chrono::milliseconds(grace_ms / 2))) {
      ::kill(-pid, SIGTERM);
      wait_until(until);
    }
    for (pid_t k : kids) ::kill(k, SIGKILL);  // no-op for the ones that ended
    ::kill(-pid, SIGKILL);  // stragglers of the group (ranks) even when the leader exited
    if (!exited) {
      ::waitpid(pid, &status, 0);
      exited = true;
    }
  }
};

struct RunCleanup {
  std::vector<Child*> children;
  Child* mpirun = nullptr;  // stopped through its ranks (Child::stop children_first)
  std::string secret_path;
  // All at once (each stops within a few hundred ms; one after another would add up).
  void stop_children() {
    std::vector<std::thread> t;
    for (Child* c : children) t.emplace_back([c, this] { c->stop(5000, c == mpirun); });
    for (auto& th : t) th.join();
  }
  ~RunCleanup() {
    stop_children();
    if (!secret_path.empty()) ::unlink(secret_path.c_str());
  }
};

}  // namespace

int cmd_run(const ServiceArgs& a) {
  std::optional<Tokenizer> tok;
  if (!a.tokenizer.empty()) tok = Tokenizer::load(a.tokenizer);
  const PromptInput p = make_prompt(a, tok);
  const bool bar = !a.json && isatty(STDERR_FILENO);
  const v1::Envelope submit = make_submit(a, p, bar);  // reads a --sparse file before starting
  SigintGuard guard;
  const std::string bin = self_dir();
  for (const char* b : {"mprefill-worker", "mprefill-decoder"})
    if (::access((bin + "/" + b).c_str(), X_OK) != 0)
      throw std::runtime_error(std::string(b) + " not found next to mprefill (" + bin + ")");

  Child decoder{"mprefill-decoder"};
  Child workers{"mpirun group of mprefill-worker"};
  RunCleanup cleanup;  // after the children: stops them before they go out of scope
  // A fresh secret for this run: only the processes started here can join.
  const std::string nonce = wire::random_nonce();
  const std::string secret = wire::to_hex(nonce.data(), nonce.size());
  {
    char tmpl[] = "/tmp/mprefill-run-secret-XXXXXX";
    const int fd = ::mkstemp(tmpl);
    if (fd < 0) throw std::runtime_error("cannot create a secret file in /tmp");
    cleanup.secret_path = tmpl;
    ::fchmod(fd, 0600);
    if (::write(fd, secret.data(), secret.size()) != static_cast<ssize_t>(secret.size())) {
      ::close(fd);
      throw std::runtime_error("cannot write the secret file");
    }
    ::close(fd);
  }

  coord::CoordinatorOptions co;
  co.port = 0;
  co.secret = secret;
  co.tokenizer = a.tokenizer;
  co.max_prompt = a.max_prompt;
  co.config_dir = a.config_dir;
  co.log = std::getenv("MPREFILL_RUN_VERBOSE") != nullptr;
  coord::Coordinator coordinator(co);
  coordinator.start();
  const std::string addr = "127.0.0.1:" + std::to_string(coordinator.port());

  std::vector<std::string> dargs = {bin + "/mprefill-decoder",
                                    "--coordinator",
                                    addr,
                                    "--model",
                                    a.model,
                                    "--name",
                                    "run-decoder",
                                    "--secret-file",
                                    cleanup.secret_path,
                                    "--device",
                                    a.decoder_device};
  decoder.spawn(dargs, {});
  cleanup.children.push_back(&decoder);

  std::vector<std::string> wargs = {a.mpirun, "-np", std::to_string(a.ranks)};
  std::vector<std::string> wenv;
  if (a.device == "cpu") {
    // CPU ranks share the cores: no binding, oversubscription allowed.
    for (const char* f : {"--oversubscribe", "--bind-to", "none"}) wargs.push_back(f);
  }
  if (::geteuid() == 0) wenv = {"OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"};
  for (const auto& s :
       std::vector<std::string>{bin + "/mprefill-worker", "--coordinator", addr, "--model", a.model,
                                "--tp", std::to_string(a.tp), "--device", a.device, "--group",
                                "run", "--secret-file", cleanup.secret_path})
    wargs.push_back(s);
  workers.spawn(wargs, wenv);
  cleanup.children.push_back(&workers);
  cleanup.mpirun = &workers;

  auto children_ok = [&]() -> std::string {
    if (workers.poll()) return "the worker group (" + a.mpirun + ") " + workers.exit_text();
    if (decoder.poll()) return "mprefill-decoder " + decoder.exit_text();
    return "";
  };

  auto c = dial(addr, wire::Credential{"", secret});
  // Wait for the group and the decoder to register.
  const auto until = Clock::now() + std::chrono::seconds(a.startup_timeout_s);
  for (;;) {
    if (g_interrupted) {
      std::fputs("mprefill: error: interrupted while starting\n", stderr);
      return 130;
    }
    const std::string bad = children_ok();
    if (!bad.empty()) throw std::runtime_error(bad + " before registering");
    const v1::StatusReply st = request_status(*c, 0);
    if (st.groups_size() > 0 && st.decoders_size() > 0) break;
    if (Clock::now() > until)
      throw std::runtime_error("the worker group and decoder did not register within " +
                               std::to_string(a.startup_timeout_s) + " s (--startup-timeout-s)");
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  const Outcome o = follow_job(*c, submit, a.timeout_s, bar, false, children_ok);
  nlohmann::json extra = {{"device", a.device},
                          {"ranks", a.ranks},
                          {"tp", a.tp},
                          {"sp", a.ranks / a.tp},
                          {"decoder_device", a.decoder_device},
                          {"kv_transport", a.kv_transport.empty() ? "tcp" : a.kv_transport}};
  const int rc = print_outcome(o, a, p, tok, extra);
  c->close();
  // The children stop while the coordinator still serves: none of them sees it vanish
  // (which started their re-registration and held the exit for seconds).
  const auto t_stop = Clock::now();
  cleanup.stop_children();
  if (std::getenv("MPREFILL_RUN_VERBOSE"))
    std::fprintf(stderr, "mprefill: children stopped in %.3f s (decoder %s, workers %s)\n",
                 std::chrono::duration<double>(Clock::now() - t_stop).count(),
                 decoder.exit_text().c_str(), workers.exit_text().c_str());
  return rc;
}

}  // namespace mprefill::cli
