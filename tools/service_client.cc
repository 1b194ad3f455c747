#include "tools/service_client.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace mprefill::cli {

using Clock = std::chrono::steady_clock;

volatile sig_atomic_t g_interrupted = 0;

namespace {
void on_sigint(int) { g_interrupted = 1; }
}  // namespace

SigintGuard::SigintGuard() {
  struct sigaction sa {};
  sa.sa_handler = on_sigint;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, &old_int);
  sigaction(SIGTERM, &sa, &old_term);
  signal(SIGPIPE, SIG_IGN);
}

SigintGuard::~SigintGuard() {
  sigaction(SIGINT, &old_int, nullptr);
  sigaction(SIGTERM, &old_term, nullptr);
}

std::unique_ptr<wire::Connection> dial(const std::string& hostport, const wire::Credential& cred,
                                       const wire::TlsClientOptions& tls) {
  std::string host;
  uint16_t port = 0;
  try {
    wire::parse_host_port(hostport, &host, &port);
  } catch (const std::invalid_argument& e) {
    throw UsageError(std::string("--coordinator: ") + e.what());
  }
  // A coordinator under a flood of silent connections may close this one in its hello
  // (kBusy): tried again, within the 10 s.
  return wire::open_retrying_busy(
      [&](int left) {
        auto c = wire::Connection::connect(host, port, left);
        c->start_tls(tls, left);
        c->client_handshake(v1::CLIENT, "mprefill-cli", cred, left);
        return c;
      },
      10000);
}

PromptInput make_prompt(const ServiceArgs& a, const std::optional<Tokenizer>& tok) {
  PromptInput p = read_prompt(a);
  if (p.ids.empty() && tok) p.ids = tok->encode(p.text, true);
  return p;
}

bool is_sparse_path(const std::string& spec) {
  return spec.find('/') != std::string::npos ||
         (spec.size() >= 5 && spec.compare(spec.size() - 5, 5, ".json") == 0);
}

std::string read_sparse_file(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    throw std::runtime_error("--sparse " + path + ": " + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) throw std::runtime_error("--sparse " + path + ": not a regular file");
  if (static_cast<uint64_t>(st.st_size) > wire::kDefaultMaxFrame)
    throw std::runtime_error("--sparse " + path + ": " + std::to_string(st.st_size) +
                             " bytes, too large to send");
  std::ifstream f(path, std::ios::binary);
  std::ostringstream text;
  text << f.rdbuf();
  if (!f) throw std::runtime_error("--sparse " + path + ": cannot be read");
  return text.str();
}

v1::Envelope make_submit(const ServiceArgs& a, const PromptInput& p, bool progress) {
  v1::Envelope env;
  env.set_version(wire::kProtocolVersion);
  auto* s = env.mutable_submit();
  if (!p.ids.empty()) {
    for (int id : p.ids) s->add_token_ids(id);
  } else {
    s->set_text(p.text);
  }
  auto* o = s->mutable_options();
  if (is_sparse_path(a.sparse))
    o->set_sparse_config(read_sparse_file(a.sparse));
  else
    o->set_sparse(a.sparse);
  if (a.dense_below) o->set_dense_below(*a.dense_below);  // else the coordinator's default
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

namespace {

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

}  // namespace

Outcome follow_job(wire::Connection& c, const v1::Envelope& submit, int timeout_s, bool bar_on,
                   bool no_wait, const std::function<std::string()>& still_ok) {
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

}  // namespace mprefill::cli
