// mprefill-decoder: the reference decoder of the prefill service (issue 6). Loads the
// model, listens for worker KV streams, registers with the coordinator (endpoint,
// capacity, KV contract), then receives each job's KV pages into its paged store and
// continues generation from the first token (decode/decoder.h).
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include "decode/decoder.h"
#include "kernels/cpu/cpu.h"
#include "kernels/edge_check.h"
#include "kv/kv_handoff.h"
#include "kv/kv_transport.h"
#include "model/fingerprint.h"
#include "model/weights.h"
#include "proto/tls.h"
#include "proto/wire.h"
#include "tools/cli_args.h"

namespace {

using mprefill::cli::hostname;
using mprefill::cli::parse_int;
using mprefill::cli::UsageError;

using namespace mprefill;

const char* kUsage =
    "usage: mprefill-decoder --coordinator HOST:PORT --model PATH [--name NAME]\n"
    "                        [--listen HOST:PORT] [--advertise HOST] [--capacity-mb MB]\n"
    "                        [--max-jobs N] [--page-tokens P] [--timeout-ms MS]\n"
    "                        [--secret-file F] [--threads N] [--device cpu|cuda[:N]]\n"
    "                        [--reconnect-s S] [--max-frame BYTES]\n"
    "                        [--tls-cert F --tls-key F] [--insecure]\n"
    "The reference decoder: receives the KV pages of each job from the worker ranks over\n"
    "TCP (or, --device cuda, by NCCL or into its GPU memory over CUDA IPC), then continues\n"
    "generation from the first token on the CPU (the KV keeps the model's dtype).\n"
    "  --coordinator HOST:PORT  the coordinator to register with\n"
    "  --model PATH             the weights the worker groups serve (HF directory, llama2.c\n"
    "                           .bin, random:NAME[:SEED]); the fingerprint must match\n"
    "  --name NAME              decoder name (default decoder-HOSTNAME-PID)\n"
    "  --listen HOST:PORT       KV port bind address (default 127.0.0.1:0, any free port);\n"
    "                           beyond loopback it needs --tls-cert/--tls-key and\n"
    "                           --secret-file, or --insecure\n"
    "  --advertise HOST         host workers connect to (default: the --listen host)\n"
    "  --capacity-mb MB         KV memory for all jobs (default 2048)\n"
    "  --max-jobs N             jobs held at once (default 4)\n"
    "  --page-tokens P          tokens per KV page (default 256; the workers must agree)\n"
    "  --timeout-ms MS          fail a job whose pages stop for this long when the\n"
    "                           coordinator's Expect gives none (default 30000)\n"
    "  --secret-file F          shared secret: proof to the coordinator, required of workers\n"
    "  --tls-cert F, --tls-key F  TLS 1.3 on the KV port (PEM chain and key): workers\n"
    "                           connect with TLS (and verify it with their --tls-ca)\n"
    "  --insecure               allow a non-loopback --listen without TLS or --secret-file\n"
    "                           (warns)\n"
    "  --threads N              CPU threads (default: all cores or MPREFILL_THREADS)\n"
    "  --device cpu|cuda[:N]    cuda: also serve kv_transport ipc (same-host worker ranks\n"
    "                           copy K/V into this decoder's memory on GPU N, where it stays)\n"
    "                           and nccl (K/V received on GPU N; CUDA builds with NCCL);\n"
    "                           decoding stays on the CPU (default N: 0)\n"
    "  --reconnect-s S          a lost coordinator: re-register for up to S s (backoff 0.1 s\n"
    "                           doubling to 2 s; its jobs are dropped), then exit 1\n"
    "                           (default 60; 0: exit 1 at once)\n"
    "  --max-frame BYTES        frame limit on the KV port after a stream's hello (default\n"
    "                           67108864; at least one KV page; before the hello: 65536)\n"
    "Exit status: 0 on SIGINT/SIGTERM; 1 on a failure (model, refused registration, a\n"
    "coordinator that did not come back within --reconnect-s); 2 on bad arguments.\n";

std::atomic<bool> g_signalled{false};
void on_signal(int) { g_signalled = true; }

}  // namespace

