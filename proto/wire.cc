#include "proto/wire.h"

#include <poll.h>
#include <sys/random.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <boost/asio.hpp>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "proto/hmac.h"
#include "proto/tls.h"

namespace mprefill::wire {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

namespace {

constexpr size_t kReadChunk = size_t{256} << 10;
constexpr size_t kLinearGrowth = size_t{4} << 20;  // FrameParser::make_room

Clock::time_point deadline_after(int timeout_ms) {
  return Clock::now() + std::chrono::milliseconds(std::max(timeout_ms, 0));
}

int remaining_ms(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  // Round up so that a poll never returns early and spins.
  return static_cast<int>(std::max<int64_t>(left.count() + 1, 0));
}

// poll() one descriptor for `events` until the deadline. Returns revents (0 on timeout);
// EINTR retried.
int poll_until(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    pollfd p{fd, events, 0};
    int left = remaining_ms(deadline);
    int rc = ::poll(&p, 1, Clock::now() >= deadline ? 0 : left);
    if (rc > 0) return p.revents;
    if (rc == 0) return 0;
    if (errno != EINTR) return POLLERR;
  }
}

std::string endpoint_text(const tcp::endpoint& ep) {
  std::ostringstream os;
  os << ep.address().to_string() << ":" << ep.port();
  return os.str();
}

const char* role_name(v1::Role r) {
  switch (r) {
    case v1::CLIENT:
      return "client";
    case v1::WORKER:
      return "worker";
    case v1::DECODER:
      return "decoder";
    default:
      return "unspecified";
  }
}

}  // namespace

// ---------------------------------------------------------------- frames

std::string encode_frame(const v1::Envelope& env) {
  const size_t body = env.ByteSizeLong();
  // proto3 does not serialize a zero version; field 1 varint 1 (0x08 0x01) is appended
  // instead of copying the envelope (a later scalar field wins on parse).
  const bool add_version = env.version() == 0;
  const size_t total = body + (add_version ? 2 : 0);
  if (total > 0xffffffffu)
    throw WireError(WireError::Kind::kBadFrame,
                    "encode_frame: envelope of " + std::to_string(total) + " bytes over 4 GiB");
  std::string out(4 + total, '\0');
  for (int i = 0; i < 4; ++i) out[i] = static_cast<char>((total >> (8 * i)) & 0xff);
  if (!env.SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(out.data() + 4)))
    throw WireError(WireError::Kind::kBadFrame, "encode_frame: serialization failed");
  if (add_version) {
    out[4 + body] = 0x08;
    out[4 + body + 1] = static_cast<char>(kProtocolVersion);
    static_assert(kProtocolVersion < 128, "version must fit one varint byte");
  }
  return out;
}

FrameParser::FrameParser(size_t max_frame) : max_frame_(max_frame) {}

// buf_ is the parser's memory (its size the capacity, grown, never shrunk); bytes
// [pos_, end_) are buffered. Consumed bytes are dropped before growing (amortized: only
// when they are the larger part, or when the new bytes would not fit).
void FrameParser::make_room(size_t n) {
  if (pos_ == end_) {
    pos_ = end_ = 0;
  } else if (pos_ > 0 && (pos_ >= end_ / 2 || end_ + n > buf_.size())) {
    std::memmove(buf_.data(), buf_.data() + pos_, end_ - pos_);
    end_ -= pos_;
    pos_ = 0;
  }
  // Doubling while small; past kLinearGrowth, steps of kLinearGrowth, so that a buffer
  // reserved for a budgeted large frame overshoots by a bounded amount, not 2x.
  if (end_ + n > buf_.size()) {
    const size_t step = buf_.size() < kLinearGrowth ? buf_.size() : kLinearGrowth;
    buf_.resize(std::max(end_ + n, buf_.size() + step));
  }
}

void FrameParser::feed(const void* data, size_t n) {
  if (failed_ || n == 0) return;
  make_room(n);
  std::memcpy(buf_.data() + end_, data, n);
  end_ += n;
}

char* FrameParser::prepare(size_t n) {
  make_room(n);
  return buf_.data() + end_;
}

void FrameParser::commit(size_t n) { end_ = std::min(end_ + n, buf_.size()); }

size_t FrameParser::buffered() const { return end_ - pos_; }

size_t FrameParser::pending_frame_bytes() const {
  if (failed_ || buffered() < 4) return 0;
  const auto* p = reinterpret_cast<const uint8_t*>(buf_.data() + pos_);
  return 4 + size_t{frame_body_length(p)};
}

void FrameParser::compact() {
  if (pos_ == 0) return;
  std::memmove(buf_.data(), buf_.data() + pos_, end_ - pos_);
  end_ -= pos_;
  pos_ = 0;
}

