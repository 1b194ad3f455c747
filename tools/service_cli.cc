#include "tools/service_cli.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "coordinator/coordinator.h"
#include "model/tokenizer.h"
#include "proto/hmac.h"
#include "proto/wire.h"
#include "tools/cli_args.h"

namespace mprefill::cli {

const char* const kServiceCommandsUsage =
    "  submit     submit a job to a running service and follow it (--coordinator HOST:PORT)\n"
    "  status     jobs, worker groups and decoders of a running service\n"
    "  cancel     cancel a job of a running service\n"
    "  run        one shot: coordinator + mpirun worker group + decoder, submit, print\n";

namespace {

using mprefill::cli::one_line;
using mprefill::cli::parse_int;
using mprefill::cli::UsageError;

namespace v1 = ::mprefill::v1;
using Clock = std::chrono::steady_clock;

const char* kSubmitUsage =
    "usage: mprefill submit --coordinator HOST:PORT [--secret-file F]\n"
    "                       (--prompt TEXT | --prompt-ids 1,2,3 | --prompt-file FILE)\n"
    "                       [--tokenizer PATH] [--decode N] [--sparse dense|auto|FILE.json]\n"
    "                       [--dense-below N] [--temperature T] [--top-p P] [--seed S]\n"
    "                       [--stop-ids a,b] [--group NAME] [--decoder NAME]\n"
    "                       [--kv-transport tcp|nccl] [--model NAME] [--tag TEXT]\n"
    "                       [--audit-heads K] [--no-wait] [--timeout-s S] [--json]\n"
    "  --tokenizer PATH    tokenize --prompt here (BOS prepended) and print text; without\n"
    "                      it, text prompts go to the coordinator's tokenizer\n"
    "  --no-wait           print the job id once accepted and exit (the job goes on;\n"
    "                      without it, a client that goes away cancels its job)\n"
    "  --timeout-s S       give up (and cancel the job) after S seconds (default 3600)\n"
    "  --json              one JSON object on stdout (generate's keys plus job_id, status,\n"
    "                      kv_bytes_handed_off, handoff_ms); no progress bar\n"
    "  other options as in 'mprefill generate --help'; Ctrl-C cancels the job\n";

const char* kStatusUsage =
    "usage: mprefill status --coordinator HOST:PORT [--secret-file F] [--job ID] [--json]\n";

const char* kCancelUsage =
    "usage: mprefill cancel --coordinator HOST:PORT [--secret-file F] (--job ID | ID) [--json]\n";

const char* kRunUsage =
    "usage: mprefill run --model PATH [--ranks R] [--tp T] [--device cpu|cuda]\n"
    "                    [--tokenizer PATH] (--prompt TEXT | --prompt-ids 1,2,3 |\n"
    "                    --prompt-file FILE) [--decode N] [--sparse SPEC] [--dense-below N]\n"
    "                    [--temperature T] [--top-p P] [--seed S] [--stop-ids a,b]\n"
    "                    [--kv-transport tcp|nccl] [--max-prompt N] [--mpirun PATH]\n"
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
    "                      --kv-transport nccl (K/V by NCCL from the GPU ranks; default cpu)\n"
    "  --mpirun PATH       launcher (default: mpirun on PATH)\n"
    "  --startup-timeout-s S  bound on the workers' and decoder's registration (default 120)\n";

volatile sig_atomic_t g_interrupted = 0;
void on_sigint(int) { g_interrupted = 1; }

struct SigintGuard {
  struct sigaction old_int {
  }, old_term{};
  SigintGuard() {
    struct sigaction sa {};
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    signal(SIGPIPE, SIG_IGN);
  }
  ~SigintGuard() {
    sigaction(SIGINT, &old_int, nullptr);
    sigaction(SIGTERM, &old_term, nullptr);
  }
};

// Options shared by submit / status / cancel / run.
struct Args : JobOptions {
  // connection
  std::string coordinator, secret_file;
  // job (the rest in JobOptions)
  std::string tokenizer;
  std::string group, decoder, kv_transport, model_name, tag;
  bool no_wait = false;
  int timeout_s = 3600;
  // status / cancel
  uint64_t job = 0;
  // run
  std::string model, device = "cpu", mpirun = "mpirun", decoder_device = "cpu";
  int ranks = 1, tp = 1, startup_timeout_s = 120;
  int64_t max_prompt = 0;
  bool json = false, help = false;
};

Args parse_args(const std::string& cmd, int argc, char** argv) {
  Args a;
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
      if (a.kv_transport != "tcp" && a.kv_transport != "nccl")
        throw UsageError("--kv-transport must be tcp or nccl, got '" + a.kv_transport + "'");
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

// ---------------------------------------------------------------- connection

std::unique_ptr<wire::Connection> dial(const std::string& hostport, const std::string& secret) {
  std::string host;
  uint16_t port = 0;
  try {
    wire::parse_host_port(hostport, &host, &port);
  } catch (const std::invalid_argument& e) {
    throw UsageError(std::string("--coordinator: ") + e.what());
  }
  auto c = wire::Connection::connect(host, port, 10000);
  c->client_handshake(v1::CLIENT, "mprefill-cli", secret, 10000);
  return c;
}

// ---------------------------------------------------------------- prompt + job

// The prompt, tokenized here when a tokenizer is given (ids stay empty for a text
// prompt that goes to the coordinator).
PromptInput make_prompt(const Args& a, const std::optional<Tokenizer>& tok) {
  PromptInput p = read_prompt(a);
  if (p.ids.empty() && tok) p.ids = tok->encode(p.text, true);
  return p;
}

v1::Envelope make_submit(const Args& a, const PromptInput& p, bool progress) {
  v1::Envelope env;
  env.set_version(wire::kProtocolVersion);
  auto* s = env.mutable_submit();
  if (!p.ids.empty()) {
    for (int id : p.ids) s->add_token_ids(id);
  } else {
    s->set_text(p.text);
  }
  auto* o = s->mutable_options();
  o->set_sparse(a.sparse);
  o->set_dense_below(a.dense_below);
  o->set_decode_tokens(a.decode);
  o->set_audit_heads(a.audit_heads);
  o->mutable_sampling()->set_temperature(static_cast<float>(a.temperature));
  o->mutable_sampling()->set_top_p(static_cast<float>(a.top_p));
  o->mutable_sampling()->set_seed(a.seed);
  for (int id : a.stop_ids) o->add_stop_ids(id);
  o->set_decoder(a.decoder);
  o->set_group(a.group);
  o->set_want_progress(progress);
  o->set_kv_transport(a.kv_transport);
  s->set_client_tag(a.tag);
  s->set_model(a.model_name);
  s->set_detach(a.no_wait);
  return env;
}

class ProgressBar {
 public:
  explicit ProgressBar(bool on) : on_(on) {}
  void show(uint64_t job, const v1::Progress& p) {
    if (!on_) return;
    const int width = 24;
    const int n = p.n_layers() > 0 ? p.n_layers() : 1;
    const int filled = std::min(width, p.layer() * width / n);
    std::string bar(filled, '#');
    bar.resize(width, '.');
    std::fprintf(stderr, "\rjob %llu %-11s [%s] layer %d/%d  %.0f tok/s   ",
                 static_cast<unsigned long long>(job), v1::JobState_Name(p.state()).c_str(),
                 bar.c_str(), p.layer(), p.n_layers(), p.tokens_per_s());
    std::fflush(stderr);
    drawn_ = true;
  }
  void clear() {
    if (on_ && drawn_) std::fprintf(stderr, "\r%80s\r", "");
    drawn_ = false;
  }

 private:
  bool on_;
  bool drawn_ = false;
};

struct Outcome {
  uint64_t job_id = 0;
  std::string status;  // DONE | FAILED | CANCELLED | REFUSED | TIMEOUT | INTERRUPTED
  v1::JobResult result;
  v1::ErrorCode code = v1::ERROR_CODE_UNSPECIFIED;
  std::string error;
};

// Submits and follows one job until its result or error. Ctrl-C and the timeout cancel
// the job (best effort) before returning.
Outcome follow_job(wire::Connection& c, const v1::Envelope& submit, int timeout_s, bool bar_on,
                   bool no_wait, const std::function<std::string()>& still_ok = {}) {
  Outcome out;
  c.send(submit, 10000);
  ProgressBar bar(bar_on);
  const auto deadline = Clock::now() + std::chrono::seconds(timeout_s);
  auto cancel = [&](const std::string& status, const std::string& why) {
    bar.clear();
    out.status = status;
    out.error = why;
    if (out.job_id == 0) return out;
    try {
      v1::Envelope env;
      env.mutable_cancel()->set_job_id(out.job_id);
      c.send(env, 2000);
      // Wait briefly for the coordinator's answer so the cancel has landed.
      v1::Envelope r;
      const auto until = Clock::now() + std::chrono::seconds(2);
      while (Clock::now() < until && c.recv(&r, 200))
        if (r.has_status_reply()) break;
    } catch (const std::exception&) {
    }
    return out;
  };
  for (;;) {
    if (g_interrupted) return cancel("INTERRUPTED", "interrupted; job cancelled");
    if (Clock::now() > deadline)
      return cancel("TIMEOUT", "no result within --timeout-s " + std::to_string(timeout_s) +
                                   "; job cancelled");
    if (still_ok) {
      const std::string why = still_ok();
      if (!why.empty()) return cancel("FAILED", why);
    }
    v1::Envelope env;
    if (!c.recv(&env, 200)) continue;
    if (env.has_accepted()) {
      out.job_id = env.accepted().job_id();
      if (no_wait) {
        out.status = "QUEUED";
        return out;
      }
      if (bar_on)
        std::fprintf(stderr, "job %llu accepted (%lld prompt tokens, queue position %d)\n",
                     static_cast<unsigned long long>(out.job_id),
                     static_cast<long long>(env.accepted().prompt_tokens()),
                     env.accepted().queue_position());
    } else if (env.has_progress()) {
      bar.show(out.job_id, env.progress());
    } else if (env.has_result()) {
      bar.clear();
      out.result = env.result();
      out.job_id = out.result.job_id();
      out.status = "DONE";
      return out;
    } else if (env.has_error()) {
      bar.clear();
      const auto& e = env.error();
      out.code = e.code();
      out.error = e.message();
      if (out.job_id == 0) out.job_id = e.job_id();
      out.status = e.job_id() == 0                       ? "REFUSED"
                   : e.code() == v1::CANCELLED_BY_CLIENT ? "CANCELLED"
                                                         : "FAILED";
      return out;
    }
  }
}

std::string gbps(uint64_t bytes, double ms) {
  if (ms <= 0) return "n/a";
  char b[32];
  std::snprintf(b, sizeof(b), "%.3f", static_cast<double>(bytes) / (ms * 1e6));
  return b;
}

nlohmann::json outcome_json(const Outcome& o, const Args& a, const PromptInput& p) {
  nlohmann::json j = {{"job_id", o.job_id}, {"status", o.status}};
  if (o.status != "DONE") {
    j["error_code"] = v1::ErrorCode_Name(o.code);
    j["error"] = o.error;
    return j;
  }
  const auto& r = o.result;
  std::vector<int> gen(r.generated_ids().begin(), r.generated_ids().end());
  j["prompt_tokens"] = r.prompt_tokens();
  j["first_token_id"] = r.first_token_id();
  j["generated_ids"] = gen;
  j["stopped_by"] = r.stopped_by();
  j["ttft_ms"] = r.ttft_ms();
  j["prefill_ms"] = r.prefill_ms();
  j["decode_ms"] = r.decode_ms();
  j["queue_ms"] = r.queue_ms();
  j["kv_bytes_handed_off"] = r.kv_bytes_handed_off();
  j["handoff_ms"] = r.handoff_ms();
  j["handoff_gbps"] = r.handoff_ms() > 0 ? r.kv_bytes_handed_off() / (r.handoff_ms() * 1e6) : 0.0;
  j["sparse"] = {{"source", a.sparse}};
  if (r.audit_size() > 0) {
    nlohmann::json audit = nlohmann::json::array();
    for (const auto& h : r.audit())
      audit.push_back({{"layer", h.layer()},
                       {"head", h.head()},
                       {"pattern", h.pattern()},
                       {"recall", h.recall()},
                       {"output_rel_error", h.output_rel_error()}});
    j["audit"] = audit;
  }
  if (!r.text().empty() || !p.text.empty()) j["text"] = r.text();
  nlohmann::json ranks = nlohmann::json::array();
  for (const auto& b : r.ranks())
    ranks.push_back({{"total_ms", b.total_ms()},
                     {"gemm_ms", b.gemm_ms()},
                     {"attention_ms", b.attention_ms()},
                     {"estimate_ms", b.estimate_ms()},
                     {"comm_ms", b.comm_ms()},
                     {"kv_export_ms", b.kv_export_ms()},
                     {"sp_imbalance", b.sp_imbalance()},
                     {"tp_imbalance", b.tp_imbalance()}});
  j["rank_breakdown"] = ranks;
  return j;
}

// Prints the outcome like `mprefill generate` (text or ids on stdout, a summary on
// stderr) or one JSON object. Returns the exit status.
int print_outcome(const Outcome& o, const Args& a, const PromptInput& p,
                  const std::optional<Tokenizer>& tok, const nlohmann::json& extra = {}) {
  if (a.json) {
    nlohmann::json j = outcome_json(o, a, p);
    if (o.status == "DONE" && tok && j.value("text", std::string()).empty()) {
      std::string text;
      int prev = p.ids.empty() ? 1 : p.ids.back();
      for (int id : o.result.generated_ids()) {
        text += tok->decode_token(prev, id);
        prev = id;
      }
      j["text"] = text;
    }
    if (extra.is_object())
      for (auto it = extra.begin(); it != extra.end(); ++it) j[it.key()] = it.value();
    std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
  }
  if (o.status == "QUEUED") {
    if (!a.json) std::cout << o.job_id << std::endl;
    return 0;
  }
  if (o.status != "DONE") {
    std::fprintf(stderr, "mprefill: error: job %llu %s: %s%s%s\n",
                 static_cast<unsigned long long>(o.job_id), o.status.c_str(),
                 o.code != v1::ERROR_CODE_UNSPECIFIED ? v1::ErrorCode_Name(o.code).c_str() : "",
                 o.code != v1::ERROR_CODE_UNSPECIFIED ? ": " : "", one_line(o.error).c_str());
    return o.status == "INTERRUPTED" ? 130 : 1;
  }
  if (a.json) return 0;
  const auto& r = o.result;
  std::string text = r.text();
  if (text.empty() && tok) {
    int prev = p.ids.empty() ? 1 : p.ids.back();
    for (int id : r.generated_ids()) {
      text += tok->decode_token(prev, id);
      prev = id;
    }
  }
  if (!p.text.empty() && (!text.empty() || tok)) {
    std::cout << p.text << text << std::endl;
  } else {
    for (int i = 0; i < r.generated_ids_size(); ++i)
      std::cout << (i ? "," : "") << r.generated_ids(i);
    std::cout << std::endl;
  }
  std::fprintf(stderr,
               "mprefill: job %llu DONE: %lld prompt tokens, ttft %.1f ms (queue %.1f, prefill "
               "%.1f), KV %llu bytes handed off in %.1f ms (%s GB/s), %d decoded in %.1f ms, "
               "stop: %s\n",
               static_cast<unsigned long long>(o.job_id), static_cast<long long>(r.prompt_tokens()),
               r.ttft_ms(), r.queue_ms(), r.prefill_ms(),
               static_cast<unsigned long long>(r.kv_bytes_handed_off()), r.handoff_ms(),
               gbps(r.kv_bytes_handed_off(), r.handoff_ms()).c_str(),
               std::max(0, r.generated_ids_size() - 1), r.decode_ms(), r.stopped_by().c_str());
  for (const auto& h : r.audit())
    std::fprintf(stderr, "mprefill: audit layer %d head %d (%s): recall %.4f, output error %.3g\n",
                 h.layer(), h.head(), h.pattern().c_str(), h.recall(), h.output_rel_error());
  return 0;
}

std::string secret_of(const Args& a) {
  return a.secret_file.empty() ? std::string() : wire::load_secret_file(a.secret_file);
}

// ---------------------------------------------------------------- submit / status / cancel

int cmd_submit(const Args& a) {
  std::optional<Tokenizer> tok;
  if (!a.tokenizer.empty()) tok = Tokenizer::load(a.tokenizer);
  const PromptInput p = make_prompt(a, tok);
  SigintGuard guard;
  auto c = dial(a.coordinator, secret_of(a));
  const bool bar = !a.json && isatty(STDERR_FILENO);
  const Outcome o = follow_job(*c, make_submit(a, p, bar), a.timeout_s, bar, a.no_wait);
  return print_outcome(o, a, p, tok);
}

v1::StatusReply request_status(wire::Connection& c, uint64_t job) {
  v1::Envelope env;
  env.mutable_status_request()->set_job_id(job);
  c.send(env, 10000);
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (Clock::now() < deadline) {
    v1::Envelope r;
    if (!c.recv(&r, 200)) continue;
    if (r.has_status_reply()) return r.status_reply();
    if (r.has_error())
      throw std::runtime_error(v1::ErrorCode_Name(r.error().code()) + ": " + r.error().message());
  }
  throw std::runtime_error("no status reply within 10 s");
}

nlohmann::json job_json(const v1::JobStatus& j) {
  return {{"job_id", j.job_id()},
          {"status", v1::JobState_Name(j.state())},
          {"layer", j.layer()},
          {"n_layers", j.n_layers()},
          {"prompt_tokens", j.prompt_tokens()},
          {"group", j.group()},
          {"decoder", j.decoder()},
          {"error", j.error()}};
}

int cmd_status(const Args& a) {
  auto c = dial(a.coordinator, secret_of(a));
  const v1::StatusReply r = request_status(*c, a.job);
  if (a.json) {
    nlohmann::json j = {{"jobs", nlohmann::json::array()},
                        {"groups", nlohmann::json::array()},
                        {"decoders", nlohmann::json::array()}};
    for (const auto& s : r.jobs()) j["jobs"].push_back(job_json(s));
    for (const auto& g : r.groups())
      j["groups"].push_back({{"name", g.name()},
                             {"tp", g.tp()},
                             {"sp", g.sp()},
                             {"device", g.device()},
                             {"busy", g.busy()},
                             {"alive", g.alive()}});
    for (const auto& d : r.decoders())
      j["decoders"].push_back({{"name", d.name()},
                               {"endpoint", d.endpoint()},
                               {"active_jobs", d.active_jobs()},
                               {"alive", d.alive()}});
    std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
    return 0;
  }
  if (a.job == 0) {
    std::printf("worker groups: %d\n", r.groups_size());
    for (const auto& g : r.groups())
      std::printf("  %-16s tp %d x sp %d  %-12s %s\n", g.name().c_str(), g.tp(), g.sp(),
                  g.device().c_str(), g.busy() ? "busy" : "idle");
    std::printf("decoders: %d\n", r.decoders_size());
    for (const auto& d : r.decoders())
      std::printf("  %-16s %-22s %d active job(s)\n", d.name().c_str(), d.endpoint().c_str(),
                  d.active_jobs());
    std::printf("jobs: %d\n", r.jobs_size());
  }
  for (const auto& j : r.jobs())
    std::printf("  job %-6llu %-11s layer %d/%d  %lld tokens  group %s  decoder %s%s%s\n",
                static_cast<unsigned long long>(j.job_id()), v1::JobState_Name(j.state()).c_str(),
                j.layer(), j.n_layers(), static_cast<long long>(j.prompt_tokens()),
                j.group().empty() ? "-" : j.group().c_str(),
                j.decoder().empty() ? "-" : j.decoder().c_str(), j.error().empty() ? "" : "  ",
                one_line(j.error()).c_str());
  return 0;
}

int cmd_cancel(const Args& a) {
  auto c = dial(a.coordinator, secret_of(a));
  v1::Envelope env;
  env.mutable_cancel()->set_job_id(a.job);
  c->send(env, 10000);
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (Clock::now() < deadline) {
    v1::Envelope r;
    if (!c->recv(&r, 200)) continue;
    if (r.has_error()) {
      std::fprintf(stderr, "mprefill: error: %s: %s\n",
                   v1::ErrorCode_Name(r.error().code()).c_str(),
                   one_line(r.error().message()).c_str());
      return 1;
    }
    if (r.has_status_reply() && r.status_reply().jobs_size() == 1) {
      const auto& j = r.status_reply().jobs(0);
      if (a.json)
        std::cout << job_json(j).dump() << std::endl;
      else
        std::printf("job %llu %s\n", static_cast<unsigned long long>(j.job_id()),
                    v1::JobState_Name(j.state()).c_str());
      return j.state() == v1::CANCELLED ? 0 : 1;
    }
  }
  std::fputs("mprefill: error: no answer to the cancel within 10 s\n", stderr);
  return 1;
}

// ---------------------------------------------------------------- run

std::string self_dir() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return ".";
  std::string p(buf, static_cast<size_t>(n));
  return p.substr(0, p.rfind('/'));
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
  // SIGTERM to the process group, up to grace_ms, then SIGKILL.
  void stop(int grace_ms) {
    if (pid <= 0 || poll()) return;
    ::kill(-pid, SIGTERM);
    const auto until = Clock::now() + std::chrono::milliseconds(grace_ms);
    while (Clock::now() < until) {
      if (poll()) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    ::kill(-pid, SIGKILL);  // stragglers of the group (ranks) even when the leader exited
    if (!exited) {
      ::waitpid(pid, &status, 0);
      exited = true;
    }
  }
};

struct RunCleanup {
  std::vector<Child*> children;
  std::string secret_path;
  ~RunCleanup() {
    for (Child* c : children) c->stop(5000);
    if (!secret_path.empty()) ::unlink(secret_path.c_str());
  }
};

int cmd_run(const Args& a) {
  std::optional<Tokenizer> tok;
  if (!a.tokenizer.empty()) tok = Tokenizer::load(a.tokenizer);
  const PromptInput p = make_prompt(a, tok);
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

  auto children_ok = [&]() -> std::string {
    if (workers.poll()) return "the worker group (" + a.mpirun + ") " + workers.exit_text();
    if (decoder.poll()) return "mprefill-decoder " + decoder.exit_text();
    return "";
  };

  auto c = dial(addr, secret);
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
  const bool bar = !a.json && isatty(STDERR_FILENO);
  const Outcome o = follow_job(*c, make_submit(a, p, bar), a.timeout_s, bar, false, children_ok);
  nlohmann::json extra = {{"device", a.device},
                          {"ranks", a.ranks},
                          {"tp", a.tp},
                          {"sp", a.ranks / a.tp},
                          {"decoder_device", a.decoder_device},
                          {"kv_transport", a.kv_transport.empty() ? "tcp" : a.kv_transport}};
  const int rc = print_outcome(o, a, p, tok, extra);
  c->close();
  return rc;  // cleanup stops the children; the coordinator stops with its destructor
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
    const Args a = parse_args(cmd, argc, argv);
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
