// mprefill-coordinator: the service front end (issue 6). Worker groups (rank 0 of each
// mpirun group), decoders and clients connect to --port; Prometheus metrics on
// --metrics-port. Runs until SIGINT / SIGTERM.
//
// Exit status: 0 after a signal; 1 a runtime error (one line on stderr); 2 a usage error.
#include <malloc.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "coordinator/coordinator.h"
#include "proto/tls.h"
#include "tools/cli_args.h"

namespace {

using mprefill::cli::parse_int;
using mprefill::cli::UsageError;

const char* kUsage =
    "usage: mprefill-coordinator [--host ADDR] [--port P] [--metrics-port P]\n"
    "                            [--secret-file F] [--client-keys F] [--client-max-jobs N]\n"
    "                            [--client-max-queued-tokens N] [--max-pre-hello N]\n"
    "                            [--hello-timeout-ms MS] [--max-large-frame-bytes B]\n"
    "                            [--tls-cert F --tls-key F] [--insecure]\n"
    "                            [--tokenizer PATH] [--max-prompt N]\n"
    "                            [--config-dir DIR] [--max-prompt-bytes B]\n"
    "                            [--max-config-bytes B] [--max-tag-bytes B]\n"
    "                            [--queue-limit N] [--max-jobs-per-client N]\n"
    "                            [--threads N] [--heartbeat-ms MS]\n"
    "                            [--heartbeat-timeout-ms MS] [--handoff-timeout-ms MS]\n"
    "                            [--max-connections N] [--max-frame BYTES]\n"
    "                            [--max-client-frame B] [--frame-timeout-ms MS]\n"
    "                            [--port-file F] [--quiet]\n"
    "  --host ADDR             bind address (default 127.0.0.1; 0.0.0.0 for all)\n"
    "  --port P                service port (default 7070; 0: any free port)\n"
    "  --metrics-port P        Prometheus text metrics over HTTP GET /metrics (default off;\n"
    "                          0: any free port)\n"
    "  --secret-file F         infrastructure secret: worker groups and decoders prove it\n"
    "                          (HMAC-SHA256); clients too unless --client-keys is given\n"
    "  --client-keys F         one key per client: lines \"NAME SECRET [client|admin]\";\n"
    "                          a client sees and cancels only its own jobs (admin: all);\n"
    "                          re-read on change or SIGHUP (removed keys are cut off)\n"
    "  --tls-cert F, --tls-key F  TLS 1.3 on the service and metrics ports (PEM chain and\n"
    "                          key); required beyond loopback, with --secret-file\n"
    "  --insecure              allow a non-loopback --host without TLS or credentials\n"
    "                          (warns; mprefill_insecure 1 in /metrics)\n"
    "  --client-max-jobs N     unfinished jobs of one client key (default 16)\n"
    "  --client-max-queued-tokens N  prompt tokens of one key's queued jobs (default 4194304)\n"
    "  --max-pre-hello N       connections before their hello (default 512; the oldest is\n"
    "                          closed for a new one); not counted in --max-connections\n"
    "  --hello-timeout-ms MS   hello deadline of a new connection (default 3000)\n"
    "  --max-large-frame-bytes B  client frames over 256 KiB held at once (2x each: bytes\n"
    "                          and parsed), all connections (default 16777216, >= 2x the\n"
    "                          client frame limit)\n"
    "  --tokenizer PATH        llama2.c tokenizer.bin: text prompts and result text\n"
    "  --max-prompt N          prompt limit in tokens (default: the model's max position)\n"
    "  --config-dir DIR        sparse configs clients choose by name: --sparse NAME reads\n"
    "                          DIR/NAME.json (regular files; no links, no paths); without\n"
    "                          it only dense, auto and configs sent inline\n"
    "  --max-prompt-bytes B    text prompts at most B bytes, refused before tokenizing\n"
    "                          (default 1048576; longer prompts: send token ids)\n"
    "  --max-config-bytes B    sparse configs (inline or in --config-dir) at most B bytes\n"
    "                          (default 4194304)\n"
    "  --max-tag-bytes B       client_tag at most B bytes (default 1024)\n"
    "  --queue-limit N         queued jobs at most (default 64)\n"
    "  --max-jobs-per-client N unfinished jobs of one client connection (default 16)\n"
    "  --threads N             io threads (default 2)\n"
    "  --heartbeat-ms MS       heartbeat period asked of groups and decoders (default 1000)\n"
    "  --heartbeat-timeout-ms  silence after which a group / decoder is dead (default 10000)\n"
    "  --handoff-timeout-ms    bound on each KV handoff wait (default 60000)\n"
    "  --max-connections N     authenticated connections, all roles (default 256); one more\n"
    "                          gets Error RESOURCE_EXHAUSTED and is closed\n"
    "  --max-frame BYTES       frame size limit after the hello (default 67108864; before\n"
    "                          it: 65536 at most)\n"
    "  --max-client-frame BYTES  a client's frames after the hello (default 8388608: 1M\n"
    "                          token ids and an inline config; never over --max-frame)\n"
    "  --frame-timeout-ms MS   a frame begun must be complete within MS (default 30000)\n"
    "  --port-file F           write \"PORT METRICS_PORT\" to F once listening\n"
    "  --quiet                 no event log on stderr\n";

volatile std::sig_atomic_t g_signal = 0, g_reload = 0;
void on_signal(int sig) { g_signal = sig; }
void on_hup(int) { g_reload = 1; }

}  // namespace

