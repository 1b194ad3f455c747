// Private to coordinator/: the service state that the coordinator's modules share, and
// the Impl behind coordinator.h. Everything under `mu` is touched only with mu held; the
// modules never wait on I/O while holding it (sends are queued onto the sessions' strands).
//
// Modules (one .cc each, all defining members of Coordinator::Impl):
//   coordinator.cc  life cycle, the ticker, GET /metrics, routing of messages by role
//   session.cc      connections: accept (--max-connections), hello/auth, frames, writes
//   registry.cc     worker groups and decoders: registration, KV contract, heartbeats,
//                   picking a free group / decoder, removal
//   intake.cc       a SubmitJob before the lock: size caps, prompt, options, sparse policy
//                   (tokenizing and config reading on the prep pool)
//   admission.cc    validation of a SubmitJob and admission against capacity and limits
//   sparse_source.cc  sparse configs by name from --config-dir or inline (no Impl)
//   client_keys.cc  the --client-keys file (no Impl); access.cc: which key a hello must
//                   prove, pre-hello pool, key reloads, rate-limited refusal log
//   jobs.cc         queue, state machine, cancel, status, progress, worker/decoder job
//                   events and the JobResult
//   planner.cc, metrics.cc: pure arithmetic and Prometheus text (no Impl)
#pragma once
// clang-format off
// <utility> before asio: Boost 1.74's awaitable.hpp uses std::exchange without including it.
#include <utility>
#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
// clang-format on

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "coordinator/client_keys.h"
#include "coordinator/coordinator.h"
#include "coordinator/metrics.h"
#include "coordinator/planner.h"
#include "coordinator/sparse_source.h"
#include "model/sparse_policy.h"
#include "model/tokenizer.h"
#include "proto/line_limiter.h"

namespace mprefill::coord {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
namespace v1 = ::mprefill::v1;

class Session;
using SessionPtr = std::shared_ptr<Session>;

inline double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

inline bool terminal(v1::JobState s) {
  return s == v1::DONE || s == v1::FAILED || s == v1::CANCELLED;
}

inline const char* state_name(v1::JobState s) {
  switch (s) {
    case v1::QUEUED:
      return "QUEUED";
    case v1::RUNNING:
      return "RUNNING";
    case v1::HANDING_OFF:
      return "HANDING_OFF";
    case v1::DECODING:
      return "DECODING";
    case v1::DONE:
      return "DONE";
    case v1::FAILED:
      return "FAILED";
    case v1::CANCELLED:
      return "CANCELLED";
    default:
      return "UNSPECIFIED";
  }
}

inline const char* role_name(v1::Role r) {
  switch (r) {
    case v1::CLIENT:
      return "client";
    case v1::WORKER:
      return "worker group";
    case v1::DECODER:
      return "decoder";
    default:
      return "peer";
  }
}

inline v1::Envelope envelope() {
  v1::Envelope e;
  e.set_version(wire::kProtocolVersion);
  return e;
}

// A registered worker group (its rank 0's connection).
struct Group {
  std::string name;
  std::weak_ptr<Session> session;
  v1::WorkerRegister reg;
  uint64_t job = 0;            // running job, 0: idle
  uint64_t cancelled_job = 0;  // cancelled, not yet ended by the group
  Clock::time_point cancel_time, cancel_deadline;
  Clock::time_point last_seen;
  bool alive = true;
  // The KV-head placement of the last assignment (empty: the contiguous one every group
  // loads); the next plan keeps it while it stays balanced (place_kv_heads), so that a
  // group re-reads attention slices only when the balance asks for it.
  TpPlan placement;
};

struct Decoder {
  std::string name;
  std::weak_ptr<Session> session;
  v1::DecoderRegister reg;
  std::string host;  // where workers push pages
  uint64_t reserved_bytes = 0;
  std::set<uint64_t> jobs;
  Clock::time_point last_seen;
  bool alive = true;
};

// A job's record. finish() drops what grows with the client's input (tokens, tag, options'
// lists, policy): a finished record keeps counts and short strings only.
struct Job {
  uint64_t id = 0;
  v1::JobState state = v1::QUEUED;
  std::weak_ptr<Session> client;
  const Session* client_raw = nullptr;  // identity only (disconnect cleanup)
  bool detached = false;                // survives its client's disconnect
  std::string client_name;
  std::string owner;  // client key name ("" without --client-keys: every client sees it)
  std::shared_ptr<const SparsePolicy> policy;
  std::vector<int32_t> tokens;  // empty once finished (prompt_tokens stays)
  int64_t prompt_tokens = 0;
  v1::JobOptions options;  // without sparse_config (resolved into policy)
  std::string client_tag;
  uint64_t kv_bytes = 0;
  std::string group, decoder;
  std::string kv_transport;  // chosen at dispatch (coordinator/transport_choice.h)
  bool ready = false;        // decoder answered Ready; Assignment sent
  int layer = 0, n_layers = 0;
  Clock::time_point submitted, started, prefill_started, deadline;
  double queue_ms = 0;
  v1::WorkerDone worker_done;
  double ttft_ms = 0;
  std::string error;
};

// What a SubmitJob becomes before the service lock is taken (intake.cc).
struct PreparedJob {
  v1::KvContract contract;  // the service's contract the checks used; compared again under mu
  std::vector<int32_t> tokens;
  v1::JobOptions options;  // sparse_config cleared
  std::shared_ptr<const SparsePolicy> policy;
};

struct Coordinator::Impl : std::enable_shared_from_this<Coordinator::Impl> {
  explicit Impl(CoordinatorOptions o);

