// The coordinator's service loop: construction and the bound ports, the io threads, the
// 100 ms ticker, the GET /metrics endpoint, and the routing of each message by the
// sender's role to the registry (registry.cc) and the jobs (jobs.cc).
#include "coordinator/coordinator.h"

#include <fcntl.h>

#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <ctime>
#include <istream>
#include <mutex>

#include "coordinator/session.h"
#include "coordinator/state.h"
#include "proto/tls.h"

namespace mprefill::coord {

Coordinator::Impl::Impl(CoordinatorOptions o) : opt(std::move(o)) {
  if (opt.threads < 1) throw std::invalid_argument("coordinator: threads must be >= 1");
  if (opt.queue_limit < 0) throw std::invalid_argument("coordinator: queue_limit must be >= 0");
  if (opt.max_jobs_per_client < 1)
    throw std::invalid_argument("coordinator: max_jobs_per_client must be >= 1");
  if (opt.heartbeat_ms < 10 || opt.heartbeat_timeout_ms < opt.heartbeat_ms)
    throw std::invalid_argument(
        "coordinator: heartbeat_ms must be >= 10 and heartbeat_timeout_ms >= heartbeat_ms");
  if (opt.prep_threads < 1) throw std::invalid_argument("coordinator: prep_threads must be >= 1");
  if (opt.max_config_bytes < 1 || opt.max_prompt_bytes < 1)
    throw std::invalid_argument("coordinator: max_config_bytes and max_prompt_bytes must be >= 1");
  if (opt.max_pre_hello < 1) throw std::invalid_argument("coordinator: max_pre_hello must be >= 1");
  if (opt.client_max_jobs < 1 || opt.client_max_queued_tokens < 1)
    throw std::invalid_argument(
        "coordinator: client_max_jobs and client_max_queued_tokens must be >= 1");
  if (opt.max_client_frame < 1024)
    throw std::invalid_argument("coordinator: max_client_frame must be >= 1024");
  if (opt.max_large_frame_bytes < 2 * opt.client_frame_limit())
    throw std::invalid_argument(
        "coordinator: max_large_frame_bytes must be >= twice the client frame limit (2 x " +
        std::to_string(opt.client_frame_limit()) + ", --max-client-frame / --max-frame)");
  if (!opt.client_keys.empty()) {
    if (opt.secret.empty())
      throw std::invalid_argument(
          "coordinator: --client-keys needs --secret-file (the infrastructure secret that worker "
          "groups and decoders prove)");
    client_keys = std::make_unique<ClientKeyFile>(opt.client_keys);
  }
  if (!opt.tokenizer.empty()) {
    tokenizer = Tokenizer::load(opt.tokenizer);
    max_piece_bytes = 1;
    for (int id = 0; id < tokenizer->vocab_size(); ++id)
      max_piece_bytes = std::max(max_piece_bytes, static_cast<int>(tokenizer->piece(id).size()));
  }
  if (!opt.config_dir.empty()) sparse_source.config_dir = canonical_config_dir(opt.config_dir);
  sparse_source.max_bytes = opt.max_config_bytes;
  boost::system::error_code ec;
  auto addr = asio::ip::make_address(opt.host, ec);
  if (ec) throw std::runtime_error("coordinator: bad bind address '" + opt.host + "'");
  setup_tls(addr.is_loopback());
  auto bind = [&](tcp::acceptor& a, uint16_t port, const char* what) {
    tcp::endpoint ep(addr, port);
    a.open(ep.protocol(), ec);
    if (!ec) a.set_option(tcp::acceptor::reuse_address(true), ec);
    if (!ec) a.bind(ep, ec);
    if (!ec) a.listen(asio::socket_base::max_listen_connections, ec);
    // Not inherited by processes this one starts (`mprefill run`'s decoder and mpirun held
    // the port open after the coordinator ended: their re-registration hung in its backlog).
    if (!ec && ::fcntl(a.native_handle(), F_SETFD, FD_CLOEXEC) != 0)
      ec.assign(errno, boost::system::system_category());
    if (ec)
      throw std::runtime_error(std::string("coordinator: cannot listen (") + what + ") on " +
                               opt.host + ":" + std::to_string(port) + ": " + ec.message());
  };
  bind(acceptor, opt.port, "service");
  if (opt.metrics_port >= 0)
    bind(metrics_acceptor, static_cast<uint16_t>(opt.metrics_port), "metrics");
}

void Coordinator::Impl::setup_tls(bool loopback) {
  if (opt.tls_cert.empty() != opt.tls_key.empty())
    throw std::invalid_argument("coordinator: --tls-cert and --tls-key go together");
  if (!opt.tls_cert.empty()) {
    tls = std::make_unique<asio::ssl::context>(asio::ssl::context::tls_server);
    wire::configure_tls_server(tls->native_handle(), opt.tls_cert, opt.tls_key, "coordinator");
  }
  wire::ListenSecurity s;
  s.where = "coordinator: --host " + opt.host;
  s.loopback = loopback;
  s.tls = tls != nullptr;
  // Beyond loopback clients need keys of their own: with the shared secret alone every
  // client is an admin holding the infrastructure credential (issue 17 findings 1 and 6).
  s.credentials = !opt.secret.empty() && !opt.client_keys.empty();
  s.credential_flags =
      "--secret-file for worker groups and decoders and --client-keys for clients; with the "
      "secret alone every client is an admin";
  s.insecure = opt.insecure;
  metrics.insecure = wire::check_listen_security(s);
}

bool Coordinator::Impl::post_prep(std::function<void()> task) {
  std::lock_guard<std::mutex> lk(prep_mu);
  if (!prep) return false;
  asio::post(*prep, std::move(task));
  return true;
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
  {
    std::lock_guard<std::mutex> lk(prep_mu);
    prep = std::make_unique<asio::thread_pool>(static_cast<size_t>(opt.prep_threads));
  }
  do_accept();
  if (metrics_acceptor.is_open()) do_accept_metrics();
  arm_ticker();
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
  asio::post(listen_strand, [self = shared_from_this()] {
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
  std::unique_ptr<asio::thread_pool> pool;
  {
    std::lock_guard<std::mutex> lk(prep_mu);
    pool = std::move(prep);
  }
  if (pool) {  // a task under way ends (bounded by the size caps); queued ones are dropped
    pool->stop();
    pool->join();
    pool.reset();
  }
  work.reset();
  // Sessions close, pending handlers drain; then the threads return.
  for (auto& t : threads)
    if (t.joinable()) t.join();
  threads.clear();
}

namespace {

struct Http {
  Http(tcp::socket s, asio::io_context& io) : sock(std::move(s)), timer(io) {}
  tcp::socket sock;
  asio::steady_timer timer;
  asio::streambuf buf{8192};  // a request head larger than this is refused
  std::string reply;
  std::unique_ptr<asio::ssl::stream<tcp::socket&>> tls;
};

// One request on `stream` (the socket, or TLS over it): GET /metrics or 404 / 400.
template <class Stream>
void serve_http(Stream& stream, const std::shared_ptr<Http>& h,
                const std::shared_ptr<Coordinator::Impl>& self) {
  asio::async_read_until(
      stream, h->buf, "\r\n\r\n", [&stream, self, h](const boost::system::error_code& e, size_t) {
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
        asio::async_write(stream, asio::buffer(h->reply),
                          [h](const boost::system::error_code&, size_t) {
                            boost::system::error_code ig;
                            h->sock.shutdown(tcp::socket::shutdown_both, ig);
                            h->sock.close(ig);
                            h->timer.cancel();
                          });
      });
}

}  // namespace

// Minimal HTTP/1.0 server (HTTPS with --tls-cert): GET /metrics -> the Prometheus text;
// anything else 404. Each request is bounded by 5 s.
void Coordinator::Impl::do_accept_metrics() {
  metrics_acceptor.async_accept(asio::bind_executor(
      listen_strand,
      [self = shared_from_this()](const boost::system::error_code& ec, tcp::socket sock) {
        if (self->stopping) return;
        if (!ec) {
          auto h = std::make_shared<Http>(std::move(sock), self->io);
          h->timer.expires_after(std::chrono::seconds(5));
          h->timer.async_wait([h](const boost::system::error_code& e) {
            if (!e) {
              boost::system::error_code ig;
              h->sock.close(ig);
            }
          });
          if (!self->tls) {
            serve_http(h->sock, h, self);
          } else {
            h->tls = std::make_unique<asio::ssl::stream<tcp::socket&>>(h->sock, *self->tls);
            h->tls->async_handshake(asio::ssl::stream_base::server,
                                    [self, h](const boost::system::error_code& e) {
                                      boost::system::error_code ig;
                                      if (e) return (void)h->sock.close(ig);
                                      serve_http(*h->tls, h, self);
                                    });
          }
        }
        self->do_accept_metrics();
      }));
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
  snap.large_frame_bytes = large_frame_bytes.load();
  snap.log_suppressed = log_suppressed.load();
  return render_metrics(snap);
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

// ---- hello / dispatch of messages by role

void Coordinator::Impl::unexpected_message(const SessionPtr& s, const v1::Envelope& env,
                                           const char* from) {
  const auto* f = env.GetDescriptor()->FindFieldByNumber(env.msg_case());
  protocol_error(s,
                 std::string("unexpected message '") + (f ? f->name() : "?") + "' from a " + from);
}

void Coordinator::Impl::on_hello(const SessionPtr& s) {
  if (!s->owner().empty())
    log_connect("%s connected as client key '%s'%s (name '%s')", s->peer().c_str(),
                s->owner().c_str(), s->admin() ? " (admin)" : "", s->name().c_str());
  else if (s->role() == v1::CLIENT)
    log_connect("%s connected as client '%s'", s->peer().c_str(), s->name().c_str());
  else
    log("%s connected as %s '%s'", s->peer().c_str(), role_name(s->role()), s->name().c_str());
}

bool Coordinator::Impl::on_message(const SessionPtr& s, v1::Envelope& env) {
  if (s->role() == v1::CLIENT && env.has_submit()) {
    try {
      return on_submit(s, env);  // takes mu only for short, bounded steps (intake.cc)
    } catch (const std::exception& e) {
      log("%s: internal error while taking a job: %s", s->peer().c_str(), e.what());
      s->send(wire::make_error(0, v1::INTERNAL, std::string("coordinator: ") + e.what()));
      return true;
    }
  }
  std::lock_guard<std::mutex> lk(mu);
  try {
    route_locked(s, env);
  } catch (const std::exception& e) {
    log("%s: internal error while handling a message: %s", s->peer().c_str(), e.what());
    s->send(wire::make_error(0, v1::INTERNAL, std::string("coordinator: ") + e.what()));
  }
  return true;
}

void Coordinator::Impl::route_locked(const SessionPtr& s, v1::Envelope& env) {
  switch (s->role()) {
    case v1::CLIENT:
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
  unexpected_message(s, env, role_name(s->role()));
}

void Coordinator::Impl::on_closed(Session* s) {
  std::lock_guard<std::mutex> lk(mu);
  sessions.erase(s);
  metrics.connections = static_cast<int64_t>(sessions.size());
  if (s->pre_hello) {
    s->pre_hello = false;
    metrics.pre_hello = --pre_hello;
    ++metrics.pre_hello_closed;
  }
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

void Coordinator::Impl::arm_ticker() {
  ticker.expires_after(std::chrono::milliseconds(100));
  ticker.async_wait(asio::bind_executor(
      listen_strand, [self = shared_from_this()](const boost::system::error_code& ec) {
        if (!ec) self->tick();
      }));
}

void Coordinator::Impl::tick() {
  if (stopping) return;
  {
    std::lock_guard<std::mutex> lk(mu);
    const auto now = Clock::now();
    expire_silent_peers(now);
    expire_deadlines(now);
    end_cancel_grace(now);
  }
  if (client_keys && ++key_check_ticks >= 10) {  // about once a second
    key_check_ticks = 0;
    check_client_keys(false);
  }
  arm_ticker();
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