void FrameParser::reserve(size_t n) {
  compact();
  if (n > buf_.size()) buf_.resize(n);
}

void FrameParser::release_memory() {
  compact();
  buf_.resize(end_);
  buf_.shrink_to_fit();
}

FrameParser::Result FrameParser::next(v1::Envelope* out, std::string* error) {
  auto fail = [&](WireError::Kind kind, const std::string& why) {
    failed_ = true;
    error_kind_ = kind;
    if (error) *error = why;
    return Result::kError;
  };
  if (failed_) {
    if (error) *error = "stream unusable after an earlier frame error";
    return Result::kError;
  }
  if (buffered() < 4) return Result::kNeedMore;
  const auto* p = reinterpret_cast<const uint8_t*>(buf_.data() + pos_);
  const uint64_t len = frame_body_length(p);
  if (len > max_frame_)
    return fail(WireError::Kind::kBadFrame, "frame of " + std::to_string(len) +
                                                " bytes exceeds the maximum of " +
                                                std::to_string(max_frame_));
  if (buffered() < 4 + len) return Result::kNeedMore;
  out->Clear();
  if (!out->ParseFromArray(p + 4, static_cast<int>(len)))
    return fail(WireError::Kind::kBadFrame,
                "unparsable envelope of " + std::to_string(len) + " bytes");
  pos_ += 4 + len;
  if (pos_ == end_) pos_ = end_ = 0;
  if (out->version() != kProtocolVersion)
    return fail(WireError::Kind::kBadVersion, "protocol version " + std::to_string(out->version()) +
                                                  " (this side speaks " +
                                                  std::to_string(kProtocolVersion) + ")");
  if (out->msg_case() == v1::Envelope::MSG_NOT_SET)
    return fail(WireError::Kind::kBadFrame, "envelope without a message (unknown type?)");
  return Result::kOk;
}

FrameParser::Result FrameParser::next_raw(std::string_view* frame, std::string* error) {
  if (failed_) {
    if (error) *error = "stream unusable after an earlier frame error";
    return Result::kError;
  }
  if (pos_ == end_) pos_ = end_ = 0;  // the previous raw frame is consumed
  if (buffered() < 4) return Result::kNeedMore;
  const auto* p = reinterpret_cast<const uint8_t*>(buf_.data() + pos_);
  const uint64_t len = frame_body_length(p);
  if (len > max_frame_) {
    failed_ = true;
    error_kind_ = WireError::Kind::kBadFrame;
    if (error)
      *error = "frame of " + std::to_string(len) + " bytes exceeds the maximum of " +
               std::to_string(max_frame_);
    return Result::kError;
  }
  if (buffered() < 4 + len) return Result::kNeedMore;
  *frame = std::string_view(buf_.data() + pos_ + 4, len);
  pos_ += 4 + len;  // its bytes stay until the next feed() / prepare() / next*() call
  return Result::kOk;
}

// ---------------------------------------------------------------- hello helpers

std::string random_nonce() {
  std::string n(32, '\0');
  size_t got = 0;
  while (got < n.size()) {
    ssize_t r = ::getrandom(n.data() + got, n.size() - got, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error(std::string("getrandom failed: ") + std::strerror(errno));
    }
    got += static_cast<size_t>(r);
  }
  return n;
}

namespace {

std::string transcript(std::string_view label, const HelloBinding& b) {
  std::string m(label);
  auto field = [&m](std::string_view f) {
    const uint32_t n = static_cast<uint32_t>(f.size());
    for (int i = 0; i < 4; ++i) m.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
    m.append(f);
  };
  const uint32_t r = static_cast<uint32_t>(b.role);
  std::string role(4, '\0');
  for (int i = 0; i < 4; ++i) role[i] = static_cast<char>((r >> (8 * i)) & 0xff);
  field(role);
  field(b.key_id);
  field(b.server_nonce);
  field(b.client_nonce);
  field(b.channel);
  return m;
}

std::string mac(std::string_view secret, const std::string& msg) {
  Digest d = hmac_sha256(secret, msg);
  return std::string(reinterpret_cast<const char*>(d.data()), d.size());
}

}  // namespace

std::string hello_proof(std::string_view secret, const HelloBinding& b) {
  return mac(secret, transcript("mprefill hello: client proof v1", b));
}

std::string server_proof(std::string_view secret, const HelloBinding& b) {
  return mac(secret, transcript("mprefill hello: server proof v1", b));
}

HelloBinding binding_of(const v1::ClientHello& hello, std::string_view server_nonce,
                        std::string_view channel) {
  HelloBinding b;
  b.channel = channel;
  b.server_nonce = server_nonce;
  b.client_nonce = hello.client_nonce();
  b.role = hello.role();
  b.key_id = hello.key_id();
  return b;
}

