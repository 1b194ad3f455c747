// `mprefill run`: a coordinator in this process, a decoder and an mpirun worker group as
// children (own process groups, stopped on every exit path), one job, its result.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <thread>
#include <vector>

#include "coordinator/coordinator.h"
#include "proto/hmac.h"
#include "tools/service_children.h"
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
  // NCCL's own bootstrap listener (a group's ncclGetUniqueId, the decoder's NCCL KV
  // transport) binds the interface NCCL picks, and NCCL skips lo: every process of this
  // one-host run keeps it on lo unless the user chose an interface (issue 17).
  std::vector<std::string> nccl_env;
  if (!std::getenv("NCCL_SOCKET_IFNAME")) nccl_env.push_back("NCCL_SOCKET_IFNAME=lo");
  decoder.spawn(dargs, nccl_env);
  cleanup.children.push_back(&decoder);

  std::vector<std::string> wargs = {a.mpirun, "-np", std::to_string(a.ranks)};
  std::vector<std::string> wenv;
  if (a.device == "cpu") {
    // CPU ranks share the cores: no binding, oversubscription allowed.
    for (const char* f : {"--oversubscribe", "--bind-to", "none"}) wargs.push_back(f);
  }
  // Every rank is on this host: MPI stays off the network (issue 17). Shared memory only
  // between ranks (each rank's TCP BTL listened on 0.0.0.0:1024+, and with it merely
  // excluded the OFI BTL on the host address), the runtime's out-of-band channel on lo.
  // OpenMPI 4.1's OOB listener in mpirun itself still binds the wildcard address whatever
  // oob_tcp_if_include says (measured with ss): a host firewall closes that one.
  for (const char* f : {"--mca", "btl", "self,vader", "--mca", "oob_tcp_if_include", "lo"})
    wargs.push_back(f);
  if (::geteuid() == 0) wenv = {"OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"};
  wenv.insert(wenv.end(), nccl_env.begin(), nccl_env.end());
  for (const char* f : {"-x", "NCCL_SOCKET_IFNAME"})
    if (!nccl_env.empty()) wargs.push_back(f);
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
  cleanup.stop_children();
  return rc;
}

}  // namespace mprefill::cli
