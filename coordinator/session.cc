// Connections: the accept loop with its --max-connections limit, and each Session's hello,
// framed reads and queued writes on its strand.
#include "coordinator/session.h"

#include <openssl/ssl.h>

#include <algorithm>
#include <cstring>
#include <mutex>

namespace mprefill::coord {

void Coordinator::Impl::do_accept() {
  acceptor.async_accept(asio::bind_executor(
      listen_strand,
      [self = shared_from_this()](const boost::system::error_code& ec, tcp::socket sock) {
        if (self->stopping) return;
        if (!ec) {
          auto s = std::make_shared<Session>(self, std::move(sock));
          std::string full;
          auto evicted = self->enter_pre_hello(s, &full);
          if (!full.empty()) {
            s->refuse(full);
            self->do_accept();
            return;
          }
          s->start();
          for (auto& old : evicted) old->close_async();
          if (!evicted.empty())
            self->log_refusal("%s: pre-hello pool full (--max-pre-hello %d): closed the oldest",
                              s->peer().c_str(), self->opt.max_pre_hello);
        }
        self->do_accept();
      }));
}

Session::Session(std::shared_ptr<Coordinator::Impl> c, tcp::socket sock)
    : coord_(std::move(c)),
      socket_(std::move(sock)),
      strand_(asio::make_strand(coord_->io)),
      hello_timer_(coord_->io),
      linger_timer_(coord_->io),
      frame_timer_(coord_->io),
      grant_timer_(coord_->io),
      parser_(std::min(coord_->opt.max_frame, wire::kHelloMaxFrame)),  // raised after hello
      buf_(kHelloReadChunk) {
  boost::system::error_code ec;
  auto ep = socket_.remote_endpoint(ec);
  peer_ = ec ? "?" : ep.address().to_string() + ":" + std::to_string(ep.port());
  socket_.set_option(tcp::no_delay(true), ec);
  if (coord_->tls) tls_ = std::make_unique<asio::ssl::stream<tcp::socket&>>(socket_, *coord_->tls);
}

void Session::start() {
  auto self = shared_from_this();
  asio::dispatch(strand_, [self] {
    // The hello deadline covers the TLS handshake too.
    self->hello_timer_.expires_after(std::chrono::milliseconds(self->coord_->opt.hello_timeout_ms));
    self->hello_timer_.async_wait(
        asio::bind_executor(self->strand_, [self](const boost::system::error_code& ec) {
          if (!ec && !self->hello_done_ && !self->closed_) {
            self->coord_->log_refusal("%s: no ClientHello within %d ms, closing",
                                      self->peer_.c_str(), self->coord_->opt.hello_timeout_ms);
            self->close();
          }
        }));
    if (!self->tls_) {
      self->send_server_hello();
      self->read();
      return;
    }
    self->tls_->async_handshake(
        asio::ssl::stream_base::server,
        asio::bind_executor(self->strand_, [self](const boost::system::error_code& ec) {
          if (self->closed_) return;
          unsigned char out[32];
          const char* label = wire::kTlsExporterLabel;
          if (ec || SSL_export_keying_material(self->tls_->native_handle(), out, sizeof(out), label,
                                               std::strlen(label), nullptr, 0, 0) != 1) {
            self->coord_->log_refusal("%s: TLS handshake failed: %s", self->peer_.c_str(),
                                      ec ? ec.message().c_str() : "no exporter");
            self->close();
            return;
          }
          self->exporter_.assign(reinterpret_cast<char*>(out), sizeof(out));
          self->send_server_hello();
          self->read();
        }));
  });
}

void Session::send_server_hello() {
  nonce_ = wire::random_nonce();
  write(wire::encode_frame(wire::make_server_hello(nonce_, !coord_->opt.secret.empty())));
}

void Session::refuse(const std::string& why) {
  auto self = shared_from_this();
  asio::dispatch(strand_, [self, why] {
    self->coord_->log_refusal("%s: connection refused: %s", self->peer_.c_str(), why.c_str());
    if (self->tls_) return self->close();  // no TLS session to say it over
    self->send_error_and_close(0, v1::RESOURCE_EXHAUSTED, why);
  });
}

void Session::send(const v1::Envelope& env) {
  std::string frame = wire::encode_frame(env);
  auto self = shared_from_this();
  asio::post(strand_, [self, f = std::move(frame)]() mutable { self->write(std::move(f)); });
}

void Session::send_error_and_close(uint64_t job, v1::ErrorCode code, const std::string& msg) {
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

void Session::close_async() {
  auto self = shared_from_this();
  asio::post(strand_, [self] { self->close(); });
}

void Session::close() {
  if (closed_) return;
  closed_ = true;
  boost::system::error_code ec;
  hello_timer_.cancel();
  linger_timer_.cancel();
  frame_timer_.cancel();
  grant_timer_.cancel();
  release_grant();
  socket_.shutdown(tcp::socket::shutdown_both, ec);
  socket_.close(ec);
  parser_.release_memory();
  coord_->on_closed(this);
}

void Session::resume() {
  auto self = shared_from_this();
  asio::post(strand_, [self] {
    if (!self->paused_) return;
    self->paused_ = false;
    self->release_grant();  // the message the pause was for is handled
    if (!self->closed_) self->drain();
  });
}

void Session::write(std::string frame) {
  if (closed_) return;
  queued_bytes_ += frame.size();
  if (queued_bytes_ > kMaxQueuedBytes) {
    coord_->log("%s: peer does not read (%zu bytes queued), closing", peer_.c_str(), queued_bytes_);
    close();
    return;
  }
  outq_.push_back(std::move(frame));
  if (!writing_) write_next();
}

void Session::write_next() {
  if (outq_.empty() || closed_) {
    writing_ = false;
    if (close_after_flush_) close();
    return;
  }
  writing_ = true;
  auto self = shared_from_this();
  auto done = asio::bind_executor(strand_, [self](const boost::system::error_code& ec, size_t n) {
    self->queued_bytes_ -= n;
    if (!self->outq_.empty()) self->outq_.pop_front();
    if (ec) {
      self->close();
      return;
    }
    self->write_next();
  });
  if (tls_)
    asio::async_write(*tls_, asio::buffer(outq_.front()), std::move(done));
  else
    asio::async_write(socket_, asio::buffer(outq_.front()), std::move(done));
}

void Session::read() {
  if (closed_) return;
  auto self = shared_from_this();
  auto got = asio::bind_executor(strand_, [self](const boost::system::error_code& ec, size_t n) {
    if (ec) {
      self->close();
      return;
    }
    self->parser_.feed(self->buf_.data(), n);
    self->drain();
  });
  if (tls_)
    tls_->async_read_some(asio::buffer(buf_.data(), buf_.size()), std::move(got));
  else
    socket_.async_read_some(asio::buffer(buf_.data(), buf_.size()), std::move(got));
}

// After the hello: a frame begun (bytes buffered) must be complete within
// frame_timeout_ms; the clock restarts with each complete frame.
void Session::watch_partial_frame(bool progressed) {
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

void Session::drain() {
  bool progressed = false;
  for (;;) {
    if (closed_ || close_after_flush_) return;
    v1::Envelope env;
    std::string err;
    auto r = parser_.next(&env, &err);
    if (r == wire::FrameParser::Result::kNeedMore) break;
    progressed = true;
    // A large frame is complete (or broken): its buffer goes back; the grant still covers
    // the parsed message until it is handled (here, or off the strand until resume()).
    if (granted_) parser_.release_memory();
    if (r == wire::FrameParser::Result::kError) {
      release_grant();
      bad_frame(parser_.error_kind() == wire::WireError::Kind::kBadVersion ? v1::BAD_VERSION
                                                                           : v1::BAD_FRAME,
                err);
      return;
    }
    if (!hello_done_) {
      if (!take_hello(env)) return;
      continue;
    }
    if (!coord_->on_message(shared_from_this(), env)) {
      // Handled off the strand: no frame deadline meanwhile (the frame is complete);
      // resume() drains what is buffered and reads on.
      paused_ = true;
      frame_timer_armed_ = false;
      ++frame_gen_;
      frame_timer_.cancel();
      return;
    }
    release_grant();
  }
  if (hello_done_) watch_partial_frame(progressed);
  if (!grant_large_frame()) return;
  read();
}

bool Session::grant_large_frame() {
  if (!hello_done_ || role_ != v1::CLIENT || granted_) return true;
  const size_t need = parser_.pending_frame_bytes();
  if (need <= kSmallFrame) return true;
  if (coord_->reserve_large_frame(2 * need)) {  // the bytes, then the parsed message
    granted_ = 2 * need;
    parser_.reserve(need);
    return true;
  }
  // Wait for other large frames to complete or fail; the frame timer still bounds this.
  grant_timer_.expires_after(std::chrono::milliseconds(20));
  auto self = shared_from_this();
  grant_timer_.async_wait(asio::bind_executor(strand_, [self](const boost::system::error_code& ec) {
    if (ec || self->closed_ || self->paused_) return;
    if (self->grant_large_frame()) self->read();
  }));
  return false;
}

void Session::release_grant() {
  if (!granted_) return;
  coord_->release_large_frame(granted_);
  granted_ = 0;
}

bool Session::take_hello(const v1::Envelope& env) {
  if (!env.has_client_hello()) {
    bad_frame(v1::BAD_FRAME, "first frame is not a ClientHello");
    return false;
  }
  const auto& h = env.client_hello();
  std::string why, secret, identity, digest;
  bool admin = false;
  v1::ErrorCode code = v1::ERROR_CODE_UNSPECIFIED;
  if (wire::check_client_hello(h, nonce_, v1::ROLE_UNSPECIFIED, "", &why, &code))  // form only
    why = coord_->hello_key(h, &secret, &identity, &admin, &digest, &code);
  if (why.empty())  // the proof, over the TLS exporter when there is TLS
    wire::check_client_hello(h, nonce_, v1::ROLE_UNSPECIFIED, secret, &why, &code, exporter_);
  if (why.empty()) {
    // Written before leave_pre_hello marks the session authenticated under the
    // coordinator's mutex: readers there skip sessions not yet marked.
    role_ = h.role();
    name_ = h.name();
    owner_ = identity;
    admin_ = admin;
    key_digest_ = digest;
    why = coord_->leave_pre_hello(this);
    code = v1::RESOURCE_EXHAUSTED;
  }
  if (!why.empty()) {
    coord_->log_refusal("%s: hello refused: %s", peer_.c_str(), why.c_str());
    send_error_and_close(0, code, why);
    return false;
  }
  hello_done_ = true;
  hello_timer_.cancel();
  parser_.set_max_frame(role_ == v1::CLIENT ? coord_->opt.client_frame_limit()
                                            : coord_->opt.max_frame);
  buf_.resize(kReadChunk);  // no read is pending: drain runs between reads
  write(wire::encode_frame(wire::make_hello_accepted("mprefill-coordinator", h, nonce_, secret,
                                                     identity, admin, exporter_)));
  coord_->on_hello(shared_from_this());
  return true;
}

void Session::bad_frame(v1::ErrorCode code, const std::string& why) {
  if (!hello_done_)
    coord_->log_refusal("%s: bad frame before the hello: %s; closing", peer_.c_str(), why.c_str());
  else if (role_ == v1::CLIENT)
    coord_->log_refusal("%s (%s %s): bad frame: %s; closing this connection", peer_.c_str(),
                        role_name(role_), name_.c_str(), why.c_str());
  else
    coord_->log("%s (%s %s): bad frame: %s; closing this connection", peer_.c_str(),
                role_name(role_), name_.c_str(), why.c_str());
  {
    std::lock_guard<std::mutex> lk(coord_->mu);
    ++coord_->metrics.bad_frames;
  }
  send_error_and_close(0, code, why);
}

}  // namespace mprefill::coord