bool check_client_hello(const v1::ClientHello& hello, std::string_view nonce,
                        v1::Role expected_role, std::string_view secret, std::string* error,
                        v1::ErrorCode* code, std::string_view channel) {
  auto refuse = [&](v1::ErrorCode c, const std::string& why) {
    if (error) *error = why;
    if (code) *code = c;
    return false;
  };
  if (hello.version() != kProtocolVersion)
    return refuse(v1::BAD_VERSION, "client speaks protocol version " +
                                       std::to_string(hello.version()) + ", server " +
                                       std::to_string(kProtocolVersion));
  const v1::Role role = hello.role();
  if (role != v1::CLIENT && role != v1::WORKER && role != v1::DECODER)
    return refuse(v1::BAD_FRAME, "ClientHello without a valid role");
  if (expected_role != v1::ROLE_UNSPECIFIED && role != expected_role)
    return refuse(v1::BAD_FRAME, std::string("expected a ") + role_name(expected_role) +
                                     ", got a " + role_name(role));
  if (!secret.empty()) {
    if (hello.proof().empty())
      return refuse(v1::UNAUTHENTICATED, "authentication required: no proof (missing secret?)");
    if (hello.client_nonce().size() != 32)
      return refuse(v1::UNAUTHENTICATED, "authentication failed: no 32-byte client nonce");
    if (!constant_time_equal(hello.proof(), hello_proof(secret, binding_of(hello, nonce, channel))))
      return refuse(v1::UNAUTHENTICATED, "authentication failed: wrong proof (secret differs)");
  }
  return true;
}

v1::Envelope make_hello_accepted(const std::string& server, const v1::ClientHello& hello,
                                 std::string_view server_nonce, std::string_view secret,
                                 const std::string& identity, bool admin,
                                 std::string_view channel) {
  v1::Envelope env;
  env.set_version(kProtocolVersion);
  auto* a = env.mutable_hello_accepted();
  a->set_server(server);
  if (!secret.empty())
    a->set_server_proof(server_proof(secret, binding_of(hello, server_nonce, channel)));
  a->set_identity(identity);
  a->set_admin(admin);
  return env;
}

v1::Envelope make_server_hello(const std::string& nonce, bool auth_required) {
  v1::Envelope env;
  env.set_version(kProtocolVersion);
  auto* h = env.mutable_server_hello();
  h->set_version(kProtocolVersion);
  h->set_nonce(nonce);
  h->set_auth_required(auth_required);
  return env;
}

v1::Envelope make_error(uint64_t job_id, v1::ErrorCode code, const std::string& message) {
  v1::Envelope env;
  env.set_version(kProtocolVersion);
  auto* e = env.mutable_error();
  e->set_job_id(job_id);
  e->set_code(code);
  e->set_message(message);
  return env;
}

std::string load_secret_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read secret file " + path);
  std::ostringstream os;
  os << f.rdbuf();
  std::string s = os.str();
  while (!s.empty() &&
         (s.back() == '\n' || s.back() == '\r' || s.back() == ' ' || s.back() == '\t'))
    s.pop_back();
  if (s.empty()) throw std::runtime_error("secret file " + path + " is empty");
  return s;
}

Credential load_key_file(const std::string& path) {
  const std::string text = load_secret_file(path);
  std::istringstream is(text);
  Credential c;
  std::string extra;
  if (text.find('\n') != std::string::npos || !(is >> c.key_id >> c.secret) || (is >> extra))
    throw std::runtime_error("key file " + path + ": expected one line \"NAME SECRET\"");
  return c;
}

std::unique_ptr<Connection> open_retrying_busy(
    const std::function<std::unique_ptr<Connection>(int left_ms)>& open, int timeout_ms,
    int tries) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  int backoff_ms = 5;
  for (int attempt = 1;; ++attempt) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    try {
      return open(std::max(1, static_cast<int>(left.count())));
    } catch (const WireError& e) {
      const bool again = e.kind() == WireError::Kind::kBusy && attempt < tries &&
                         Clock::now() + std::chrono::milliseconds(backoff_ms) < deadline;
      if (!again) throw;
      std::this_thread::sleep_for(std::chrono::milliseconds(backoff_ms));
      backoff_ms *= 2;
    }
  }
}

