// mprefill-worker: one worker group of the prefill service (issue 6), launched as
//   mpirun -np N mprefill-worker --coordinator HOST:PORT --model PATH --tp T
// Flags only; the service is worker/ (worker/service.h).
#include <cstdio>
#include <string>

#include "kernels/cpu/cpu.h"
#include "tools/cli_args.h"
#include "worker/service.h"

namespace {

using mprefill::cli::FlagReader;
using mprefill::cli::parse_int;
using mprefill::cli::UsageError;

const char* kUsage =
    "usage: mpirun -np N mprefill-worker --coordinator HOST:PORT --model PATH [--tp T]\n"
    "                                    [--device cpu|cuda] [--group NAME] [--secret-file F]\n"
    "                                    [--tls-ca F]\n"
    "                                    [--threads N] [--kv-streams S] [--page-tokens P]\n"
    "                                    [--comm-timeout-ms MS]\n"
    "                                    [--handoff-timeout-ms MS] [--connect-timeout-ms MS]\n"
    "                                    [--reconnect-s S]\n"
    "One worker group of the prefill service: N MPI ranks, tp x sp = N (sp = N / tp).\n"
    "  --coordinator HOST:PORT  the coordinator (rank 0 connects and registers the group)\n"
    "  --model PATH             HF directory, llama2.c .bin, or random:NAME[:SEED]; the\n"
    "                           decoder must load the same weights (fingerprint checked)\n"
    "  --tp T                   tensor-parallel ranks (divides N and the KV heads; default 1)\n"
    "  --device cpu|cuda        the executor's backend (engine/executor.h): cpu runs every\n"
    "                           tp x sp shape (one rank: tp 1 x sp 1); cuda runs each rank on\n"
    "                           the GPU of its node-local rank (CUDA builds; several ranks\n"
    "                           need NCCL); the KV is copied to host for the TCP handoff, or\n"
    "                           sent from the GPU by NCCL for kv_transport nccl jobs (one rank),\n"
    "                           or copied GPU to GPU into a same-host decoder's memory for\n"
    "                           kv_transport ipc jobs (every rank; docs/kv_ipc.md)\n"
    "  --group NAME             group name (default worker-HOSTNAME-PID)\n"
    "  --secret-file F          shared secret for the coordinator and decoder hellos\n"
    "  --tls-ca F               verify TLS peers against the PEM CAs in F: a tls://\n"
    "                           coordinator, and decoders whose KV port speaks TLS (their\n"
    "                           --tls-cert); without it the hello proofs alone vouch for them\n"
    "  --threads N              CPU threads per rank (default: all cores or MPREFILL_THREADS)\n"
    "  --kv-streams S           TCP streams per rank to the decoder (default 1)\n"
    "  --page-tokens P          tokens per KV page (default 256; the decoder must agree)\n"

    "  --comm-timeout-ms MS     bound of every MPI wait (default 120000)\n"
    "  --handoff-timeout-ms MS  bound of each wait on the decoder when the Assignment gives\n"
    "                           none (default 30000)\n"
    "  --connect-timeout-ms MS  bound on connecting to the coordinator (default 10000)\n"
    "  --reconnect-s S          a lost coordinator: rank 0 re-registers the group for up to\n"
    "                           S s (backoff 0.1 s doubling to 2 s), then the group exits 1\n"
    "                           (default 60; 0: exit 1 at once)\n"
    "Exit status: 0 on SIGINT/SIGTERM; 1 on a failure (refused registration, a rank that\n"
    "stopped answering, a coordinator not back within --reconnect-s); 2 on bad arguments.\n";

struct Args {
  mprefill::worker::WorkerOptions o;
  int threads = 0;
  bool help = false;
};

Args parse_args(int argc, char** argv) {
  Args a;
  mprefill::worker::WorkerOptions& o = a.o;
  FlagReader r(argc - 1, argv + 1);  // past the program name
  while (r.next()) {
    const std::string& flag = r.flag();
    auto int_value = [&](int64_t lo, int64_t hi) {
      return static_cast<int>(parse_int(flag, r.value(), lo, hi));
    };
    if (flag == "--help" || flag == "-h")
      a.help = true;
    else if (flag == "--coordinator")
      o.coordinator = r.value();
    else if (flag == "--model")
      o.model = r.value();
    else if (flag == "--tp")
      o.tp = int_value(1, 4096);
    else if (flag == "--device")
      o.device = r.value();
    else if (flag == "--group")
      o.group = r.value();
    else if (flag == "--secret-file")
      o.secret_file = r.value();
    else if (flag == "--tls-ca")
      o.tls_ca = r.value();
    else if (flag == "--threads")
      a.threads = int_value(1, 4096);
    else if (flag == "--kv-streams")
      o.streams = int_value(1, 64);
    else if (flag == "--page-tokens")
      o.page_tokens = int_value(1, 1 << 20);
    else if (flag == "--comm-timeout-ms")
      o.comm_timeout_ms = int_value(100, 86400000);
    else if (flag == "--handoff-timeout-ms")
      o.handoff_timeout_ms = int_value(100, 86400000);
    else if (flag == "--connect-timeout-ms")
      o.connect_timeout_ms = int_value(100, 600000);
    else if (flag == "--reconnect-s")
      o.reconnect_s = int_value(0, 86400);
    else
      throw UsageError("unknown option '" + r.arg() + "' (see --help)");
  }
  if (a.help) return a;
  if (o.coordinator.empty()) throw UsageError("--coordinator HOST:PORT is required");
  if (o.model.empty()) throw UsageError("--model PATH is required");
  if (o.device != "cpu" && o.device != "cuda")
    throw UsageError("--device must be cpu or cuda, got '" + o.device + "'");
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  try {
    a = parse_args(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "mprefill-worker: error: %s\n", e.what());
    return 2;
  }
  if (a.help) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (a.threads > 0) mprefill::cpu::set_num_threads(a.threads);
  return mprefill::worker::run_service(a.o, &argc, &argv);
}
