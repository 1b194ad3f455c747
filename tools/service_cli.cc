#include "tools/service_cli.h"

#include <cstdint>
#include <cstdio>
#include <string>

#include "tools/cli_args.h"
#include "tools/service_client.h"

namespace mprefill::cli {

const char* const kServiceCommandsUsage =
    "  submit     submit a job to a running service and follow it (--coordinator HOST:PORT)\n"
    "  status     jobs, worker groups and decoders of a running service\n"
    "  cancel     cancel a job of a running service\n"
    "  run        one shot: coordinator + mpirun worker group + decoder, submit, print\n";

namespace {

const char* kSubmitUsage =
    "usage: mprefill submit --coordinator HOST:PORT [--secret-file F | --key-file F] [--tls "
    "[--tls-ca F]]\n"
    "                       (--prompt TEXT | --prompt-ids 1,2,3 | --prompt-file FILE)\n"
    "                       [--tokenizer PATH] [--decode N]\n"
    "                       [--sparse dense|auto|adaptive:TAU[:V:S]|xattn:TAU[:K[:S]]|NAME|FILE]\n"
    "                       [--dense-below N] [--temperature T] [--top-p P] [--seed S]\n"
    "                       [--stop-ids a,b] [--group NAME] [--decoder NAME]\n"
    "                       [--kv-transport tcp|nccl|ipc|auto] [--model NAME] [--tag TEXT]\n"
    "                       [--audit-heads K] [--no-wait] [--timeout-s S] [--json]\n"
    "  --secret-file F     the coordinator's shared secret (no --client-keys there)\n"
    "  --key-file F        this client's key: one line \"NAME SECRET\" (its line of the\n"
    "                      coordinator's --client-keys). With either, a server that does\n"
    "                      not ask for it or cannot prove it holds the key is refused\n"
    "  --tls               TLS 1.3 to the coordinator (its --tls-cert); the hello proof\n"
    "                      covers the TLS exporter\n"
    "  --tls-ca F          verify the coordinator's certificate against the PEM CAs in F\n"
    "  --tokenizer PATH    tokenize --prompt here (BOS prepended) and print text; without\n"
    "                      it, text prompts go to the coordinator's tokenizer\n"
    "  --sparse SPEC       dense (default), auto, adaptive:TAU[:V:S], xattn:TAU[:K[:S]]\n"
    "                      (see generate --help),\n"
    "                      the NAME of a config in the coordinator's\n"
    "                      --config-dir, or a local FILE (a path: a '/' in it or a .json\n"
    "                      ending) whose JSON is sent with the job\n"
    "  --no-wait           print the job id once accepted and exit (the job goes on;\n"
    "                      without it, a client that goes away cancels its job)\n"
    "  --timeout-s S       give up (and cancel the job) after S seconds (default 3600)\n"
    "  --json              one JSON object on stdout (generate's keys plus job_id, status,\n"
    "                      kv_bytes_handed_off, handoff_ms); no progress bar\n"
    "  other options as in 'mprefill generate --help'; Ctrl-C cancels the job\n";

const char* kStatusUsage =
    "usage: mprefill status --coordinator HOST:PORT [--secret-file F | --key-file F] [--tls "
    "[--tls-ca F]] [--job ID] "
    "[--json]\n";

const char* kCancelUsage =
    "usage: mprefill cancel --coordinator HOST:PORT [--secret-file F | --key-file F] [--tls "
    "[--tls-ca F]] (--job ID | "
    "ID) [--json]\n";

const char* kRunUsage =
    "usage: mprefill run --model PATH [--ranks R] [--tp T] [--device cpu|cuda]\n"
    "                    [--tokenizer PATH] (--prompt TEXT | --prompt-ids 1,2,3 |\n"
    "                    --prompt-file FILE) [--decode N] [--sparse SPEC] [--dense-below N]\n"
    "                    [--temperature T] [--top-p P] [--seed S] [--stop-ids a,b]\n"
    "                    [--kv-transport tcp|nccl|ipc|auto] [--max-prompt N] [--config-dir DIR]\n"
    "                    [--mpirun PATH]\n"
    "                    [--startup-timeout-s S] [--timeout-s S] [--json]\n"
    "                    [--decoder-device cpu|cuda[:N]] [--audit-heads K]\n"
    "  Starts a coordinator (in this process, loopback, a fresh shared secret), a decoder\n"
    "  (mprefill-decoder) and one worker group (mpirun -np R mprefill-worker, tp T x\n"
    "  sp R/T), submits the prompt, prints the result as 'mprefill submit' does, and shuts\n"
    "  everything down, also on failure or Ctrl-C.\n"
    "  --ranks R           MPI ranks of the worker group (default 1)\n"
    "  --tp T              tensor-parallel ranks (divides R; default 1)\n"
    "  --device cpu|cuda   worker device (default cpu)\n"
    "  --decoder-device cpu|cuda[:N]  the decoder's KV receive device: cuda serves\n"
    "                      --kv-transport nccl (K/V by NCCL from the GPU ranks) and ipc (K/V\n"
    "                      copied by the ranks into the decoder's GPU memory, same host;\n"
    "                      auto picks it there) (default cpu)\n"
    "  --sparse SPEC       dense (default), auto, adaptive:TAU[:V:S], xattn:TAU[:K[:S]], a NAME\n"
    "                      of --config-dir,\n"
    "                      or a local FILE\n"
    "                      (a '/' in it or a .json ending) sent with the job\n"
    "  --config-dir DIR    the coordinator's directory of named sparse configs (NAME.json)\n"
    "  --mpirun PATH       launcher (default: mpirun on PATH)\n"
    "  --startup-timeout-s S  bound on the workers' and decoder's registration (default 120)\n";

ServiceArgs parse_args(const std::string& cmd, int argc, char** argv) {
  ServiceArgs a;
  const bool job_cmd = cmd == "submit" || cmd == "run";
  FlagReader r(argc, argv);
  while (r.next()) {
    const std::string& flag = r.flag();
    auto only = [&](bool ok) {
      if (!ok) throw UsageError("'" + flag + "' is not an option of 'mprefill " + cmd + "'");
    };
    if (flag == "--help" || flag == "-h") {
      a.help = true;
    } else if (flag == "--json") {
      a.json = true;
    } else if (flag == "--coordinator") {
      only(cmd != "run");
      a.coordinator = r.value();
    } else if (flag == "--secret-file") {
      only(cmd != "run");
      a.secret_file = r.value();
    } else if (flag == "--key-file") {
      only(cmd != "run");
      a.key_file = r.value();
    } else if (flag == "--tls") {
      only(cmd != "run");
      a.tls.enabled = true;
    } else if (flag == "--tls-ca") {
      only(cmd != "run");
      a.tls.enabled = true;
      a.tls.ca_file = r.value();
    } else if (flag == "--job") {
      only(cmd == "status" || cmd == "cancel");
      a.job = static_cast<uint64_t>(parse_int(flag, r.value(), 1, INT64_MAX));
    } else if (cmd == "cancel" && flag.rfind("--", 0) != 0 && a.job == 0) {
      a.job = static_cast<uint64_t>(parse_int("job id", flag, 1, INT64_MAX));
    } else if (!job_cmd) {
      only(false);
    } else if (flag == "--tokenizer") {
      a.tokenizer = r.value();
    } else if (a.take(r)) {
      if (flag == "--temperature" && a.temperature < 0)
        throw UsageError("--temperature must be >= 0");
      if (flag == "--top-p" && !(a.top_p > 0 && a.top_p <= 1))
        throw UsageError("--top-p must be in (0, 1]");
    } else if (flag == "--kv-transport") {
      a.kv_transport = r.value();
      if (a.kv_transport != "tcp" && a.kv_transport != "nccl" && a.kv_transport != "ipc" &&
          a.kv_transport != "auto")
        throw UsageError("--kv-transport must be tcp, nccl, ipc or auto, got '" + a.kv_transport +
                         "'");
    } else if (flag == "--timeout-s") {
      a.timeout_s = static_cast<int>(parse_int(flag, r.value(), 1, 7 * 24 * 3600));
    } else if (cmd == "submit" && flag == "--group") {
      a.group = r.value();
    } else if (cmd == "submit" && flag == "--decoder") {
      a.decoder = r.value();
    } else if (cmd == "submit" && flag == "--model") {
      a.model_name = r.value();
    } else if (cmd == "submit" && flag == "--tag") {
      a.tag = r.value();
    } else if (cmd == "submit" && flag == "--no-wait") {
      a.no_wait = true;
    } else if (cmd == "run" && flag == "--model") {
      a.model = r.value();
    } else if (cmd == "run" && flag == "--ranks") {
      a.ranks = static_cast<int>(parse_int(flag, r.value(), 1, 1024));
    } else if (cmd == "run" && flag == "--tp") {
      a.tp = static_cast<int>(parse_int(flag, r.value(), 1, 1024));
    } else if (cmd == "run" && flag == "--device") {
      a.device = r.value();
      if (a.device != "cpu" && a.device != "cuda")
        throw UsageError("--device must be cpu or cuda, got '" + a.device + "'");
    } else if (cmd == "run" && flag == "--decoder-device") {
      a.decoder_device = r.value();
      if (a.decoder_device != "cpu" && a.decoder_device != "cuda" &&
          a.decoder_device.rfind("cuda:", 0) != 0)
        throw UsageError("--decoder-device must be cpu, cuda or cuda:N, got '" + a.decoder_device +
                         "'");
    } else if (cmd == "run" && flag == "--mpirun") {
      a.mpirun = r.value();
    } else if (cmd == "run" && flag == "--startup-timeout-s") {
      a.startup_timeout_s = static_cast<int>(parse_int(flag, r.value(), 1, 3600));
    } else if (cmd == "run" && flag == "--config-dir") {
      a.config_dir = r.value();
    } else if (cmd == "run" && flag == "--max-prompt") {
      a.max_prompt = parse_int(flag, r.value(), 1, int64_t{1} << 40);
    } else {
      throw UsageError("unknown option '" + r.arg() + "'");
    }
  }
  if (a.help) return a;
  if (cmd != "run" && a.coordinator.empty())
    throw UsageError("--coordinator HOST:PORT is required");
  if (cmd == "cancel" && a.job == 0) throw UsageError("--job ID is required");
  if (job_cmd) a.require_one_prompt();
  if (cmd == "run") {
    if (a.model.empty()) throw UsageError("--model is required");
    if (a.ranks % a.tp != 0)
      throw UsageError("--tp " + std::to_string(a.tp) + " must divide --ranks " +
                       std::to_string(a.ranks));
  }
  return a;
}

}  // namespace

bool is_service_command(const std::string& cmd) {
  return cmd == "submit" || cmd == "status" || cmd == "cancel" || cmd == "run";
}

int service_main(const std::string& cmd, int argc, char** argv) {
  const char* usage = cmd == "submit"   ? kSubmitUsage
                      : cmd == "status" ? kStatusUsage
                      : cmd == "cancel" ? kCancelUsage
                                        : kRunUsage;
  try {
    const ServiceArgs a = parse_args(cmd, argc, argv);
    if (a.help) {
      std::fputs(usage, stdout);
      return 0;
    }
    if (cmd == "submit") return cmd_submit(a);
    if (cmd == "status") return cmd_status(a);
    if (cmd == "cancel") return cmd_cancel(a);
    return cmd_run(a);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "mprefill: error: %s\n", one_line(e.what()).c_str());
    std::fputs(usage, stderr);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mprefill: error: %s\n", one_line(e.what()).c_str());
    return 1;
  }
}

}  // namespace mprefill::cli