  CoordinatorOptions opt;
  asio::io_context io;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work;
  // The two acceptors and the ticker are touched only on listen_strand (their handlers,
  // re-arming, and the close at stop), so that stop() never races an accept (TSan).
  asio::strand<asio::io_context::executor_type> listen_strand{asio::make_strand(io)};
  tcp::acceptor acceptor{io};
  tcp::acceptor metrics_acceptor{io};
  asio::steady_timer ticker{io};
  std::vector<std::thread> threads;
  std::atomic<bool> stopping{false};
  std::optional<Tokenizer> tokenizer;
  int max_piece_bytes = 0;  // longest tokenizer piece: a text of B bytes is >= (B+1)/this tokens
  SparseSource sparse_source;
  std::unique_ptr<ClientKeyFile> client_keys;  // --client-keys (thread-safe itself)
  std::unique_ptr<asio::ssl::context> tls;     // --tls-cert / --tls-key
  std::atomic<int64_t> large_frame_bytes{0};   // granted to partial large client frames
  // Lines a stranger can cause at will (refusals; client connections) are limited to one a
  // second each; the next line written says how many were left out.
  using LogLimiter = wire::LineLimiter;
  LogLimiter refusal_log, connect_log;
  // A keyed client's refused jobs: one limiter per key, so one tenant's flood does not hide
  // another's refusals (bounded by the keys file).
  std::mutex key_logs_mu;
  std::map<std::string, LogLimiter> key_logs;
  std::atomic<uint64_t> log_suppressed{0};
  int key_check_ticks = 0;
  // Intake work (opt.prep_threads threads): created by start(), taken out, stopped and
  // joined by stop(); posted to only through post_prep().
  std::mutex prep_mu;
  std::unique_ptr<asio::thread_pool> prep;     // under prep_mu
  bool post_prep(std::function<void()> task);  // false once stopped

  // ---- state (mu) ----
  std::mutex mu;
  uint64_t next_job_id = 1;
  std::map<uint64_t, Job> jobs;
  std::deque<uint64_t> queue;  // QUEUED job ids, FIFO
  std::deque<uint64_t> finished;
  std::map<std::string, Group> groups;
  std::map<std::string, Decoder> decoders;
  std::optional<v1::KvContract> contract;  // of the service while any group/decoder is live
  std::set<Session*> sessions;
  int64_t pre_hello = 0;                              // sessions before their hello
  std::deque<std::weak_ptr<Session>> pre_hello_fifo;  // oldest first (may hold stale ones)
  MetricsSnapshot metrics;

  // ---- coordinator.cc: life cycle, ticker, /metrics, routing ----
  void setup_tls(bool loopback);  // --tls-cert / --tls-key; beyond loopback: TLS or --insecure
  void start();
  void stop();
  void arm_ticker();
  void tick();  // every 100 ms: heartbeats, deadlines, cancel grace
  void do_accept_metrics();
  std::string metrics_text_locked_copy();  // takes mu
  void log(const char* fmt, ...) __attribute__((format(printf, 2, 3)));
  // Called from session strands (take mu).
  void on_hello(const SessionPtr& s);
  // false: the message went to the prep pool; the session reads on after s->resume().
  bool on_message(const SessionPtr& s, v1::Envelope& env);
  void on_closed(Session* s);
  // With mu held, as everything below (except intake.cc).
  void route_locked(const SessionPtr& s, v1::Envelope& env);  // by the sender's role
  void send_to(const std::weak_ptr<Session>& w, const v1::Envelope& env);
  void protocol_error(const SessionPtr& s, const std::string& why);
  void unexpected_message(const SessionPtr& s, const v1::Envelope& env, const char* from);

  // ---- session.cc ----
  void do_accept();