void parse_host_port(const std::string& text, std::string* host, uint16_t* port) {
  const size_t colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == text.size())
    throw std::invalid_argument("expected HOST:PORT, got '" + text + "'");
  std::string h = text.substr(0, colon);
  if (h.size() > 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  const std::string p = text.substr(colon + 1);
  if (p.find_first_not_of("0123456789") != std::string::npos || p.size() > 5)
    throw std::invalid_argument("bad port in '" + text + "'");
  const unsigned long v = std::stoul(p);
  if (v > 65535) throw std::invalid_argument("port out of range in '" + text + "'");
  *host = h;
  *port = static_cast<uint16_t>(v);
}

// ---------------------------------------------------------------- Connection

struct Connection::Impl {
  asio::io_context io;
  tcp::socket socket{io};
  FrameParser parser;
  std::string peer;
  std::string peer_name;
  std::string identity;  // HelloAccepted.identity / admin (connecting side)
  bool admin = false;
  std::atomic<bool> closed{false};
  bool send_broken = false;  // a partial frame went out: the stream is unusable
  std::string host;          // as given to connect (TLS name check)
  std::string exporter;      // TLS exporter value; empty without TLS
  std::unique_ptr<TlsSession> tls;
  std::shared_ptr<const TlsServerContext> server_tls;  // accepted on a TLS listener
  std::string hello_nonce;  // ServerHello sent early (send_server_hello); empty: not yet
  bool hello_auth = false;

  explicit Impl(size_t max_frame) : parser(max_frame) {}

  // One read / write step: bytes moved, 0 when it would block (*wait: POLLIN / POLLOUT);
  // *ec on a closed or broken stream.
  size_t io_some(bool write, char* data, size_t n, int* wait, boost::system::error_code* ec) {
    *wait = write ? POLLOUT : POLLIN;
    if (tls) return tls->io(write, data, n, wait, ec);
    size_t r = write ? socket.write_some(asio::buffer(data, n), *ec)
                     : socket.read_some(asio::buffer(data, n), *ec);
    if (*ec == asio::error::would_block || *ec == asio::error::try_again) ec->clear();
    return r;
  }

  int fd() { return socket.native_handle(); }

  // The TLS handshake of an accepted connection (server_tls) until the deadline; sets the
  // exporter. false with a one-line *error.
  bool accept_tls(Clock::time_point deadline, int timeout_ms, std::string* error) {
    try {
      tls = TlsSession::server(fd(), *server_tls);
      int wait = 0;
      while (!tls->handshake(&wait)) {
        if (poll_until(fd(), static_cast<short>(wait), deadline) != 0) continue;
        if (tls->bytes_read() > 0) {
          *error = "hello from " + peer + ": TLS handshake timed out after " +
                   std::to_string(timeout_ms) + " ms";
          return false;
        }
        // Silent: a plain-TCP mprefill peer waits for our ServerHello. Tell it in its
        // own framing why nothing comes.
        tls.reset();
        try {
          const std::string f = encode_frame(make_error(
              0, v1::BAD_FRAME, "this port speaks TLS 1.3: connect with TLS (tls://HOST)"));
          write_all(f.data(), f.size(), 500);
        } catch (const WireError&) {
        }
        *error = "hello from " + peer + ": plain TCP to a TLS port (the peer sent nothing for " +
                 std::to_string(timeout_ms) + " ms; told it to use TLS)";
        return false;
      }
      exporter = tls->exporter(kTlsExporterLabel);
      return true;
    } catch (const std::exception& e) {
      *error = "hello from " + peer + ": TLS: " + e.what();
      return false;
    }
  }

  [[noreturn]] void throw_closed(const char* op) {
    throw WireError(WireError::Kind::kClosed, std::string(op) + " " + peer + ": connection closed");
  }

  void write_all(const char* data, size_t n, int timeout_ms) {
    if (closed) throw_closed("send to");
    if (send_broken)
      throw WireError(WireError::Kind::kClosed,
                      "send to " + peer + ": stream broken by an earlier timeout");
    const auto deadline = deadline_after(timeout_ms);
    size_t done = 0;
    while (done < n) {
      boost::system::error_code ec;
      int wait = POLLOUT;
      size_t w = io_some(true, const_cast<char*>(data) + done, n - done, &wait, &ec);
      done += w;
      if (ec) {
        if (done > 0) send_broken = true;
        closed = true;
        throw WireError(WireError::Kind::kClosed, "send to " + peer + ": " + ec.message());
      }
      if (w > 0) continue;
      int ev = poll_until(fd(), static_cast<short>(wait), deadline);
      if (closed) throw_closed("send to");
      if (ev == 0) {
        if (done > 0) send_broken = true;
        throw WireError(WireError::Kind::kTimeout, "send to " + peer + ": timed out after " +
                                                       std::to_string(timeout_ms) + " ms (" +
                                                       std::to_string(done) + " of " +
                                                       std::to_string(n) + " bytes sent)");
      }
    }
  }