int main(int argc, char** argv) {
  std::string coordinator, model, listen = "127.0.0.1:0", secret_file;
  decode::DecoderOptions opt;
  opt.name.clear();
  int threads = 0;
  long long capacity_mb = 2048;
  bool help = false;
  int gpu = -1;  // --device cuda[:N]
  try {
    mprefill::cli::FlagReader r(argc - 1, argv + 1);  // past the program name
    while (r.next()) {
      const std::string& flag = r.flag();
      auto value = [&] { return r.value(); };
      if (flag == "--help" || flag == "-h")
        help = true;
      else if (flag == "--coordinator")
        coordinator = value();
      else if (flag == "--model")
        model = value();
      else if (flag == "--name")
        opt.name = value();
      else if (flag == "--listen")
        listen = value();
      else if (flag == "--advertise")
        opt.advertise_host = value();
      else if (flag == "--capacity-mb")
        capacity_mb = parse_int(flag, value(), 1, 1LL << 30);
      else if (flag == "--max-jobs")
        opt.receiver.max_jobs = static_cast<int>(parse_int(flag, value(), 1, 1 << 16));
      else if (flag == "--page-tokens")
        opt.page_tokens = static_cast<int>(parse_int(flag, value(), 1, 1 << 20));
      else if (flag == "--timeout-ms")
        opt.receiver.default_timeout_ms = static_cast<int>(parse_int(flag, value(), 100, 86400000));
      else if (flag == "--secret-file")
        secret_file = value();
      else if (flag == "--tls-cert")
        opt.receiver.tls_cert = value();
      else if (flag == "--tls-key")
        opt.receiver.tls_key = value();
      else if (flag == "--insecure")
        opt.receiver.insecure = true;
      else if (flag == "--threads")
        threads = static_cast<int>(parse_int(flag, value(), 1, 4096));
      else if (flag == "--max-frame")
        opt.receiver.max_frame =
            static_cast<size_t>(parse_int(flag, value(), 1024, int64_t{1} << 30));
      else if (flag == "--reconnect-s")
        opt.reconnect_s = static_cast<int>(parse_int(flag, value(), 0, 86400));
      else if (flag == "--device") {
        const std::string d = value();
        if (d == "cpu")
          gpu = -1;
        else if (d == "cuda")
          gpu = 0;
        else if (d.rfind("cuda:", 0) == 0)
          gpu = static_cast<int>(parse_int(flag, d.substr(5), 0, 1023));
        else
          throw UsageError("--device must be cpu, cuda or cuda:N, got '" + d + "'");
      } else
        throw UsageError("unknown option '" + r.arg() + "' (see --help)");
    }
    if (help) {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (coordinator.empty()) throw UsageError("--coordinator HOST:PORT is required");
    if (model.empty()) throw UsageError("--model PATH is required");
    const size_t colon = listen.rfind(':');  // port 0 (any free port) is allowed here
    if (colon == std::string::npos || colon == 0)
      throw UsageError("--listen expects HOST:PORT, got '" + listen + "'");
    opt.receiver.listen_host = listen.substr(0, colon);
    opt.receiver.listen_port =
        static_cast<uint16_t>(parse_int("--listen port", listen.substr(colon + 1), 0, 65535));
  } catch (const UsageError& e) {
    std::fprintf(stderr, "mprefill-decoder: error: %s\n", e.what());
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  // Before the model load: a SIGTERM at any point after the arguments parse ends with exit 0
  // (measured under ASan in CI: the load outlasted a fixed 1.5 s, and the default action
  // killed the process with 128 + 15).
  signal(SIGINT, on_signal);
  signal(SIGTERM, on_signal);
  if (threads > 0) cpu::set_num_threads(threads);
  set_edge_context(-1, gpu, "decoder");  // every StatusError names the decoder (no rank)
  try {
    std::string host;
    uint16_t port = 0;
    wire::parse_host_port(coordinator, &host, &port);
    std::string secret;
    if (!secret_file.empty()) secret = wire::load_secret_file(secret_file);
    opt.receiver.secret = secret;
    opt.receiver.capacity_bytes = static_cast<uint64_t>(capacity_mb) << 20;
    if (opt.name.empty()) opt.name = "decoder-" + hostname() + "-" + std::to_string(getpid());
    opt.model_name = model_name_from_path(model);
    opt.receiver.payload = kv::receiver_payloads(gpu);  // throws when this build cannot
    opt.kv_transports = kv::receiver_transports(opt.receiver.payload);
    const ModelWeights w = load_model(model);
    decode::Decoder d(w, opt);
    if (d.receiver().insecure_open())
      std::fprintf(stderr, "mprefill-decoder: warning: %s\n",
                   wire::insecure_warning(opt.receiver.listen_host, d.receiver().tls()).c_str());
    if (g_signalled) {
      std::fprintf(stderr, "mprefill-decoder: stopping (signal)\n");
      return 0;
    }
    std::atomic<bool> done{false};
    std::thread watcher([&] {  // stop() is not async-signal-safe: call it from here
      while (!done) {
        if (g_signalled) {
          std::fprintf(stderr, "mprefill-decoder: stopping (signal)\n");
          d.stop();
          return;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    });
    const int rc = d.serve(host, port, secret);
    done = true;
    watcher.join();
    return rc;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mprefill-decoder: error: %s\n", e.what());
    return 1;
  }
}