  // ---- access.cc ----
  // A refusal line (pre-hello events, refused hellos, refused jobs, a client's bad frame):
  // at most one a second; the next one written says how many were left out. Not with mu
  // held. log_connect: the same for client connections (a flood of them).
  void log_refusal(const char* fmt, ...) __attribute__((format(printf, 2, 3)));
  void log_connect(const char* fmt, ...) __attribute__((format(printf, 2, 3)));
  // A refused job: limited per client key (owner), else with the other refusals.
  void log_job_refusal(const std::string& owner, const char* fmt, ...)
      __attribute__((format(printf, 3, 4)));
  void log_limited(LogLimiter& l, const char* what, const char* fmt, va_list ap);
  // A new connection enters the pre-hello pool; returns those to close (the oldest) when
  // it is full. With max_connections authenticated peers already: *full says so and s
  // stays out (it could not be admitted after its hello either).
  std::vector<SessionPtr> enter_pre_hello(const SessionPtr& s, std::string* full);
  // What a ClientHello must prove: *secret (empty: nothing), *identity and *admin for a
  // client; "" or the refusal with *code.
  std::string hello_key(const v1::ClientHello& h, std::string* secret, std::string* identity,
                        bool* admin, std::string* key_digest, v1::ErrorCode* code);
  // The hello was proved: leave the pre-hello pool; "" or the refusal (authenticated
  // connections over max_connections).
  std::string leave_pre_hello(Session* s);
  bool reserve_large_frame(size_t n);
  void release_large_frame(size_t n);
  // Re-reads the client keys (force, or when the file changed) and closes the client
  // connections whose key is gone or changed.
  void check_client_keys(bool force);

  // ---- registry.cc ----
  void handle_worker_register(const SessionPtr& s, const v1::WorkerRegister& m);
  void handle_decoder_register(const SessionPtr& s, const v1::DecoderRegister& m);
  void handle_worker_message(const SessionPtr& s, v1::Envelope& env);
  void handle_decoder_message(const SessionPtr& s, v1::Envelope& env);
  bool check_contract(const v1::KvContract& kv, std::string* why);
  void maybe_reset_contract();
  Group* pick_group(const Job& j);
  // A decoder for j next to group g, and the pair's KV transport (*transport).
  Decoder* pick_decoder(const Job& j, const Group& g, std::string* transport);
  void fail_group(Group& g, const std::string& why);
  void fail_decoder(Decoder& d, const std::string& why);
  void expire_silent_peers(Clock::time_point now);
  void end_cancel_grace(Clock::time_point now);

  // ---- intake.cc (no lock held unless said) ----
  bool on_submit(const SessionPtr& s, v1::Envelope& env);
  // Every "empty, else the reason with *code" below.
  std::string check_sizes(const v1::SubmitJob& m, v1::ErrorCode* code) const;
  std::string snapshot_contract(v1::KvContract* kc, v1::ErrorCode* code);  // takes mu briefly
  std::string check_prompt_form(const v1::SubmitJob& m, const v1::KvContract& kc,
                                v1::ErrorCode* code) const;
  // The prompt ids (tokenizing a text), the options and the sparse policy.
  std::string prepare(const v1::SubmitJob& m, PreparedJob* p, v1::ErrorCode* code) const;
  void complete_submit(const SessionPtr& s, const v1::SubmitJob& m, PreparedJob&& p,
                       const std::string& why, v1::ErrorCode code);                     // takes mu
  void refuse_submit(const SessionPtr& s, v1::ErrorCode code, const std::string& why);  // mu held

  // ---- admission.cc ----
  std::string check_options(const v1::JobOptions& o, const v1::ModelFingerprint& model, int64_t n,
                            v1::ErrorCode* code) const;
  // With mu held: the service still runs the prepared contract, the named group / decoder
  // exist, capacity (*kv filled) and the queue limit.
  std::string admit_locked(const PreparedJob& p, uint64_t* kv, v1::ErrorCode* code);
  std::string check_capacity(const v1::JobOptions& o, int64_t n, uint64_t* kv, v1::ErrorCode* code);
  std::string client_limit_reason(const Session* s, int64_t tokens, v1::ErrorCode* code);
  bool may_see(const Session& s, const Job& j) const;  // the caller's own job, or admin

  // ---- jobs.cc ----
  void handle_submit(const SessionPtr& s, const v1::SubmitJob& m, PreparedJob&& p);
  void handle_cancel(const SessionPtr& s, uint64_t job_id);
  void handle_status(const SessionPtr& s, uint64_t job_id);
  void dispatch();
  void send_assignment(Job& j);
  void finish(Job& j, v1::JobState state, v1::ErrorCode code, const std::string& message);
  void free_group_of(Job& j, bool cancel);
  void release_decoder_of(Job& j, bool send_release);
  void fill_status(const Job& j, v1::JobStatus* st) const;
  void progress(Job& j);
  void count_state(v1::JobState s, int delta);
  void set_state(Job& j, v1::JobState s);
  void expire_deadlines(Clock::time_point now);
  // Job events of a registered group / decoder.
  Job* running_job_of(Group& g, uint64_t id);
  void end_cancelled(Group& g, uint64_t id);
  void on_worker_progress(const SessionPtr& s, Group& g, const v1::WorkerProgress& p);
  void on_worker_done(Group& g, const v1::WorkerDone& m);
  void record_audit(const v1::WorkerDone& m);
  void on_worker_failed(Group& g, const v1::WorkerFailed& m);
  Job* live_job_of(Decoder& d, uint64_t id);
  void on_ready(Decoder& d, uint64_t job_id);
  void on_decode_started(Decoder& d, uint64_t job_id);
  void on_decode_done(Decoder& d, const v1::DecodeDone& m);
  void on_decode_failed(Decoder& d, const v1::DecodeFailed& m);
};

}  // namespace mprefill::coord