  // true with a frame, false at the deadline.
  bool read_frame(v1::Envelope* env, int timeout_ms) {
    return read_any(timeout_ms, [&](std::string* err) { return parser.next(env, err); });
  }
  bool read_raw(std::string_view* frame, int timeout_ms) {
    return read_any(timeout_ms, [&](std::string* err) { return parser.next_raw(frame, err); });
  }

  template <class Next>
  bool read_any(int timeout_ms, Next next) {
    const auto deadline = deadline_after(timeout_ms);
    std::string err;
    for (;;) {
      auto r = next(&err);
      if (r == FrameParser::Result::kOk) return true;
      if (r == FrameParser::Result::kError)
        throw WireError(parser.error_kind(), "recv from " + peer + ": " + err);
      if (closed) throw_closed("recv from");
      // Straight into the parser's buffer (no copy between socket and frame). Reads of at
      // most one frame and its header while the limit is small (a connection in its hello:
      // 64 KiB, not kReadChunk of zero-filled buffer per silent socket; measured on the KV
      // port under a 300-socket flood: 800 KiB of decoder RSS per connection before).
      const size_t chunk = std::min(kReadChunk, parser.max_frame() + 16);
      char* dst = parser.prepare(chunk);
      boost::system::error_code ec;
      int wait = POLLIN;
      size_t n = io_some(false, dst, chunk, &wait, &ec);
      if (n > 0) {
        parser.commit(n);
        continue;
      }
      if (ec == asio::error::eof) {
        closed = true;
        throw_closed("recv from");
      }
      if (ec) {
        closed = true;
        throw WireError(WireError::Kind::kClosed, "recv from " + peer + ": " + ec.message());
      }
      if (Clock::now() >= deadline) return false;
      int ev = poll_until(fd(), static_cast<short>(wait), deadline);
      if (ev == 0) return false;
      // POLLIN / POLLHUP / POLLERR: read_some reports what happened.
    }
  }
};