int main(int argc, char** argv) {
  // Blocks over 1 MiB (client frames and their parsed messages, up to --max-client-frame)
  // are mmapped and go back to the system when freed; glibc's default threshold rises
  // after the first such free and keeps them in per-thread arenas (measured: a 7 MiB text
  // flood held +28 MiB beyond the 16 MiB grant budget).
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
  mprefill::coord::CoordinatorOptions opt;
  opt.port = 7070;
  std::string port_file;
  try {
    mprefill::cli::FlagReader r(argc - 1, argv + 1);  // past the program name
    while (r.next()) {
      const std::string& flag = r.flag();
      auto value = [&] { return r.value(); };
      if (flag == "--help" || flag == "-h") {
        std::fputs(kUsage, stdout);
        return 0;
      } else if (flag == "--host") {
        opt.host = value();
      } else if (flag == "--port") {
        opt.port = static_cast<uint16_t>(parse_int(flag, value(), 0, 65535));
      } else if (flag == "--metrics-port") {
        opt.metrics_port = static_cast<int>(parse_int(flag, value(), 0, 65535));
      } else if (flag == "--secret-file") {
        opt.secret = mprefill::wire::load_secret_file(value());
      } else if (flag == "--tls-cert") {
        opt.tls_cert = value();
      } else if (flag == "--tls-key") {
        opt.tls_key = value();
      } else if (flag == "--insecure") {
        opt.insecure = true;
      } else if (flag == "--client-keys") {
        opt.client_keys = value();
      } else if (flag == "--client-max-jobs") {
        opt.client_max_jobs = static_cast<int>(parse_int(flag, value(), 1, 1 << 20));
      } else if (flag == "--client-max-queued-tokens") {
        opt.client_max_queued_tokens = parse_int(flag, value(), 1, int64_t{1} << 40);
      } else if (flag == "--max-pre-hello") {
        opt.max_pre_hello = static_cast<int>(parse_int(flag, value(), 1, 1 << 20));
      } else if (flag == "--hello-timeout-ms") {
        opt.hello_timeout_ms = static_cast<int>(parse_int(flag, value(), 10, 600000));
      } else if (flag == "--max-large-frame-bytes") {
        opt.max_large_frame_bytes =
            static_cast<size_t>(parse_int(flag, value(), 1024, int64_t{1} << 40));
      } else if (flag == "--tokenizer") {
        opt.tokenizer = value();
      } else if (flag == "--max-prompt") {
        opt.max_prompt = parse_int(flag, value(), 1, 1LL << 40);
      } else if (flag == "--config-dir") {
        opt.config_dir = value();
      } else if (flag == "--max-prompt-bytes") {
        opt.max_prompt_bytes = static_cast<size_t>(parse_int(flag, value(), 1, int64_t{1} << 30));
      } else if (flag == "--max-config-bytes") {
        opt.max_config_bytes = static_cast<size_t>(parse_int(flag, value(), 1, int64_t{1} << 30));
      } else if (flag == "--max-tag-bytes") {
        opt.max_tag_bytes = static_cast<size_t>(parse_int(flag, value(), 0, int64_t{1} << 20));
      } else if (flag == "--queue-limit") {
        opt.queue_limit = static_cast<int>(parse_int(flag, value(), 0, 1 << 20));
      } else if (flag == "--max-jobs-per-client") {
        opt.max_jobs_per_client = static_cast<int>(parse_int(flag, value(), 1, 1 << 20));
      } else if (flag == "--threads") {
        opt.threads = static_cast<int>(parse_int(flag, value(), 1, 256));
      } else if (flag == "--heartbeat-ms") {
        opt.heartbeat_ms = static_cast<int>(parse_int(flag, value(), 10, 600000));
      } else if (flag == "--heartbeat-timeout-ms") {
        opt.heartbeat_timeout_ms = static_cast<int>(parse_int(flag, value(), 10, 3600000));
      } else if (flag == "--handoff-timeout-ms") {
        opt.handoff_timeout_ms = static_cast<int>(parse_int(flag, value(), 10, 3600000));
      } else if (flag == "--max-connections") {
        opt.max_connections = static_cast<int>(parse_int(flag, value(), 1, 1 << 20));
      } else if (flag == "--max-frame") {
        opt.max_frame = static_cast<size_t>(parse_int(flag, value(), 1024, int64_t{1} << 30));
      } else if (flag == "--max-client-frame") {
        opt.max_client_frame =
            static_cast<size_t>(parse_int(flag, value(), 1024, int64_t{1} << 30));
      } else if (flag == "--frame-timeout-ms") {
        opt.frame_timeout_ms = static_cast<int>(parse_int(flag, value(), 10, 3600000));
      } else if (flag == "--port-file") {
        port_file = value();
      } else if (flag == "--quiet") {
        opt.log = false;
      } else {
        throw UsageError("unknown option '" + r.arg() + "'");
      }
    }
    if (opt.heartbeat_timeout_ms < opt.heartbeat_ms)
      throw UsageError("--heartbeat-timeout-ms must be >= --heartbeat-ms");
  } catch (const UsageError& e) {
    std::fprintf(stderr, "mprefill-coordinator: error: %s\n", e.what());
    std::fputs(kUsage, stderr);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mprefill-coordinator: error: %s\n", e.what());
    return 1;
  }

  try {
    // Signals are blocked in every thread but this one's sigwait-like loop.
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);
    std::signal(SIGPIPE, SIG_IGN);
    std::signal(SIGHUP, on_hup);
    mprefill::coord::Coordinator c(opt);
    c.start();
    const std::string metrics =
        c.metrics_port() ? ", metrics on " + opt.host + ":" + std::to_string(c.metrics_port()) : "";
    std::fprintf(stderr, "mprefill-coordinator: listening on %s:%u%s%s\n", opt.host.c_str(),
                 c.port(), metrics.c_str(), opt.tls_cert.empty() ? "" : " (TLS)");
    if (c.metrics_text().find("\nmprefill_insecure 1") != std::string::npos)
      std::fprintf(stderr, "mprefill-coordinator: warning: %s\n",
                   mprefill::wire::insecure_warning(opt.host, !opt.tls_cert.empty()).c_str());
    if (!opt.client_keys.empty())
      std::fprintf(stderr, "mprefill-coordinator: client keys from %s (SIGHUP re-reads them)\n",
                   opt.client_keys.c_str());
    else if (!opt.secret.empty())
      std::fprintf(stderr,
                   "mprefill-coordinator: warning: clients prove the infrastructure secret "
                   "(no --client-keys): every client can see every job and act as a worker\n");
    if (!opt.config_dir.empty())
      std::fprintf(stderr, "mprefill-coordinator: sparse configs by name from %s\n",
                   opt.config_dir.c_str());
    if (!port_file.empty()) {
      const std::string tmp = port_file + ".tmp";
      FILE* f = std::fopen(tmp.c_str(), "w");
      if (!f) throw std::runtime_error("cannot write --port-file " + port_file);
      std::fprintf(f, "%u %u\n", c.port(), c.metrics_port());
      std::fclose(f);
      if (std::rename(tmp.c_str(), port_file.c_str()) != 0)
        throw std::runtime_error("cannot write --port-file " + port_file);
    }
    while (!g_signal) {
      struct timespec ts {
        0, 100 * 1000 * 1000
      };
      nanosleep(&ts, nullptr);
      if (g_reload) {
        g_reload = 0;
        c.reload_client_keys();
      }
    }
    std::fprintf(stderr, "mprefill-coordinator: signal %d, shutting down\n", int(g_signal));
    c.stop();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mprefill-coordinator: error: %s\n", e.what());
    return 1;
  }
}
