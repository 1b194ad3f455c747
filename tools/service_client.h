// The client side of the `mprefill` service commands (tools/service_cli.h), shared by
// the files that implement them: service_client.cc (connection, job submission, following
// a job), service_output.cc (printing a result), service_commands.cc (submit, status,
// cancel), service_run.cc (run: a whole service in one shot).
#pragma once
#include <signal.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "model/tokenizer.h"
#include "proto/wire.h"
#include "tools/cli_args.h"

namespace mprefill::cli {

namespace v1 = ::mprefill::v1;

// Options shared by submit / status / cancel / run.
struct ServiceArgs : JobOptions {
  // connection
  std::string coordinator, secret_file, key_file;
  wire::TlsClientOptions tls;
  // job (the rest in JobOptions)
  std::string tokenizer;
  std::string group, decoder, kv_transport, model_name, tag;
  bool no_wait = false;
  int timeout_s = 3600;
  // status / cancel
  uint64_t job = 0;
  // run
  std::string model, device = "cpu", mpirun = "mpirun", decoder_device = "cpu", config_dir;
  int ranks = 1, tp = 1, startup_timeout_s = 120;
  int64_t max_prompt = 0;
  bool json = false, help = false;
};

// Set by SIGINT / SIGTERM while a SigintGuard lives (the job is cancelled, exit 130).
extern volatile sig_atomic_t g_interrupted;
struct SigintGuard {
  struct sigaction old_int {
  }, old_term{};
  SigintGuard();
  ~SigintGuard();
};

struct Outcome {
  uint64_t job_id = 0;
  std::string status;  // DONE | FAILED | CANCELLED | REFUSED | TIMEOUT | INTERRUPTED
  v1::JobResult result;
  v1::ErrorCode code = v1::ERROR_CODE_UNSPECIFIED;
  std::string error;
};

// Connects and says hello as a client; a bad HOST:PORT is a UsageError.
std::unique_ptr<wire::Connection> dial(const std::string& hostport, const wire::Credential& cred,
                                       const wire::TlsClientOptions& tls = {});
// The prompt, tokenized here when a tokenizer is given (ids stay empty for a text
// prompt that goes to the coordinator).
PromptInput make_prompt(const ServiceArgs& a, const std::optional<Tokenizer>& tok);
// --sparse SPEC: a path (a '/' in it, or a ".json" ending) is a local file, read here
// (regular files only) and sent inline (JobOptions.sparse_config); anything else ("dense",
// "auto", a config name of the coordinator's --config-dir) is sent as a name.
bool is_sparse_path(const std::string& spec);
std::string read_sparse_file(const std::string& path);
// Throws std::runtime_error when a --sparse file cannot be read.
v1::Envelope make_submit(const ServiceArgs& a, const PromptInput& p, bool progress);
// Submits and follows one job until its result or error. Ctrl-C, the timeout and a
// non-empty still_ok() cancel the job (best effort) before returning.
Outcome follow_job(wire::Connection& c, const v1::Envelope& submit, int timeout_s, bool bar_on,
                   bool no_wait, const std::function<std::string()>& still_ok = {});
// Prints the outcome like `mprefill generate` (text or ids on stdout, a summary on
// stderr) or one JSON object (plus extra's keys). Returns the exit status.
int print_outcome(const Outcome& o, const ServiceArgs& a, const PromptInput& p,
                  const std::optional<Tokenizer>& tok, const nlohmann::json& extra = {});
wire::Credential secret_of(const ServiceArgs& a);  // --secret-file or --key-file
v1::StatusReply request_status(wire::Connection& c, uint64_t job);

int cmd_submit(const ServiceArgs& a);
int cmd_status(const ServiceArgs& a);
int cmd_cancel(const ServiceArgs& a);
int cmd_run(const ServiceArgs& a);

}  // namespace mprefill::cli