Connection::Connection(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Connection::~Connection() {
  if (impl_) {
    boost::system::error_code ec;
    impl_->socket.shutdown(tcp::socket::shutdown_both, ec);
    impl_->socket.close(ec);
  }
}

std::unique_ptr<Connection> Connection::connect(const std::string& host, uint16_t port,
                                                int timeout_ms, size_t max_frame,
                                                const TlsClientOptions& tls) {
  const bool scheme = host.rfind(kTlsScheme, 0) == 0;
  if (scheme || tls.enabled) {  // TLS right after the connect
    const auto deadline = deadline_after(timeout_ms);
    auto c =
        connect(scheme ? host.substr(std::strlen(kTlsScheme)) : host, port, timeout_ms, max_frame);
    c->start_tls(TlsClientOptions{true, tls.ca_file}, std::max(remaining_ms(deadline), 1));
    return c;
  }
  auto impl = std::make_unique<Impl>(max_frame);
  const std::string target = host + ":" + std::to_string(port);
  impl->peer = target;
  impl->host = host;
  const auto deadline = deadline_after(timeout_ms);
  boost::system::error_code ec;
  tcp::resolver resolver(impl->io);
  auto results = resolver.resolve(host, std::to_string(port), ec);
  if (ec || results.empty())
    throw WireError(WireError::Kind::kConnect,
                    "connect to " + target + ": cannot resolve host: " + ec.message());
  std::string last_error = "no address";
  for (const auto& entry : results) {
    tcp::socket& s = impl->socket;
    s.close(ec);
    s.open(entry.endpoint().protocol(), ec);
    if (ec) {
      last_error = ec.message();
      continue;
    }
    s.non_blocking(true, ec);
    s.connect(entry.endpoint(), ec);
    if (ec == asio::error::in_progress || ec == asio::error::would_block) {
      int ev = poll_until(s.native_handle(), POLLOUT, deadline);
      if (ev == 0)
        throw WireError(WireError::Kind::kTimeout, "connect to " + target + ": timed out after " +
                                                       std::to_string(timeout_ms) + " ms");
      int so_error = 0;
      socklen_t len = sizeof(so_error);
      ::getsockopt(s.native_handle(), SOL_SOCKET, SO_ERROR, &so_error, &len);
      ec = boost::system::error_code(so_error, boost::system::system_category());
    }
    if (ec) {
      last_error = ec.message();
      continue;
    }
    s.set_option(tcp::no_delay(true), ec);
    impl->peer = endpoint_text(entry.endpoint());
    return std::unique_ptr<Connection>(new Connection(std::move(impl)));
  }
  throw WireError(WireError::Kind::kConnect, "connect to " + target + ": " + last_error);
}

void Connection::send(const v1::Envelope& env, int timeout_ms) {
  const std::string frame = encode_frame(env);
  impl_->write_all(frame.data(), frame.size(), timeout_ms);
}

void Connection::send_frame(const std::string& frame, int timeout_ms) {
  impl_->write_all(frame.data(), frame.size(), timeout_ms);
}

void Connection::send_bytes(const void* data, size_t n, int timeout_ms) {
  impl_->write_all(static_cast<const char*>(data), n, timeout_ms);
}

bool Connection::recv_raw(std::string_view* frame, int timeout_ms) {
  return impl_->read_raw(frame, timeout_ms);
}

bool Connection::recv(v1::Envelope* env, int timeout_ms) {
  return impl_->read_frame(env, timeout_ms);
}

void Connection::close() {
  impl_->closed = true;
  boost::system::error_code ec;
  // shutdown (not close): a thread blocked in poll() on this descriptor wakes up, and the
  // descriptor number cannot be reused under it.
  impl_->socket.shutdown(tcp::socket::shutdown_both, ec);
}

std::string Connection::peer() const { return impl_->peer; }
const std::string& Connection::peer_name() const { return impl_->peer_name; }

void Connection::client_handshake(v1::Role role, const std::string& name, const Credential& cred,
                                  int timeout_ms) {
  const auto deadline = deadline_after(timeout_ms);
  // A TLS server says nothing to a plain-TCP peer: name the likely cause.
  const std::string hint = impl_->tls ? "" : " (a TLS port? connect with tls://HOST:PORT)";
  v1::Envelope env;
  bool got = false;
  try {
    got = recv(&env, remaining_ms(deadline));
  } catch (const WireError& e) {
    if (e.kind() != WireError::Kind::kClosed) throw;
    throw WireError(e.kind(), std::string(e.what()) + " before its ServerHello" + hint);
  }
  if (!got)
    throw WireError(WireError::Kind::kTimeout, "hello from " + peer() + ": no ServerHello within " +
                                                   std::to_string(timeout_ms) + " ms" + hint);
  if (env.has_error())  // a full server (connection cap) may take us later: kConnect
    throw WireError(env.error().code() == v1::RESOURCE_EXHAUSTED ? WireError::Kind::kConnect
                                                                 : WireError::Kind::kAuth,
                    "hello from " + peer() + ": refused: " + env.error().message());
  if (!env.has_server_hello())
    throw WireError(WireError::Kind::kBadFrame,
                    "hello from " + peer() + ": expected ServerHello as the first frame");
  const auto& sh = env.server_hello();
  if (sh.version() != kProtocolVersion)
    throw WireError(WireError::Kind::kBadVersion,
                    "hello from " + peer() + ": server speaks protocol version " +
                        std::to_string(sh.version()) + ", this side " +
                        std::to_string(kProtocolVersion));
  if (sh.auth_required() && cred.secret.empty())
    throw WireError(WireError::Kind::kAuth,
                    "hello to " + peer() + ": server requires authentication; pass --secret-file");
  if (!sh.auth_required() && !cred.secret.empty())
    throw WireError(WireError::Kind::kAuth,
                    "hello to " + peer() +
                        ": server does not ask for authentication but this side holds a key: "
                        "refusing it (an impostor, or a server started without its key files)");
  const std::string client_nonce = random_nonce();
  v1::Envelope reply;
  reply.set_version(kProtocolVersion);
  auto* ch = reply.mutable_client_hello();
  ch->set_version(kProtocolVersion);
  ch->set_role(role);
  ch->set_name(name);
  ch->set_client_nonce(client_nonce);
  ch->set_key_id(cred.key_id);
  const std::string& channel = impl_->exporter;
  if (sh.auth_required())
    ch->set_proof(hello_proof(cred.secret, binding_of(*ch, sh.nonce(), channel)));
  send(reply, std::max(remaining_ms(deadline), 1));
  v1::Envelope ack;
  got = false;
  try {
    got = recv(&ack, remaining_ms(deadline));
  } catch (const WireError& e) {
    if (e.kind() == WireError::Kind::kClosed)
      throw WireError(WireError::Kind::kBusy, "hello to " + peer() +
                                                  ": server closed the connection before "
                                                  "answering (busy, or stopping)");
    throw;
  }
  if (!got)
    throw WireError(WireError::Kind::kTimeout, "hello to " + peer() + ": no answer within " +
                                                   std::to_string(timeout_ms) + " ms");
  if (ack.has_error()) {
    auto kind = ack.error().code() == v1::BAD_VERSION ? WireError::Kind::kBadVersion
                                                      : WireError::Kind::kAuth;
    throw WireError(kind, "hello to " + peer() + ": refused: " + ack.error().message());
  }
  if (!ack.has_hello_accepted())
    throw WireError(WireError::Kind::kBadFrame,
                    "hello to " + peer() + ": expected HelloAccepted, got another message");
  const auto& ha = ack.hello_accepted();
  if (sh.auth_required() &&
      !constant_time_equal(ha.server_proof(),
                           server_proof(cred.secret, binding_of(*ch, sh.nonce(), channel))))
    throw WireError(WireError::Kind::kAuth,
                    "hello to " + peer() +
                        ": the server did not prove it holds the key: refusing it (an impostor?)");
  impl_->peer_name = ha.server();
  impl_->identity = ha.identity();
  impl_->admin = ha.admin();
}

void Connection::start_tls(const TlsClientOptions& o, int timeout_ms) {
  if (!o.enabled || impl_->tls) return;
  try {
    impl_->tls = TlsSession::client(impl_->fd(), impl_->host, o.ca_file);
    const auto deadline = deadline_after(timeout_ms);
    int wait = 0;
    while (!impl_->tls->handshake(&wait)) {
      if (poll_until(impl_->fd(), static_cast<short>(wait), deadline) == 0)
        throw WireError(WireError::Kind::kTimeout, "TLS handshake with " + peer() +
                                                       ": timed out after " +
                                                       std::to_string(timeout_ms) + " ms");
    }
    impl_->exporter = impl_->tls->exporter(kTlsExporterLabel);
  } catch (const std::runtime_error& e) {
    if (dynamic_cast<const WireError*>(&e)) throw;
    throw WireError(WireError::Kind::kConnect, "TLS with " + peer() + ": " + e.what());
  }
}

const std::string& Connection::channel_binding() const { return impl_->exporter; }

const std::string& Connection::identity() const { return impl_->identity; }
bool Connection::admin() const { return impl_->admin; }

// ---------------------------------------------------------------- Listener

struct Listener::Impl {
  asio::io_context io;
  tcp::acceptor acceptor{io};
  size_t max_frame;
  int hello_timeout_ms = 5000;
  std::string server_name = "mprefill";
  std::atomic<bool> closed{false};
  std::shared_ptr<const TlsServerContext> tls;
};

Listener::Listener(const std::string& host, uint16_t port, size_t max_frame)
    : impl_(std::make_unique<Impl>()) {
  impl_->max_frame = max_frame;
  boost::system::error_code ec;
  auto addr = asio::ip::make_address(host.empty() ? "127.0.0.1" : host, ec);
  if (ec) {
    // A host name: resolve it.
    tcp::resolver resolver(impl_->io);
    auto results = resolver.resolve(host, std::to_string(port), ec);
    if (ec || results.empty())
      throw WireError(WireError::Kind::kConnect, "listen on " + host + ":" + std::to_string(port) +
                                                     ": cannot resolve: " + ec.message());
    addr = results.begin()->endpoint().address();
  }
  tcp::endpoint ep(addr, port);
  auto& a = impl_->acceptor;
  a.open(ep.protocol(), ec);
  if (!ec) a.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) a.bind(ep, ec);
  if (!ec) a.listen(asio::socket_base::max_listen_connections, ec);
  if (!ec) a.non_blocking(true, ec);
  if (ec)
    throw WireError(WireError::Kind::kConnect,
                    "listen on " + endpoint_text(ep) + ": " + ec.message());
}

