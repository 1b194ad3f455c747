#include "coordinator/coordinator.h"

#include <algorithm>
#include <atomic>
#include <boost/asio.hpp>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <ctime>
#include <deque>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <vector>

#include "coordinator/metrics.h"
#include "coordinator/planner.h"
#include "model/sparse_policy.h"
#include "model/tokenizer.h"

namespace mprefill::coord {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
namespace v1 = ::mprefill::v1;

namespace {

// A session whose unsent frames exceed this is a peer that does not read: closed.
constexpr size_t kMaxQueuedBytes = size_t{256} << 20;
constexpr size_t kReadChunk = size_t{64} << 10;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

const char* state_name(v1::JobState s) {
  switch (s) {
    case v1::QUEUED:
      return "QUEUED";
    case v1::RUNNING:
      return "RUNNING";
    case v1::HANDING_OFF:
      return "HANDING_OFF";
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

bool terminal(v1::JobState s) { return s == v1::DONE || s == v1::FAILED || s == v1::CANCELLED; }

const char* role_name(v1::Role r) {
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

v1::Envelope envelope() {
  v1::Envelope e;
  e.set_version(wire::kProtocolVersion);
  return e;
}

}  // namespace

// ------------------------------------------------------------------------------ Session

class Session;
using SessionPtr = std::shared_ptr<Session>;

struct Coordinator::Impl : std::enable_shared_from_this<Coordinator::Impl> {
  explicit Impl(CoordinatorOptions o);

  CoordinatorOptions opt;
  asio::io_context io;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work;
  tcp::acceptor acceptor{io};
  tcp::acceptor metrics_acceptor{io};
  asio::steady_timer ticker{io};
  std::vector<std::thread> threads;
  std::atomic<bool> stopping{false};
  std::optional<Tokenizer> tokenizer;

  // ---- state (mu) ----
  struct Group {
    std::string name;
    std::weak_ptr<Session> session;
    v1::WorkerRegister reg;
    uint64_t job = 0;            // running job, 0: idle
    uint64_t cancelled_job = 0;  // cancelled, not yet ended by the group
    Clock::time_point cancel_time, cancel_deadline;
    Clock::time_point last_seen;
    bool alive = true;
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
  struct Job {
    uint64_t id = 0;
    v1::JobState state = v1::QUEUED;
    std::weak_ptr<Session> client;
    const Session* client_raw = nullptr;  // identity only (disconnect cleanup)
    bool detached = false;                // survives its client's disconnect
    std::string client_name;
    std::shared_ptr<const SparsePolicy> policy;
    std::vector<int32_t> tokens;
    v1::JobOptions options;
    std::string client_tag;
    uint64_t kv_bytes = 0;
    std::string group, decoder;
    bool ready = false;  // decoder answered Ready; Assignment sent
    int layer = 0, n_layers = 0;
    Clock::time_point submitted, started, prefill_started, deadline;
    double queue_ms = 0;
    v1::WorkerDone worker_done;
    double ttft_ms = 0;
    std::string error;
  };

  std::mutex mu;
  uint64_t next_job_id = 1;
  std::map<uint64_t, Job> jobs;
  std::deque<uint64_t> queue;  // QUEUED job ids, FIFO
  std::deque<uint64_t> finished;
  std::map<std::string, Group> groups;
  std::map<std::string, Decoder> decoders;
  std::optional<v1::KvContract> contract;  // of the service while any group/decoder is live
  std::set<Session*> sessions;
  MetricsSnapshot metrics;

  // ---- life cycle ----
  void start();
  void stop();
  void do_accept();
  void do_accept_metrics();
  void tick();
  void log(const char* fmt, ...) __attribute__((format(printf, 2, 3)));

  // ---- handlers (called from session strands) ----
  void on_hello(const SessionPtr& s);
  void on_message(const SessionPtr& s, v1::Envelope& env);
  void on_closed(Session* s);

  // All below with mu held.
  void handle_submit(const SessionPtr& s, const v1::SubmitJob& m);
  void handle_cancel(const SessionPtr& s, uint64_t job_id);
  void handle_status(const SessionPtr& s, uint64_t job_id);
  void handle_worker_register(const SessionPtr& s, const v1::WorkerRegister& m);
  void handle_decoder_register(const SessionPtr& s, const v1::DecoderRegister& m);
  void handle_worker_message(const SessionPtr& s, v1::Envelope& env);
  void handle_decoder_message(const SessionPtr& s, v1::Envelope& env);
  bool check_contract(const v1::KvContract& kv, std::string* why);
  void maybe_reset_contract();
  std::string refuse_reason_locked(const v1::SubmitJob& m, std::vector<int32_t>* tokens,
                                   uint64_t* kv, v1::ErrorCode* code);
  void dispatch();
  void send_assignment(Job& j);
  void finish(Job& j, v1::JobState state, v1::ErrorCode code, const std::string& message);
  void free_group_of(Job& j, bool cancel);
  void release_decoder_of(Job& j, bool send_release);
  void fail_group(Group& g, const std::string& why);
  void fail_decoder(Decoder& d, const std::string& why);
  void send_to(const std::weak_ptr<Session>& w, const v1::Envelope& env);
  void fill_status(const Job& j, v1::JobStatus* st) const;
  void progress(Job& j);
  Group* pick_group(const Job& j);
  Decoder* pick_decoder(const Job& j);
  std::string metrics_text_locked_copy();
  void protocol_error(const SessionPtr& s, const std::string& why);
  void count_state(v1::JobState s, int delta);
  void set_state(Job& j, v1::JobState s);
};

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(std::shared_ptr<Coordinator::Impl> c, tcp::socket sock)
      : coord_(std::move(c)),
        socket_(std::move(sock)),
        strand_(asio::make_strand(coord_->io)),
        hello_timer_(coord_->io),
        linger_timer_(coord_->io),
        frame_timer_(coord_->io),
        parser_(std::min(coord_->opt.max_frame, wire::kHelloMaxFrame)) {  // raised after hello
    boost::system::error_code ec;
    auto ep = socket_.remote_endpoint(ec);
    peer_ = ec ? "?" : ep.address().to_string() + ":" + std::to_string(ep.port());
    socket_.set_option(tcp::no_delay(true), ec);
  }

  void start() {
    auto self = shared_from_this();
    asio::dispatch(strand_, [self] {
      self->nonce_ = wire::random_nonce();
      self->write(wire::encode_frame(
          wire::make_server_hello(self->nonce_, !self->coord_->opt.secret.empty())));
      self->hello_timer_.expires_after(
          std::chrono::milliseconds(self->coord_->opt.hello_timeout_ms));
      self->hello_timer_.async_wait(
          asio::bind_executor(self->strand_, [self](const boost::system::error_code& ec) {
            if (!ec && !self->hello_done_ && !self->closed_) {
              self->coord_->log("%s: no ClientHello within %d ms, closing", self->peer_.c_str(),
                                self->coord_->opt.hello_timeout_ms);
              self->close();
            }
          }));
      self->read();
    });
  }

  // A connection over --max-connections: one Error, then closed (never registered).
  void refuse(const std::string& why) {
    auto self = shared_from_this();
    asio::dispatch(strand_, [self, why] {
      self->coord_->log("%s: connection refused: %s", self->peer_.c_str(), why.c_str());
      self->send_error_and_close(0, v1::RESOURCE_EXHAUSTED, why);
    });
  }

  // Thread-safe: queues a frame onto the strand.
  void send(const v1::Envelope& env) {
    std::string frame = wire::encode_frame(env);
    auto self = shared_from_this();
    asio::post(strand_, [self, f = std::move(frame)]() mutable { self->write(std::move(f)); });
  }
  // Error, then close once it is written.
  void send_error_and_close(uint64_t job, v1::ErrorCode code, const std::string& msg) {
    std::string frame = wire::encode_frame(wire::make_error(job, code, msg));
    auto self = shared_from_this();
    asio::post(strand_, [self, f = std::move(frame)]() mutable {
      self->write(std::move(f));
      self->close_after_flush_ = true;
      if (!self->writing_) {
        self->close();
        return;
      }
      // A peer that does not read the Error is closed anyway after 5 s.
      self->linger_timer_.expires_after(std::chrono::seconds(5));
      self->linger_timer_.async_wait(
          asio::bind_executor(self->strand_, [self](const boost::system::error_code& ec) {
            if (!ec) self->close();
          }));
    });
  }
  void close_async() {
    auto self = shared_from_this();
    asio::post(strand_, [self] { self->close(); });
  }

  const std::string& peer() const { return peer_; }
  // Set once by the hello on the strand, read under the coordinator's mutex afterwards.
  v1::Role role() const { return role_; }
  const std::string& name() const { return name_; }
  std::string registered;  // group / decoder name once registered (under coordinator mu)

 private:
  void write(std::string frame) {
    if (closed_) return;
    queued_bytes_ += frame.size();
    if (queued_bytes_ > kMaxQueuedBytes) {
      coord_->log("%s: peer does not read (%zu bytes queued), closing", peer_.c_str(),
                  queued_bytes_);
      close();
      return;
    }
    outq_.push_back(std::move(frame));
    if (!writing_) write_next();
  }

  void write_next() {
    if (outq_.empty() || closed_) {
      writing_ = false;
      if (close_after_flush_) close();
      return;
    }
    writing_ = true;
    auto self = shared_from_this();
    asio::async_write(
        socket_, asio::buffer(outq_.front()),
        asio::bind_executor(strand_, [self](const boost::system::error_code& ec, size_t n) {
          self->queued_bytes_ -= n;
          if (!self->outq_.empty()) self->outq_.pop_front();
          if (ec) {
            self->close();
            return;
          }
          self->write_next();
        }));
  }

  void read() {
    if (closed_) return;
    auto self = shared_from_this();
    socket_.async_read_some(
        asio::buffer(buf_.data(), buf_.size()),
        asio::bind_executor(strand_, [self](const boost::system::error_code& ec, size_t n) {
          if (ec) {
            self->close();
            return;
          }
          self->parser_.feed(self->buf_.data(), n);
          self->drain();
        }));
  }

  // After the hello: a frame begun (bytes buffered) must be complete within
  // frame_timeout_ms; the clock restarts with each complete frame.
  void watch_partial_frame(bool progressed) {
    if (frame_timer_armed_ && (progressed || parser_.buffered() == 0)) {
      frame_timer_armed_ = false;
      ++frame_gen_;
      frame_timer_.cancel();
    }
    if (frame_timer_armed_ || parser_.buffered() == 0 || closed_) return;
    frame_timer_armed_ = true;
    const int ms = coord_->opt.frame_timeout_ms;
    frame_timer_.expires_after(std::chrono::milliseconds(ms));
    auto self = shared_from_this();
    frame_timer_.async_wait(asio::bind_executor(
        strand_, [self, gen = frame_gen_, ms](const boost::system::error_code& ec) {
          if (ec || gen != self->frame_gen_ || !self->frame_timer_armed_ || self->closed_) return;
          self->bad_frame(v1::BAD_FRAME, "frame not completed within " + std::to_string(ms) +
                                             " ms (" + std::to_string(self->parser_.buffered()) +
                                             " bytes of it arrived)");
        }));
  }

  void drain() {
    bool progressed = false;
    for (;;) {
      if (closed_ || close_after_flush_) return;
      v1::Envelope env;
      std::string err;
      auto r = parser_.next(&env, &err);
      if (r == wire::FrameParser::Result::kNeedMore) break;
      progressed = true;
      if (r == wire::FrameParser::Result::kError) {
        bad_frame(parser_.error_kind() == wire::WireError::Kind::kBadVersion ? v1::BAD_VERSION
                                                                             : v1::BAD_FRAME,
                  err);
        return;
      }
      if (!hello_done_) {
        if (!env.has_client_hello()) {
          bad_frame(v1::BAD_FRAME, "first frame is not a ClientHello");
          return;
        }
        std::string why;
        v1::ErrorCode code = v1::ERROR_CODE_UNSPECIFIED;
        if (!wire::check_client_hello(env.client_hello(), nonce_, v1::ROLE_UNSPECIFIED,
                                      coord_->opt.secret, &why, &code)) {
          coord_->log("%s: hello refused: %s", peer_.c_str(), why.c_str());
          send_error_and_close(0, code, why);
          return;
        }
        hello_done_ = true;
        hello_timer_.cancel();
        parser_.set_max_frame(coord_->opt.max_frame);
        role_ = env.client_hello().role();
        name_ = env.client_hello().name();
        auto ok = envelope();
        ok.mutable_hello_accepted()->set_server("mprefill-coordinator");
        write(wire::encode_frame(ok));
        coord_->on_hello(shared_from_this());
        continue;
      }
      coord_->on_message(shared_from_this(), env);
    }
    if (hello_done_) watch_partial_frame(progressed);
    read();
  }

  void bad_frame(v1::ErrorCode code, const std::string& why) {
    coord_->log("%s (%s %s): bad frame: %s; closing this connection", peer_.c_str(),
                role_name(role_), name_.c_str(), why.c_str());
    {
      std::lock_guard<std::mutex> lk(coord_->mu);
      ++coord_->metrics.bad_frames;
    }
    send_error_and_close(0, code, why);
  }

 public:
  void close() {
    if (closed_) return;
    closed_ = true;
    boost::system::error_code ec;
    hello_timer_.cancel();
    linger_timer_.cancel();
    frame_timer_.cancel();
    socket_.shutdown(tcp::socket::shutdown_both, ec);
    socket_.close(ec);
    coord_->on_closed(this);
  }

 private:
  std::shared_ptr<Coordinator::Impl> coord_;
  tcp::socket socket_;
  asio::strand<asio::io_context::executor_type> strand_;
  asio::steady_timer hello_timer_;
  asio::steady_timer linger_timer_;  // bounds close-after-flush
  asio::steady_timer frame_timer_;   // bounds a frame begun after the hello
  bool frame_timer_armed_ = false;
  uint64_t frame_gen_ = 0;
  wire::FrameParser parser_;
  std::array<char, kReadChunk> buf_;
  std::deque<std::string> outq_;
  size_t queued_bytes_ = 0;
  bool writing_ = false, closed_ = false, close_after_flush_ = false, hello_done_ = false;
  std::string nonce_, peer_, name_;
  v1::Role role_ = v1::ROLE_UNSPECIFIED;
};

// ------------------------------------------------------------------------------ Impl

Coordinator::Impl::Impl(CoordinatorOptions o) : opt(std::move(o)) {
  if (opt.threads < 1) throw std::invalid_argument("coordinator: threads must be >= 1");
  if (opt.queue_limit < 0) throw std::invalid_argument("coordinator: queue_limit must be >= 0");
  if (opt.max_jobs_per_client < 1)
    throw std::invalid_argument("coordinator: max_jobs_per_client must be >= 1");
  if (opt.heartbeat_ms < 10 || opt.heartbeat_timeout_ms < opt.heartbeat_ms)
    throw std::invalid_argument(
        "coordinator: heartbeat_ms must be >= 10 and heartbeat_timeout_ms >= heartbeat_ms");
  if (!opt.tokenizer.empty()) tokenizer = Tokenizer::load(opt.tokenizer);
  boost::system::error_code ec;
  auto addr = asio::ip::make_address(opt.host, ec);
  if (ec) throw std::runtime_error("coordinator: bad bind address '" + opt.host + "'");
  auto bind = [&](tcp::acceptor& a, uint16_t port, const char* what) {
    tcp::endpoint ep(addr, port);
    a.open(ep.protocol(), ec);
    if (!ec) a.set_option(tcp::acceptor::reuse_address(true), ec);
    if (!ec) a.bind(ep, ec);
    if (!ec) a.listen(asio::socket_base::max_listen_connections, ec);
    if (ec)
      throw std::runtime_error(std::string("coordinator: cannot listen (") + what + ") on " +
                               opt.host + ":" + std::to_string(port) + ": " + ec.message());
  };
  bind(acceptor, opt.port, "service");
  if (opt.metrics_port >= 0)
    bind(metrics_acceptor, static_cast<uint16_t>(opt.metrics_port), "metrics");
}

void Coordinator::Impl::log(const char* fmt, ...) {
  if (!opt.log) return;
  char msg[2048];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  std::time_t t = std::time(nullptr);
  char ts[32];
  std::tm utc{};
  gmtime_r(&t, &utc);  // io threads log concurrently: gmtime's static buffer races (TSan)
  std::strftime(ts, sizeof(ts), "%H:%M:%S", &utc);
  std::fprintf(stderr, "mprefill-coordinator %s: %s\n", ts, msg);
}

void Coordinator::Impl::start() {
  work.emplace(io.get_executor());
  do_accept();
  if (metrics_acceptor.is_open()) do_accept_metrics();
  ticker.expires_after(std::chrono::milliseconds(100));
  ticker.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (!ec) self->tick();
  });
  for (int i = 0; i < opt.threads; ++i)
    threads.emplace_back([this] {
      // A handler that throws must not take the server down: log and keep serving.
      for (;;) {
        try {
          io.run();
          return;
        } catch (const std::exception& e) {
          log("internal error in an io handler (serving on): %s", e.what());
        }
      }
    });
}

void Coordinator::Impl::stop() {
  if (stopping.exchange(true)) return;
  asio::post(io, [self = shared_from_this()] {
    boost::system::error_code ec;
    self->acceptor.close(ec);
    self->metrics_acceptor.close(ec);
    self->ticker.cancel();
  });
  std::vector<SessionPtr> all;
  {
    std::lock_guard<std::mutex> lk(mu);
    for (Session* s : sessions) all.push_back(s->shared_from_this());
  }
  for (auto& s : all) s->close_async();
  work.reset();
  // Sessions close, pending handlers drain; then the threads return.
  for (auto& t : threads)
    if (t.joinable()) t.join();
  threads.clear();
}

void Coordinator::Impl::do_accept() {
  acceptor.async_accept(
      [self = shared_from_this()](const boost::system::error_code& ec, tcp::socket sock) {
        if (self->stopping) return;
        if (!ec) {
          auto s = std::make_shared<Session>(self, std::move(sock));
          std::string full;
          {
            std::lock_guard<std::mutex> lk(self->mu);
            if (static_cast<int64_t>(self->sessions.size()) >= self->opt.max_connections) {
              full = "too many connections: " + std::to_string(self->sessions.size()) +
                     " open (--max-connections " + std::to_string(self->opt.max_connections) + ")";
              ++self->metrics.refused_connections;
            } else {
              self->sessions.insert(s.get());
              self->metrics.connections = static_cast<int64_t>(self->sessions.size());
            }
          }
          if (full.empty())
            s->start();
          else
            s->refuse(full);
        }
        self->do_accept();
      });
}

// Minimal HTTP/1.0 server: GET /metrics -> the Prometheus text; anything else 404.
void Coordinator::Impl::do_accept_metrics() {
  metrics_acceptor.async_accept(
      [self = shared_from_this()](const boost::system::error_code& ec, tcp::socket sock) {
        if (self->stopping) return;
        if (!ec) {
          struct Http {
            Http(tcp::socket s, asio::io_context& io) : sock(std::move(s)), timer(io) {}
            tcp::socket sock;
            asio::steady_timer timer;
            asio::streambuf buf{8192};  // a request head larger than this is refused
            std::string reply;
          };
          auto h = std::make_shared<Http>(std::move(sock), self->io);
          h->timer.expires_after(std::chrono::seconds(5));
          h->timer.async_wait([h](const boost::system::error_code& e) {
            if (!e) {
              boost::system::error_code ig;
              h->sock.close(ig);
            }
          });
          asio::async_read_until(
              h->sock, h->buf, "\r\n\r\n", [self, h](const boost::system::error_code& e, size_t) {
                std::string status = "400 Bad Request", body = "bad request\n";
                if (!e) {
                  std::istream is(&h->buf);
                  std::string method, path;
                  is >> method >> path;
                  if (method == "GET" && (path == "/metrics" || path.rfind("/metrics?", 0) == 0)) {
                    status = "200 OK";
                    body = self->metrics_text_locked_copy();
                  } else if (method == "GET") {
                    status = "404 Not Found";
                    body = "not found: try /metrics\n";
                  }
                }
                h->reply = "HTTP/1.0 " + status +
                           "\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                           "Content-Length: " +
                           std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
                asio::async_write(h->sock, asio::buffer(h->reply),
                                  [h](const boost::system::error_code&, size_t) {
                                    boost::system::error_code ig;
                                    h->sock.shutdown(tcp::socket::shutdown_both, ig);
                                    h->sock.close(ig);
                                    h->timer.cancel();
                                  });
              });
        }
        self->do_accept_metrics();
      });
}

std::string Coordinator::Impl::metrics_text_locked_copy() {
  MetricsSnapshot snap;
  {
    std::lock_guard<std::mutex> lk(mu);
    snap = metrics;
    snap.groups_alive = snap.groups_busy = 0;
    for (const auto& [n, g] : groups) {
      ++snap.groups_alive;
      if (g.job != 0 || g.cancelled_job != 0) ++snap.groups_busy;
    }
    snap.decoders_alive = static_cast<int64_t>(decoders.size());
  }
  return render_metrics(snap);
}

void Coordinator::Impl::count_state(v1::JobState s, int delta) {
  switch (s) {
    case v1::QUEUED:
      metrics.queued += delta;
      break;
    case v1::RUNNING:
      metrics.running += delta;
      break;
    case v1::HANDING_OFF:
      metrics.handing_off += delta;
      break;
    case v1::DONE:
      metrics.done += delta > 0 ? 1 : 0;
      break;
    case v1::FAILED:
      metrics.failed += delta > 0 ? 1 : 0;
      break;
    case v1::CANCELLED:
      metrics.cancelled += delta > 0 ? 1 : 0;
      break;
    default:
      break;
  }
}

void Coordinator::Impl::set_state(Job& j, v1::JobState s) {
  count_state(j.state, -1);
  count_state(s, +1);
  j.state = s;
}

void Coordinator::Impl::send_to(const std::weak_ptr<Session>& w, const v1::Envelope& env) {
  if (auto s = w.lock()) s->send(env);
}

void Coordinator::Impl::protocol_error(const SessionPtr& s, const std::string& why) {
  ++metrics.bad_frames;
  log("%s (%s %s): %s; closing this connection", s->peer().c_str(), role_name(s->role()),
      s->name().c_str(), why.c_str());
  s->send_error_and_close(0, v1::BAD_FRAME, why);
}

void Coordinator::Impl::fill_status(const Job& j, v1::JobStatus* st) const {
  st->set_job_id(j.id);
  st->set_state(j.state);
  st->set_layer(j.layer);
  st->set_n_layers(j.n_layers);
  st->set_prompt_tokens(static_cast<int64_t>(j.tokens.size()));
  st->set_group(j.group);
  st->set_decoder(j.decoder);
  st->set_error(j.error);
}

void Coordinator::Impl::progress(Job& j) {
  if (!j.options.want_progress()) return;
  auto env = envelope();
  auto* p = env.mutable_progress();
  p->set_job_id(j.id);
  p->set_state(j.state);
  p->set_layer(j.layer);
  p->set_n_layers(j.n_layers);
  if (j.state == v1::HANDING_OFF) {  // prefill finished: its final rate
    const double ms = j.worker_done.prefill_ms();
    p->set_elapsed_ms(ms);
    if (ms > 0) p->set_tokens_per_s(static_cast<double>(j.tokens.size()) / (ms / 1000.0));
  } else if (j.state == v1::RUNNING && j.ready) {
    const double ms = ms_between(j.prefill_started, Clock::now());
    p->set_elapsed_ms(ms);
    if (ms > 0 && j.n_layers > 0)
      p->set_tokens_per_s(static_cast<double>(j.tokens.size()) * j.layer / j.n_layers /
                          (ms / 1000.0));
  }
  send_to(j.client, env);
}

// ---- hello / dispatch of messages by role

void Coordinator::Impl::on_hello(const SessionPtr& s) {
  log("%s connected as %s '%s'", s->peer().c_str(), role_name(s->role()), s->name().c_str());
}

void Coordinator::Impl::on_message(const SessionPtr& s, v1::Envelope& env) {
  std::lock_guard<std::mutex> lk(mu);
  try {
    switch (s->role()) {
      case v1::CLIENT:
        if (env.has_submit()) return handle_submit(s, env.submit());
        if (env.has_cancel()) return handle_cancel(s, env.cancel().job_id());
        if (env.has_status_request()) return handle_status(s, env.status_request().job_id());
        break;
      case v1::WORKER:
        if (env.has_worker_register()) return handle_worker_register(s, env.worker_register());
        if (s->registered.empty())
          return protocol_error(s, "worker group sent a message before WorkerRegister");
        return handle_worker_message(s, env);
      case v1::DECODER:
        if (env.has_decoder_register()) return handle_decoder_register(s, env.decoder_register());
        if (s->registered.empty())
          return protocol_error(s, "decoder sent a message before DecoderRegister");
        return handle_decoder_message(s, env);
      default:
        break;
    }
    const auto* f = env.GetDescriptor()->FindFieldByNumber(env.msg_case());
    protocol_error(s, std::string("unexpected message '") + (f ? f->name() : "?") + "' from a " +
                          role_name(s->role()));
  } catch (const std::exception& e) {
    log("%s: internal error while handling a message: %s", s->peer().c_str(), e.what());
    s->send(wire::make_error(0, v1::INTERNAL, std::string("coordinator: ") + e.what()));
  }
}

void Coordinator::Impl::on_closed(Session* s) {
  std::lock_guard<std::mutex> lk(mu);
  sessions.erase(s);
  metrics.connections = static_cast<int64_t>(sessions.size());
  if (stopping) return;
  if (s->role() == v1::WORKER && !s->registered.empty()) {
    auto it = groups.find(s->registered);
    if (it != groups.end() && it->second.session.lock().get() == s)
      fail_group(it->second, "connection closed");
  } else if (s->role() == v1::DECODER && !s->registered.empty()) {
    auto it = decoders.find(s->registered);
    if (it != decoders.end() && it->second.session.lock().get() == s)
      fail_decoder(it->second, "connection closed");
  } else if (s->role() == v1::CLIENT) {
    std::vector<uint64_t> mine;
    for (auto& [id, j] : jobs)
      if (j.client_raw == s && !j.detached && !terminal(j.state)) mine.push_back(id);
    for (uint64_t id : mine)
      finish(jobs[id], v1::CANCELLED, v1::CANCELLED_BY_CLIENT, "client disconnected");
    if (!mine.empty())
      log("client %s disconnected: %zu job(s) cancelled", s->peer().c_str(), mine.size());
  }
}

// ---- registration

bool Coordinator::Impl::check_contract(const v1::KvContract& kv, std::string* why) {
  const auto& m = kv.model();
  if (m.n_layers() <= 0 || m.n_heads() <= 0 || m.n_kv_heads() <= 0 || m.head_dim() <= 0 ||
      m.vocab() <= 0 || m.max_position() <= 0 || m.hidden() <= 0) {
    *why = "KV contract: the model shape has a non-positive field";
    return false;
  }
  if (m.n_heads() % m.n_kv_heads() != 0) {
    *why = "KV contract: n_heads is not a multiple of n_kv_heads";
    return false;
  }
  if (dtype_bytes(kv.kv_dtype()) == 0 || kv.page_tokens() <= 0 || kv.layout().empty()) {
    *why = "KV contract: kv_dtype, layout and page_tokens must be set";
    return false;
  }
  // Absurd shapes would overflow the admission arithmetic (layers x heads x head_dim x
  // dtype x tokens in 64 bits): each field and the KV bytes per token are bounded far
  // above any real model (Llama-3 405B: 126 layers, 8 x 128 KV, 2 MiB per token in bf16).
  auto over = [&](const char* what, int64_t v, int64_t max) {
    if (v <= max) return false;
    *why = std::string("KV contract: ") + what + " " + std::to_string(v) + " exceeds the limit " +
           std::to_string(max);
    return true;
  };
  if (over("n_layers", m.n_layers(), 4096) || over("n_heads", m.n_heads(), 65536) ||
      over("head_dim", m.head_dim(), 65536) || over("hidden", m.hidden(), int64_t{1} << 24) ||
      over("vocab", m.vocab(), int64_t{1} << 26) ||
      over("max_position", m.max_position(), int64_t{1} << 34) ||
      over("page_tokens", kv.page_tokens(), int64_t{1} << 20))
    return false;
  // At most 2 x 2^12 x 2^16 x 2^16 x 4 = 2^47 here (no overflow); bounded to 64 MiB per
  // token, so that any token count up to max_position (2^34) stays below 2^60 bytes.
  const uint64_t per_token = kv_bytes(kv, 1);
  if (over("KV bytes per token", static_cast<int64_t>(per_token), int64_t{1} << 26)) return false;
  if (!contract) {
    contract = kv;
    return true;
  }
  const std::string d = contract_difference(*contract, kv);
  if (d.empty()) return true;
  *why = "KV contract differs from the one of the registered worker groups / decoders: " + d;
  return false;
}

void Coordinator::Impl::maybe_reset_contract() {
  if (groups.empty() && decoders.empty()) contract.reset();
}

void Coordinator::Impl::handle_worker_register(const SessionPtr& s, const v1::WorkerRegister& m) {
  auto refuse = [&](v1::ErrorCode code, const std::string& why) {
    log("worker group '%s' from %s refused: %s", m.group().c_str(), s->peer().c_str(), why.c_str());
    s->send_error_and_close(0, code, "worker group registration refused: " + why);
  };
  if (!s->registered.empty())
    return refuse(v1::INVALID_ARGUMENT,
                  "this connection already registered '" + s->registered + "'");
  if (m.group().empty() || m.group().size() > 128)
    return refuse(v1::INVALID_ARGUMENT, "group name must have 1..128 characters");
  if (groups.count(m.group()))
    return refuse(v1::INVALID_ARGUMENT,
                  "a worker group named '" + m.group() + "' is already registered");
  if (m.tp() < 1 || m.sp() < 1 || int64_t{m.world()} != int64_t{m.tp()} * m.sp())
    return refuse(v1::INVALID_ARGUMENT, "world " + std::to_string(m.world()) + " != tp " +
                                            std::to_string(m.tp()) + " x sp " +
                                            std::to_string(m.sp()));
  if (m.ranks_size() != m.world())
    return refuse(v1::INVALID_ARGUMENT, std::to_string(m.ranks_size()) +
                                            " RankInfo entries for a world of " +
                                            std::to_string(m.world()));
  if (m.kv().model().n_kv_heads() > 0 && m.kv().model().n_kv_heads() % m.tp() != 0)
    return refuse(v1::INVALID_ARGUMENT, "tp " + std::to_string(m.tp()) + " does not divide the " +
                                            std::to_string(m.kv().model().n_kv_heads()) +
                                            " KV heads");
  for (const auto& t : m.kv_transports())
    if (t != "tcp" && t != "nccl")
      return refuse(v1::INVALID_ARGUMENT, "unknown KV transport '" + t + "'");
  std::string why;
  if (!check_contract(m.kv(), &why)) return refuse(v1::MODEL_MISMATCH, why);
  Group g;
  g.name = m.group();
  g.session = s;
  g.reg = m;
  if (g.reg.kv_transports_size() == 0) g.reg.add_kv_transports("tcp");
  g.last_seen = Clock::now();
  groups[g.name] = g;
  s->registered = g.name;
  auto env = envelope();
  env.mutable_worker_registered()->set_group(g.name);
  env.mutable_worker_registered()->set_heartbeat_ms(static_cast<uint32_t>(opt.heartbeat_ms));
  s->send(env);
  log("worker group '%s' registered: tp %d x sp %d, model %s, from %s", g.name.c_str(), m.tp(),
      m.sp(), m.kv().model().name().c_str(), s->peer().c_str());
  dispatch();
}

void Coordinator::Impl::handle_decoder_register(const SessionPtr& s, const v1::DecoderRegister& m) {
  auto refuse = [&](v1::ErrorCode code, const std::string& why) {
    log("decoder '%s' from %s refused: %s", m.name().c_str(), s->peer().c_str(), why.c_str());
    s->send_error_and_close(0, code, "decoder registration refused: " + why);
  };
  if (!s->registered.empty())
    return refuse(v1::INVALID_ARGUMENT,
                  "this connection already registered '" + s->registered + "'");
  if (m.name().empty() || m.name().size() > 128)
    return refuse(v1::INVALID_ARGUMENT, "decoder name must have 1..128 characters");
  if (decoders.count(m.name()))
    return refuse(v1::INVALID_ARGUMENT, "a decoder named '" + m.name() + "' is already registered");
  if (m.kv_port() == 0 || m.kv_port() > 65535)
    return refuse(v1::INVALID_ARGUMENT, "kv_port must be in 1..65535");
  if (m.capacity_bytes() == 0) return refuse(v1::INVALID_ARGUMENT, "capacity_bytes must be > 0");
  if (m.max_jobs() < 0) return refuse(v1::INVALID_ARGUMENT, "max_jobs must be >= 0");
  for (const auto& t : m.kv_transports())
    if (t != "tcp" && t != "nccl")
      return refuse(v1::INVALID_ARGUMENT, "unknown KV transport '" + t + "'");
  std::string why;
  if (!check_contract(m.kv(), &why)) return refuse(v1::MODEL_MISMATCH, why);
  Decoder d;
  d.name = m.name();
  d.session = s;
  d.reg = m;
  if (d.reg.kv_transports_size() == 0) d.reg.add_kv_transports("tcp");
  d.host = m.host();
  if (d.host.empty()) d.host = s->peer().substr(0, s->peer().rfind(':'));
  d.last_seen = Clock::now();
  decoders[d.name] = d;
  s->registered = d.name;
  auto env = envelope();
  env.mutable_decoder_registered()->set_name(d.name);
  env.mutable_decoder_registered()->set_heartbeat_ms(static_cast<uint32_t>(opt.heartbeat_ms));
  s->send(env);
  log("decoder '%s' registered: %s:%u, capacity %s, model %s", d.name.c_str(), d.host.c_str(),
      m.kv_port(), format_bytes(m.capacity_bytes()).c_str(), m.kv().model().name().c_str());
  dispatch();
}

// ---- jobs

std::string Coordinator::Impl::refuse_reason_locked(const v1::SubmitJob& m,
                                                    std::vector<int32_t>* tokens, uint64_t* kv,
                                                    v1::ErrorCode* code) {
  auto bad = [&](v1::ErrorCode c, const std::string& why) {
    *code = c;
    return why;
  };
  if (groups.empty()) return bad(v1::UNAVAILABLE, "no worker group is registered");
  if (decoders.empty()) return bad(v1::UNAVAILABLE, "no decoder is registered");
  const v1::KvContract& kc = *contract;
  const auto& model = kc.model();
  if (!m.model().empty() && m.model() != model.name() && m.model() != model.weights_digest())
    return bad(v1::MODEL_MISMATCH, "job asks for model '" + m.model() + "' but the service runs '" +
                                       model.name() + "' (digest " + model.weights_digest() + ")");
  if (!m.text().empty() && m.token_ids_size() > 0)
    return bad(v1::INVALID_ARGUMENT, "give token ids or text, not both");
  if (!m.text().empty()) {
    if (!tokenizer)
      return bad(v1::INVALID_ARGUMENT,
                 "text prompts need a tokenizer on the coordinator (--tokenizer); send token ids");
    if (tokenizer->vocab_size() != model.vocab())
      return bad(v1::INVALID_ARGUMENT,
                 "the coordinator's tokenizer has " + std::to_string(tokenizer->vocab_size()) +
                     " tokens but the model has " + std::to_string(model.vocab()));
    std::vector<int> ids = tokenizer->encode(m.text(), true);
    tokens->assign(ids.begin(), ids.end());
  } else {
    tokens->assign(m.token_ids().begin(), m.token_ids().end());
  }
  const int64_t n = static_cast<int64_t>(tokens->size());
  if (n == 0) return bad(v1::INVALID_ARGUMENT, "prompt is empty");
  for (int64_t i = 0; i < n; ++i) {
    const int32_t id = (*tokens)[i];
    if (id < 0 || id >= model.vocab())
      return bad(v1::INVALID_ARGUMENT, "token id " + std::to_string(id) + " at position " +
                                           std::to_string(i) + " is outside [0, " +
                                           std::to_string(model.vocab()) + ")");
  }
  int64_t limit = model.max_position();
  std::string limit_src = "the model's max_position " + std::to_string(model.max_position());
  if (opt.max_prompt > 0 && opt.max_prompt < limit) {
    limit = opt.max_prompt;
    limit_src = "the coordinator's --max-prompt " + std::to_string(opt.max_prompt);
  }
  if (n > limit)
    return bad(v1::INVALID_ARGUMENT, "prompt of " + std::to_string(n) +
                                         " tokens exceeds the limit of " + std::to_string(limit) +
                                         " (" + limit_src + ")");
  const auto& o = m.options();
  if (o.decode_tokens() < 0) return bad(v1::INVALID_ARGUMENT, "decode_tokens must be >= 0");
  if (n + o.decode_tokens() > model.max_position())
    return bad(v1::INVALID_ARGUMENT, "prompt of " + std::to_string(n) + " tokens + " +
                                         std::to_string(o.decode_tokens()) +
                                         " decoded exceeds the model's max_position " +
                                         std::to_string(model.max_position()));
  const auto& smp = o.sampling();
  if (!(smp.temperature() >= 0.0f) || smp.temperature() > 100.0f)
    return bad(v1::INVALID_ARGUMENT, "temperature must be in [0, 100]");
  if (!(smp.top_p() >= 0.0f && smp.top_p() <= 1.0f))
    return bad(v1::INVALID_ARGUMENT, "top_p must be in [0, 1]");
  for (int id : o.stop_ids())
    if (id < 0 || id >= model.vocab())
      return bad(v1::INVALID_ARGUMENT, "stop id " + std::to_string(id) + " is outside [0, " +
                                           std::to_string(model.vocab()) + ")");
  if (o.dense_below() < 0) return bad(v1::INVALID_ARGUMENT, "dense_below must be >= 0");
  if (o.audit_heads() < 0 || o.audit_heads() > model.n_heads())
    return bad(v1::INVALID_ARGUMENT,
               "audit_heads must be in [0, " + std::to_string(model.n_heads()) + "]");
  if (!o.kv_transport().empty() && o.kv_transport() != "tcp" && o.kv_transport() != "nccl")
    return bad(v1::INVALID_ARGUMENT,
               "kv_transport must be tcp or nccl, not '" + o.kv_transport() + "'");
  if (!o.group().empty() && !groups.count(o.group()))
    return bad(v1::INVALID_ARGUMENT, "no worker group named '" + o.group() + "' is registered");
  if (!o.decoder().empty() && !decoders.count(o.decoder()))
    return bad(v1::INVALID_ARGUMENT, "no decoder named '" + o.decoder() + "' is registered");
  if (!o.sparse().empty() && o.sparse() != "dense" && o.sparse() != "auto") {
    try {
      (void)load_sparse_policy(o.sparse(), config_of(model),
                               o.dense_below() > 0 ? o.dense_below() : kDefaultDenseBelow);
    } catch (const std::exception& e) {
      return bad(v1::INVALID_ARGUMENT, std::string("sparse policy: ") + e.what());
    }
  }
  const std::string transport = o.kv_transport().empty() ? "tcp" : o.kv_transport();
  auto has = [&](const auto& list) {
    return std::find(list.begin(), list.end(), transport) != list.end();
  };

  // Admission: the KV must fit some eligible decoder's capacity, the per-rank estimate
  // some eligible group's free memory.
  *kv = kv_bytes(kc, n);
  uint64_t best_cap = 0;
  std::string best_dec;
  for (const auto& [name, d] : decoders) {
    if (!o.decoder().empty() && name != o.decoder()) continue;
    if (!has(d.reg.kv_transports())) continue;
    if (d.reg.capacity_bytes() > best_cap) {
      best_cap = d.reg.capacity_bytes();
      best_dec = name;
    }
  }
  if (best_dec.empty())
    return bad(v1::UNAVAILABLE, "no registered decoder takes KV over " + transport);
  if (*kv > best_cap)
    return bad(v1::RESOURCE_EXHAUSTED,
               "KV of " + std::to_string(n) + " tokens needs " + format_bytes(*kv) + " (2 x " +
                   std::to_string(model.n_layers()) + " layers x " +
                   std::to_string(model.n_kv_heads()) + " kv heads x " +
                   std::to_string(model.head_dim()) + " x " +
                   std::to_string(dtype_bytes(kc.kv_dtype())) +
                   " bytes per token) but the largest decoder capacity is " +
                   format_bytes(best_cap) + " (decoder '" + best_dec + "')");
  std::string group_why;
  bool group_fits = false;
  for (const auto& [name, g] : groups) {
    if (!o.group().empty() && name != o.group()) continue;
    if (!has(g.reg.kv_transports())) continue;
    const uint64_t need = rank_bytes_estimate(kc, n, g.reg.tp(), g.reg.sp());
    bool fits = true;
    for (const auto& r : g.reg.ranks()) {
      if (r.free_memory_bytes() != 0 && r.free_memory_bytes() < need) {
        fits = false;
        group_why = "needs about " + format_bytes(need) + " per rank (tp " +
                    std::to_string(g.reg.tp()) + " x sp " + std::to_string(g.reg.sp()) +
                    ") but group '" + name + "' rank " + std::to_string(r.rank()) + " has " +
                    format_bytes(r.free_memory_bytes()) + " free";
        break;
      }
    }
    if (fits) {
      group_fits = true;
      break;
    }
  }
  if (!group_fits) {
    if (group_why.empty())
      return bad(v1::UNAVAILABLE, "no registered worker group sends KV over " + transport);
    return bad(v1::RESOURCE_EXHAUSTED, "prompt of " + std::to_string(n) + " tokens " + group_why);
  }
  if (static_cast<int64_t>(queue.size()) >= opt.queue_limit)
    return bad(v1::RESOURCE_EXHAUSTED, "queue full: " + std::to_string(queue.size()) +
                                           " jobs waiting (limit " +
                                           std::to_string(opt.queue_limit) + ")");
  return "";
}

void Coordinator::Impl::handle_submit(const SessionPtr& s, const v1::SubmitJob& m) {
  std::vector<int32_t> tokens;
  uint64_t kv = 0;
  v1::ErrorCode code = v1::INVALID_ARGUMENT;
  std::string why = refuse_reason_locked(m, &tokens, &kv, &code);
  if (why.empty()) {
    int open = 0;  // this connection's unfinished jobs
    for (const auto& [id, j] : jobs)
      open += j.client_raw == s.get() &&
              (j.state == v1::QUEUED || j.state == v1::RUNNING || j.state == v1::HANDING_OFF);
    if (open >= opt.max_jobs_per_client) {
      code = v1::RESOURCE_EXHAUSTED;
      why = "this client has " + std::to_string(open) + " unfinished jobs (limit " +
            std::to_string(opt.max_jobs_per_client) + " per client)";
    }
  }
  if (!why.empty()) {
    ++metrics.refused;
    log("job from %s refused (%s): %s", s->peer().c_str(), v1::ErrorCode_Name(code).c_str(),
        why.c_str());
    s->send(wire::make_error(0, code, why));
    return;
  }
  Job j;
  j.id = next_job_id++;
  j.client = s;
  j.client_raw = s.get();
  j.client_name = s->name();
  j.tokens = std::move(tokens);
  j.options = m.options();
  j.client_tag = m.client_tag();
  j.detached = m.detach();
  j.kv_bytes = kv;
  j.n_layers = contract->model().n_layers();
  j.submitted = Clock::now();
  const std::string& sp = m.options().sparse();
  j.policy = std::make_shared<const SparsePolicy>(load_sparse_policy(
      sp.empty() ? "dense" : sp, config_of(contract->model()),
      m.options().dense_below() > 0 ? m.options().dense_below() : kDefaultDenseBelow));
  j.state = v1::QUEUED;
  count_state(v1::QUEUED, +1);
  const uint64_t id = j.id;
  const int64_t n = static_cast<int64_t>(j.tokens.size());
  jobs[id] = std::move(j);
  queue.push_back(id);
  auto env = envelope();
  auto* a = env.mutable_accepted();
  a->set_job_id(id);
  a->set_queue_position(static_cast<int32_t>(queue.size() - 1));
  a->set_prompt_tokens(n);
  a->set_client_tag(m.client_tag());
  s->send(env);
  log("job %llu accepted from %s: %lld tokens, %s KV, queue position %zu",
      static_cast<unsigned long long>(id), s->peer().c_str(), static_cast<long long>(n),
      format_bytes(kv).c_str(), queue.size() - 1);
  progress(jobs[id]);
  dispatch();
}

Coordinator::Impl::Group* Coordinator::Impl::pick_group(const Job& j) {
  const std::string transport = j.options.kv_transport().empty() ? "tcp" : j.options.kv_transport();
  for (auto& [name, g] : groups) {
    if (!g.alive || g.job != 0 || g.cancelled_job != 0) continue;
    if (!j.options.group().empty() && name != j.options.group()) continue;
    const auto& ts = g.reg.kv_transports();
    if (std::find(ts.begin(), ts.end(), transport) == ts.end()) continue;
    const uint64_t need = rank_bytes_estimate(*contract, static_cast<int64_t>(j.tokens.size()),
                                              g.reg.tp(), g.reg.sp());
    bool fits = true;
    for (const auto& r : g.reg.ranks())
      if (r.free_memory_bytes() != 0 && r.free_memory_bytes() < need) fits = false;
    if (fits) return &g;
  }
  return nullptr;
}

Coordinator::Impl::Decoder* Coordinator::Impl::pick_decoder(const Job& j) {
  const std::string transport = j.options.kv_transport().empty() ? "tcp" : j.options.kv_transport();
  Decoder* best = nullptr;
  for (auto& [name, d] : decoders) {
    if (!d.alive) continue;
    if (!j.options.decoder().empty() && name != j.options.decoder()) continue;
    const auto& ts = d.reg.kv_transports();
    if (std::find(ts.begin(), ts.end(), transport) == ts.end()) continue;
    if (d.reserved_bytes + j.kv_bytes > d.reg.capacity_bytes()) continue;
    if (d.reg.max_jobs() > 0 && static_cast<int>(d.jobs.size()) >= d.reg.max_jobs()) continue;
    // Most free room first.
    if (!best || d.reg.capacity_bytes() - d.reserved_bytes >
                     best->reg.capacity_bytes() - best->reserved_bytes)
      best = &d;
  }
  return best;
}

void Coordinator::Impl::dispatch() {
  if (stopping) return;
  for (auto it = queue.begin(); it != queue.end();) {
    Job& j = jobs[*it];
    Group* g = pick_group(j);
    Decoder* d = g ? pick_decoder(j) : nullptr;
    if (!g || !d) {
      ++it;  // a later job may fit another group / decoder
      continue;
    }
    it = queue.erase(it);
    const auto now = Clock::now();
    j.group = g->name;
    j.decoder = d->name;
    g->job = j.id;
    d->reserved_bytes += j.kv_bytes;
    d->jobs.insert(j.id);
    set_state(j, v1::RUNNING);
    j.started = now;
    j.queue_ms = ms_between(j.submitted, now);
    j.deadline = now + std::chrono::milliseconds(opt.ready_timeout_ms);
    auto env = envelope();
    auto* e = env.mutable_expect();
    e->set_job_id(j.id);
    e->set_prompt_tokens(static_cast<int64_t>(j.tokens.size()));
    e->set_n_layers(j.n_layers);
    e->set_kv_bytes(j.kv_bytes);
    e->set_senders(g->reg.tp() * g->reg.sp());
    e->set_decode_tokens(j.options.decode_tokens());
    *e->mutable_sampling() = j.options.sampling();
    *e->mutable_stop_ids() = j.options.stop_ids();
    e->set_timeout_ms(static_cast<uint32_t>(opt.handoff_timeout_ms));
    send_to(d->session, env);
    log("job %llu: RUNNING on group '%s', decoder '%s' (waited %.1f ms)",
        static_cast<unsigned long long>(j.id), g->name.c_str(), d->name.c_str(), j.queue_ms);
    progress(j);
  }
}

void Coordinator::Impl::send_assignment(Job& j) {
  Group& g = groups.at(j.group);
  Decoder& d = decoders.at(j.decoder);
  auto env = envelope();
  auto* a = env.mutable_assignment();
  a->set_job_id(j.id);
  *a->mutable_token_ids() = {j.tokens.begin(), j.tokens.end()};
  *a->mutable_options() = j.options;
  if (a->options().kv_transport().empty()) a->mutable_options()->set_kv_transport("tcp");
  *a->mutable_plan() = make_shard_plan(
      contract->model(), *j.policy, static_cast<int64_t>(j.tokens.size()), g.reg.tp(), g.reg.sp());
  auto* de = a->mutable_decoder();
  de->set_name(d.name);
  de->set_host(d.host);
  de->set_port(d.reg.kv_port());
  de->set_transport(a->options().kv_transport());
  a->set_handoff_timeout_ms(static_cast<uint32_t>(opt.handoff_timeout_ms));
  j.prefill_started = Clock::now();
  send_to(g.session, env);
}

void Coordinator::Impl::release_decoder_of(Job& j, bool send_release) {
  auto it = decoders.find(j.decoder);
  if (it == decoders.end() || !it->second.jobs.count(j.id)) return;
  Decoder& d = it->second;
  d.jobs.erase(j.id);
  d.reserved_bytes -= std::min(d.reserved_bytes, j.kv_bytes);
  if (send_release) {
    auto env = envelope();
    env.mutable_release()->set_job_id(j.id);
    send_to(d.session, env);
  }
}

void Coordinator::Impl::free_group_of(Job& j, bool cancel) {
  auto it = groups.find(j.group);
  if (it == groups.end() || it->second.job != j.id) return;
  Group& g = it->second;
  g.job = 0;
  if (cancel && j.ready) {  // the Assignment went out: the group must stop the job
    auto env = envelope();
    env.mutable_cancel()->set_job_id(j.id);
    send_to(g.session, env);
    g.cancelled_job = j.id;
    g.cancel_time = Clock::now();
    g.cancel_deadline = g.cancel_time + std::chrono::milliseconds(opt.cancel_grace_ms);
  }
}

void Coordinator::Impl::finish(Job& j, v1::JobState state, v1::ErrorCode code,
                               const std::string& message) {
  if (terminal(j.state)) return;
  if (j.state == v1::QUEUED)
    queue.erase(std::remove(queue.begin(), queue.end(), j.id), queue.end());
  free_group_of(j, state != v1::DONE);
  release_decoder_of(j, state != v1::DONE);
  set_state(j, state);
  j.error = message;
  if (state != v1::DONE) send_to(j.client, wire::make_error(j.id, code, message));
  log("job %llu: %s%s%s", static_cast<unsigned long long>(j.id), state_name(state),
      message.empty() ? "" : ": ", message.c_str());
  finished.push_back(j.id);
  while (static_cast<int>(finished.size()) > opt.keep_finished) {
    jobs.erase(finished.front());
    finished.pop_front();
  }
  dispatch();
}

void Coordinator::Impl::handle_cancel(const SessionPtr& s, uint64_t job_id) {
  auto it = jobs.find(job_id);
  if (it == jobs.end()) {
    s->send(wire::make_error(job_id, v1::NOT_FOUND, "no job " + std::to_string(job_id)));
    return;
  }
  Job& j = it->second;
  if (!terminal(j.state))
    finish(j, v1::CANCELLED, v1::CANCELLED_BY_CLIENT,
           "cancelled by client '" + s->name() + "' (" + s->peer() + ")");
  auto env = envelope();
  fill_status(j, env.mutable_status_reply()->add_jobs());
  s->send(env);
}

void Coordinator::Impl::handle_status(const SessionPtr& s, uint64_t job_id) {
  auto env = envelope();
  auto* r = env.mutable_status_reply();
  if (job_id != 0) {
    auto it = jobs.find(job_id);
    if (it == jobs.end()) {
      s->send(wire::make_error(job_id, v1::NOT_FOUND, "no job " + std::to_string(job_id)));
      return;
    }
    fill_status(it->second, r->add_jobs());
  } else {
    for (const auto& [id, j] : jobs) fill_status(j, r->add_jobs());
  }
  for (const auto& [name, g] : groups) {
    auto* gs = r->add_groups();
    gs->set_name(name);
    gs->set_tp(g.reg.tp());
    gs->set_sp(g.reg.sp());
    gs->set_device(g.reg.ranks_size() > 0 ? g.reg.ranks(0).device() : "");
    gs->set_busy(g.job != 0 || g.cancelled_job != 0);
    gs->set_alive(g.alive);
  }
  for (const auto& [name, d] : decoders) {
    auto* ds = r->add_decoders();
    ds->set_name(name);
    ds->set_endpoint(d.host + ":" + std::to_string(d.reg.kv_port()));
    ds->set_active_jobs(static_cast<int32_t>(d.jobs.size()));
    ds->set_alive(d.alive);
  }
  s->send(env);
}

void Coordinator::Impl::handle_worker_message(const SessionPtr& s, v1::Envelope& env) {
  auto git = groups.find(s->registered);
  if (git == groups.end()) return;  // failed meanwhile; its session is closing
  Group& g = git->second;
  g.last_seen = Clock::now();
  auto job_of = [&](uint64_t id) -> Job* {
    auto it = jobs.find(id);
    if (it == jobs.end() || it->second.group != g.name || it->second.state != v1::RUNNING ||
        g.job != id)
      return nullptr;
    return &it->second;
  };
  auto end_cancelled = [&](uint64_t id) {
    if (g.cancelled_job != 0 && g.cancelled_job == id) {
      g.cancelled_job = 0;
      dispatch();
    }
  };
  if (env.has_heartbeat()) {
    const auto& hb = env.heartbeat();
    // A heartbeat sent after the CancelJob arrived that names another job (or none) means
    // the group has dropped the cancelled one.
    if (g.cancelled_job != 0 && hb.job_id() != g.cancelled_job &&
        Clock::now() - g.cancel_time > std::chrono::milliseconds(2 * opt.heartbeat_ms)) {
      g.cancelled_job = 0;
      dispatch();
    }
    return;
  }
  if (env.has_worker_progress()) {
    const auto& p = env.worker_progress();
    if (Job* j = job_of(p.job_id())) {
      if (p.layer() < 0 || p.layer() > j->n_layers)
        return protocol_error(s, "WorkerProgress layer " + std::to_string(p.layer()) +
                                     " outside [0, " + std::to_string(j->n_layers) + "]");
      j->layer = p.layer();
      progress(*j);
    }
    return;
  }
  if (env.has_worker_done()) {
    const auto& m = env.worker_done();
    Job* j = job_of(m.job_id());
    if (!j) return end_cancelled(m.job_id());
    if (m.first_token_id() < 0 || m.first_token_id() >= contract->model().vocab()) {
      finish(*j, v1::FAILED, v1::WORKER_FAILED,
             "worker group '" + g.name + "' returned first token " +
                 std::to_string(m.first_token_id()) + " outside the vocabulary");
      return;
    }
    const auto now = Clock::now();
    j->worker_done = m;
    j->layer = j->n_layers;
    j->ttft_ms = ms_between(j->submitted, now);
    metrics.kv_bytes_handed_off += m.kv_bytes();
    metrics.ttft.observe(j->ttft_ms / 1000.0);
    metrics.prefill.observe(m.prefill_ms() / 1000.0);
    metrics.handoff.observe(m.handoff_ms() / 1000.0);
    if (m.audit_size() > 0) {
      double lo = 1.0;
      const auto& model = contract->model();
      for (const v1::HeadAudit& h : m.audit()) {
        // Entries come from the worker: keep only valid heads and known pattern names
        // (they become metric labels).
        const std::string& pat = h.pattern();
        if (h.layer() < 0 || h.layer() >= model.n_layers() || h.head() < 0 ||
            h.head() >= model.n_heads() ||
            (pat != "a_shape" && pat != "vertical_slash" && pat != "block_sparse" &&
             pat != "dense"))
          continue;
        ++metrics.audit_heads;
        metrics.audit_recall_sum += h.recall();
        metrics.audit_error_sum += h.output_rel_error();
        lo = std::min(lo, h.recall());
        metrics.audit_last[{h.layer(), h.head()}] = {h.pattern(), h.recall(), h.output_rel_error()};
      }
      metrics.audit_min_recall_last = lo;
    }
    set_state(*j, v1::HANDING_OFF);
    g.job = 0;
    j->deadline = now + std::chrono::milliseconds(opt.decode_timeout_ms);
    auto sd = envelope();
    sd.mutable_start_decode()->set_job_id(j->id);
    sd.mutable_start_decode()->set_first_token_id(m.first_token_id());
    sd.mutable_start_decode()->set_first_token_logit(m.first_token_logit());
    auto dit = decoders.find(j->decoder);
    if (dit != decoders.end()) send_to(dit->second.session, sd);
    log("job %llu: prefill done in %.1f ms (ttft %.1f ms, %s handed off in %.1f ms); HANDING_OFF",
        static_cast<unsigned long long>(j->id), m.prefill_ms(), j->ttft_ms,
        format_bytes(m.kv_bytes()).c_str(), m.handoff_ms());
    progress(*j);
    dispatch();
    return;
  }
  if (env.has_worker_failed()) {
    const auto& m = env.worker_failed();
    const std::string what =
        "worker group '" + g.name + "' rank " + std::to_string(m.rank()) + ": " + m.message();
    if (m.job_id() == 0) {
      fail_group(g, what);
      return;
    }
    if (Job* j = job_of(m.job_id()))
      finish(*j, v1::FAILED, v1::WORKER_FAILED, what);
    else
      end_cancelled(m.job_id());
    return;
  }
  const auto* f = env.GetDescriptor()->FindFieldByNumber(env.msg_case());
  protocol_error(
      s, std::string("unexpected message '") + (f ? f->name() : "?") + "' from a worker group");
}

void Coordinator::Impl::handle_decoder_message(const SessionPtr& s, v1::Envelope& env) {
  auto dit = decoders.find(s->registered);
  if (dit == decoders.end()) return;
  Decoder& d = dit->second;
  d.last_seen = Clock::now();
  auto job_of = [&](uint64_t id) -> Job* {
    auto it = jobs.find(id);
    if (it == jobs.end() || it->second.decoder != d.name || terminal(it->second.state))
      return nullptr;
    return &it->second;
  };
  if (env.has_heartbeat()) return;
  if (env.has_ready()) {
    Job* j = job_of(env.ready().job_id());
    if (j && j->state == v1::RUNNING && !j->ready) {
      j->ready = true;
      send_assignment(*j);
    }
    return;
  }
  if (env.has_decode_done()) {
    const auto& m = env.decode_done();
    Job* j = job_of(m.job_id());
    if (!j || j->state != v1::HANDING_OFF) return;
    for (int id : m.generated_ids())
      if (id < 0 || id >= contract->model().vocab()) {
        finish(*j, v1::FAILED, v1::DECODER_FAILED,
               "decoder '" + d.name + "' returned token " + std::to_string(id) +
                   " outside the vocabulary");
        return;
      }
    const v1::WorkerDone& wd = j->worker_done;
    auto out = envelope();
    auto* r = out.mutable_result();
    r->set_job_id(j->id);
    r->set_state(v1::DONE);
    r->set_prompt_tokens(static_cast<int64_t>(j->tokens.size()));
    r->set_first_token_id(wd.first_token_id());
    *r->mutable_generated_ids() = m.generated_ids();
    if (tokenizer && tokenizer->vocab_size() == contract->model().vocab()) {
      int prev = j->tokens.back();
      std::string text;
      for (int id : m.generated_ids()) {
        text += tokenizer->decode_token(prev, id);
        prev = id;
      }
      r->set_text(valid_utf8(text));
    }
    r->set_stopped_by(m.stopped_by());
    r->set_ttft_ms(j->ttft_ms);
    r->set_prefill_ms(wd.prefill_ms());
    r->set_kv_bytes_handed_off(wd.kv_bytes());
    r->set_handoff_ms(wd.handoff_ms());
    r->set_decode_ms(m.decode_ms());
    *r->mutable_ranks() = wd.ranks();
    *r->mutable_audit() = wd.audit();
    r->set_queue_ms(j->queue_ms);
    r->set_client_tag(j->client_tag);
    finish(*j, v1::DONE, v1::ERROR_CODE_UNSPECIFIED, "");
    send_to(j->client, out);
    return;
  }
  if (env.has_decode_failed()) {
    const auto& m = env.decode_failed();
    if (Job* j = job_of(m.job_id())) {
      // A KV stream that broke off (a rank died or gave up) is the group's failure.
      if (m.sender_failed())
        finish(*j, v1::FAILED, v1::WORKER_FAILED,
               "worker group '" + j->group + "' (KV handoff, seen by decoder '" + d.name +
                   "'): " + m.message());
      else
        finish(*j, v1::FAILED, v1::DECODER_FAILED, "decoder '" + d.name + "': " + m.message());
    }
    return;
  }
  const auto* f = env.GetDescriptor()->FindFieldByNumber(env.msg_case());
  protocol_error(s,
                 std::string("unexpected message '") + (f ? f->name() : "?") + "' from a decoder");
}

void Coordinator::Impl::fail_group(Group& g, const std::string& why) {
  const std::string name = g.name;
  log("worker group '%s' removed: %s", name.c_str(), why.c_str());
  g.alive = false;
  if (g.job != 0) {
    auto it = jobs.find(g.job);
    if (it != jobs.end())
      finish(it->second, v1::FAILED, v1::WORKER_FAILED, "worker group '" + name + "': " + why);
  }
  if (auto s = g.session.lock()) s->close_async();
  groups.erase(name);
  maybe_reset_contract();
}

void Coordinator::Impl::fail_decoder(Decoder& d, const std::string& why) {
  const std::string name = d.name;
  log("decoder '%s' removed: %s", name.c_str(), why.c_str());
  d.alive = false;
  const std::set<uint64_t> mine = d.jobs;
  for (uint64_t id : mine) {
    auto it = jobs.find(id);
    if (it != jobs.end())
      finish(it->second, v1::FAILED, v1::DECODER_FAILED, "decoder '" + name + "': " + why);
  }
  if (auto s = d.session.lock()) s->close_async();
  decoders.erase(name);
  maybe_reset_contract();
}

void Coordinator::Impl::tick() {
  if (stopping) return;
  {
    std::lock_guard<std::mutex> lk(mu);
    const auto now = Clock::now();
    const auto silent = std::chrono::milliseconds(opt.heartbeat_timeout_ms);
    std::vector<std::string> dead;
    for (auto& [name, g] : groups)
      if (now - g.last_seen > silent) dead.push_back(name);
    for (const auto& name : dead)
      fail_group(groups.at(name), "silent for more than " +
                                      std::to_string(opt.heartbeat_timeout_ms) +
                                      " ms (heartbeat timeout)");
    dead.clear();
    for (auto& [name, d] : decoders)
      if (now - d.last_seen > silent) dead.push_back(name);
    for (const auto& name : dead)
      fail_decoder(decoders.at(name), "silent for more than " +
                                          std::to_string(opt.heartbeat_timeout_ms) +
                                          " ms (heartbeat timeout)");
    std::vector<uint64_t> late;
    for (auto& [id, j] : jobs)
      if ((j.state == v1::RUNNING && !j.ready) || j.state == v1::HANDING_OFF)
        if (now > j.deadline) late.push_back(id);
    for (uint64_t id : late) {
      Job& j = jobs.at(id);
      if (j.state == v1::RUNNING)
        finish(j, v1::FAILED, v1::DECODER_FAILED,
               "decoder '" + j.decoder + "' did not answer Expect within " +
                   std::to_string(opt.ready_timeout_ms) + " ms");
      else
        finish(j, v1::FAILED, v1::DECODER_FAILED,
               "decoder '" + j.decoder + "' did not finish decoding within " +
                   std::to_string(opt.decode_timeout_ms) + " ms");
    }
    bool freed = false;
    for (auto& [name, g] : groups)
      if (g.cancelled_job != 0 && now > g.cancel_deadline) {
        log("worker group '%s' did not end cancelled job %llu within %d ms; treating it as idle",
            name.c_str(), static_cast<unsigned long long>(g.cancelled_job), opt.cancel_grace_ms);
        g.cancelled_job = 0;
        freed = true;
      }
    if (freed) dispatch();
  }
  ticker.expires_after(std::chrono::milliseconds(100));
  ticker.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (!ec) self->tick();
  });
}

// ------------------------------------------------------------------------------ Coordinator

Coordinator::Coordinator(CoordinatorOptions opt) : impl_(std::make_shared<Impl>(std::move(opt))) {}

Coordinator::~Coordinator() { stop(); }

void Coordinator::start() { impl_->start(); }

void Coordinator::stop() {
  if (impl_) impl_->stop();
}

uint16_t Coordinator::port() const {
  boost::system::error_code ec;
  return impl_->acceptor.local_endpoint(ec).port();
}

uint16_t Coordinator::metrics_port() const {
  if (!impl_->metrics_acceptor.is_open()) return 0;
  boost::system::error_code ec;
  return impl_->metrics_acceptor.local_endpoint(ec).port();
}

std::string Coordinator::metrics_text() { return impl_->metrics_text_locked_copy(); }

}  // namespace mprefill::coord