Listener::~Listener() {
  boost::system::error_code ec;
  impl_->acceptor.close(ec);
}

uint16_t Listener::port() const {
  boost::system::error_code ec;
  return impl_->acceptor.local_endpoint(ec).port();
}

void Listener::set_hello_timeout_ms(int ms) { impl_->hello_timeout_ms = std::max(ms, 1); }
void Listener::set_server_name(const std::string& name) { impl_->server_name = name; }

void Listener::enable_tls(const std::string& cert, const std::string& key, const std::string& who) {
  impl_->tls = std::make_shared<const TlsServerContext>(cert, key, who);
}

bool Listener::tls() const { return impl_->tls != nullptr; }

bool Listener::loopback() const {
  boost::system::error_code ec;
  const auto ep = impl_->acceptor.local_endpoint(ec);
  return !ec && ep.address().is_loopback();
}

void Listener::close() {
  impl_->closed = true;
  // shutdown wakes a poll() on the listening socket (Linux); close in the destructor.
  ::shutdown(impl_->acceptor.native_handle(), SHUT_RDWR);
}

std::unique_ptr<Connection> Listener::accept_raw(int timeout_ms, std::string* error) {
  auto set_error = [&](const std::string& e) {
    if (error) *error = e;
  };
  const auto deadline = deadline_after(timeout_ms);
  auto impl = std::make_unique<Connection::Impl>(impl_->max_frame);
  for (;;) {
    if (impl_->closed) {
      set_error("listener closed");
      return nullptr;
    }
    boost::system::error_code ec;
    impl_->acceptor.accept(impl->socket, ec);
    if (!ec) break;
    if (ec != asio::error::would_block && ec != asio::error::try_again) {
      if (impl_->closed) {
        set_error("listener closed");
        return nullptr;
      }
      if (ec == asio::error::connection_aborted) continue;
      set_error("accept: " + ec.message());
      return nullptr;
    }
    // Slices of at most 100 ms so that close() from another thread is seen promptly.
    auto slice = std::min(deadline, Clock::now() + std::chrono::milliseconds(100));
    int ev = poll_until(impl_->acceptor.native_handle(), POLLIN, slice);
    if (ev == 0 && Clock::now() >= deadline) {
      set_error("");
      return nullptr;
    }
  }
  boost::system::error_code ec;
  impl->socket.non_blocking(true, ec);
  impl->socket.set_option(tcp::no_delay(true), ec);
  auto remote = impl->socket.remote_endpoint(ec);
  impl->peer = ec ? std::string("?") : endpoint_text(remote);
  impl->parser.set_max_frame(std::min(impl_->max_frame, kHelloMaxFrame));
  impl->server_tls = impl_->tls;
  set_error("");
  return std::unique_ptr<Connection>(new Connection(std::move(impl)));
}

bool Connection::server_handshake(v1::Role expected_role, const std::string& secret,
                                  const std::string& server_name, size_t max_frame, int timeout_ms,
                                  std::string* error) {
  auto set_error = [&](const std::string& e) {
    if (error) *error = e;
  };
  const int ht = std::max(timeout_ms, 1);
  const auto deadline = deadline_after(ht);
  if (impl_->server_tls && !impl_->tls) {
    std::string why;
    if (!impl_->accept_tls(deadline, ht, &why)) {
      set_error(why);
      return false;
    }
  }
  const std::string& channel = impl_->exporter;
  const bool sent = !impl_->hello_nonce.empty();
  if (sent && impl_->hello_auth != !secret.empty()) {
    set_error("hello from " + peer() + ": ServerHello was sent with another auth setting");
    return false;
  }
  const std::string nonce = sent ? impl_->hello_nonce : random_nonce();
  try {
    if (!sent) send(make_server_hello(nonce, !secret.empty()), ht);
    v1::Envelope env;
    if (!recv(&env, std::max(remaining_ms(deadline), 1))) {
      set_error("hello from " + peer() + ": no ClientHello within " + std::to_string(ht) + " ms");
      return false;
    }
    if (!env.has_client_hello()) {
      send(make_error(0, v1::BAD_FRAME, "expected ClientHello"), ht);
      set_error("hello from " + peer() + ": first frame is not a ClientHello");
      return false;
    }
    std::string why;
    v1::ErrorCode code = v1::ERROR_CODE_UNSPECIFIED;
    if (!check_client_hello(env.client_hello(), nonce, expected_role, secret, &why, &code,
                            channel)) {
      send(make_error(0, code, why), ht);
      set_error("hello from " + peer() + ": " + why);
      return false;
    }
    impl_->peer_name = env.client_hello().name();
    impl_->parser.set_max_frame(max_frame);  // authenticated: full frames
    send(make_hello_accepted(server_name, env.client_hello(), nonce, secret, "", false, channel),
         ht);
  } catch (const WireError& e) {
    set_error(e.what());
    return false;
  }
  set_error("");
  return true;
}

bool Connection::send_server_hello(bool auth, int timeout_ms, std::string* error) {
  if (impl_->server_tls || !impl_->hello_nonce.empty()) return true;
  const std::string nonce = random_nonce();
  try {
    send(make_server_hello(nonce, auth), std::max(timeout_ms, 1));
  } catch (const WireError& e) {
    if (error) *error = e.what();
    return false;
  }
  impl_->hello_nonce = nonce;
  impl_->hello_auth = auth;
  return true;
}

int Connection::wait_fd() const { return impl_->fd(); }

std::unique_ptr<Connection> Listener::accept(int timeout_ms, v1::Role expected_role,
                                             const std::string& secret, std::string* peer_name,
                                             std::string* error) {
  auto conn = accept_raw(timeout_ms, error);
  if (!conn) return nullptr;
  // Hello exchange, bounded separately from the wait for a connection.
  if (!conn->server_handshake(expected_role, secret, impl_->server_name, impl_->max_frame,
                              impl_->hello_timeout_ms, error))
    return nullptr;
  if (peer_name) *peer_name = conn->peer_name();
  return conn;
}

}  // namespace mprefill::wire
