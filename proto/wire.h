// Frames on every mprefill TCP connection: a 4-byte little-endian length, then a
// serialized mprefill.v1.Envelope of that many bytes (see envelope.proto).
//
// CONTRACT (lead): the coordinator (async, Boost.Asio strands) uses encode_frame /
// FrameParser; worker ranks, decoders and the CLI use the blocking Connection below.
// Keep these names and meanings; add what you need.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>

#include "envelope.pb.h"

namespace mprefill::wire {

namespace v1 = ::mprefill::v1;

constexpr uint32_t kProtocolVersion = 1;
constexpr size_t kDefaultMaxFrame = size_t{64} << 20;
// Frames a peer may send before its hello is accepted (ClientHello is a few hundred
// bytes): an unauthenticated peer cannot make the receiver buffer megabytes.
constexpr size_t kHelloMaxFrame = size_t{64} << 10;

// A connection-level failure: closed peer, timeout, malformed or oversize frame, version
// mismatch, failed authentication. what() is one line with the peer and the operation.
class WireError : public std::runtime_error {
 public:
  enum class Kind { kClosed, kTimeout, kBadFrame, kBadVersion, kAuth, kConnect };
  WireError(Kind kind, const std::string& msg) : std::runtime_error(msg), kind_(kind) {}
  Kind kind() const { return kind_; }

 private:
  Kind kind_;
};

// 4-byte little-endian length + envelope bytes (envelope.version is set to
// kProtocolVersion when 0).
std::string encode_frame(const v1::Envelope& env);

// Incremental parser over a byte stream (the fuzz target). feed() appends bytes; next()
// returns kOk with one envelope, kNeedMore, or kError with a one-line reason (oversize
// length, unparsable envelope, wrong version); after kError the stream is unusable.
class FrameParser {
 public:
  enum class Result { kOk, kNeedMore, kError };
  explicit FrameParser(size_t max_frame = kDefaultMaxFrame);
  void feed(const void* data, size_t n);
  // feed() without the copy: room for n bytes at the returned pointer (valid until the
  // next call), then commit(k) once k <= n bytes were written there.
  char* prepare(size_t n);
  void commit(size_t n);
  Result next(v1::Envelope* out, std::string* error);
  // As next(), but hands out the next frame's envelope bytes unparsed (no version check:
  // the caller parses); *frame stays valid until the next feed() or next*() call.
  Result next_raw(std::string_view* frame, std::string* error);
  size_t buffered() const;
  // Limit for frames not yet started (e.g. raised from kHelloMaxFrame after the hello).
  void set_max_frame(size_t max_frame) { max_frame_ = max_frame; }
  // After kError: kBadVersion for a well-formed envelope of another protocol version,
  // kBadFrame otherwise.
  WireError::Kind error_kind() const { return error_kind_; }

 private:
  size_t max_frame_;
  bool failed_ = false;
  WireError::Kind error_kind_ = WireError::Kind::kBadFrame;
  std::string buf_;  // capacity; bytes [pos_, end_) buffered
  size_t pos_ = 0, end_ = 0;
  void make_room(size_t n);
};

// Blocking framed TCP connection with a deadline on every call (Boost.Asio underneath).
// Not thread-safe: one sender and one receiver thread at most (send and recv may run
// concurrently with each other).
class Connection {
 public:
  // Connects within timeout_ms; throws WireError(kConnect / kTimeout).
  static std::unique_ptr<Connection> connect(const std::string& host, uint16_t port, int timeout_ms,
                                             size_t max_frame = kDefaultMaxFrame);
  ~Connection();

  // Throws WireError on timeout or a closed peer.
  void send(const v1::Envelope& env, int timeout_ms);
  // Sends bytes made by encode_frame (one encoding, several receivers).
  void send_frame(const std::string& frame, int timeout_ms);
  // Sends n bytes holding whole frames back to back (the KV sender's staging buffers).
  void send_bytes(const void* data, size_t n, int timeout_ms);
  // true with one envelope; false when nothing complete arrived within timeout_ms;
  // throws WireError on a closed peer or a bad frame.
  bool recv(v1::Envelope* env, int timeout_ms);
  // As recv(), the frame's envelope bytes unparsed (FrameParser::next_raw): the KV port
  // reads page payloads in place; *frame is valid until the next recv*() call.
  bool recv_raw(std::string_view* frame, int timeout_ms);
  // Shuts the socket down (wakes a blocked send/recv in another thread, which then
  // throws kClosed); the descriptor is released by the destructor.
  void close();
  std::string peer() const;  // "host:port"
  // Name the peer gave in its ClientHello (accepted connections), or the server name
  // from HelloAccepted (connecting side).
  const std::string& peer_name() const;

  // Connecting side of the hello exchange: reads ServerHello, answers ClientHello with
  // role and name (and HMAC-SHA256(secret, nonce || role) when the server requires auth
  // and secret is non-empty), then waits for HelloAccepted. Throws WireError(kBadVersion /
  // kAuth / kTimeout / kClosed); a server that requires auth while secret is empty is kAuth
  // without sending anything.
  void client_handshake(v1::Role role, const std::string& name, const std::string& secret,
                        int timeout_ms);
  // Accepting side (a connection from Listener::accept_raw): sends ServerHello, checks the
  // ClientHello (role expected, proof when secret is non-empty) within timeout_ms, answers
  // HelloAccepted with server_name and raises the frame limit to max_frame. false with a
  // one-line *error (the peer was told why where it could be).
  bool server_handshake(v1::Role expected_role, const std::string& secret,
                        const std::string& server_name, size_t max_frame, int timeout_ms,
                        std::string* error);

  struct Impl;

 private:
  friend class Listener;
  explicit Connection(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Blocking listener for the decoder's KV port (accepting side of the hello exchange).
class Listener {
 public:
  // port 0: any free port (see port()). host: bind address (default loopback).
  Listener(const std::string& host, uint16_t port, size_t max_frame = kDefaultMaxFrame);
  ~Listener();
  uint16_t port() const;
  // Bound on the hello exchange of each accepted connection (default 5000 ms), separate
  // from accept()'s wait for a connection.
  void set_hello_timeout_ms(int ms);
  // Name sent in HelloAccepted (default "mprefill").
  void set_server_name(const std::string& name);
  // Waits up to timeout_ms for a connection (nullptr on timeout), sends ServerHello and
  // checks the ClientHello (role expected, proof when secret is non-empty); a peer that
  // fails the hello is closed and nullptr returned with *error set.
  std::unique_ptr<Connection> accept(int timeout_ms, v1::Role expected_role,
                                     const std::string& secret, std::string* peer_name,
                                     std::string* error);
  // Waits up to timeout_ms for a connection and returns it before any hello (frame limit
  // kHelloMaxFrame until server_handshake): the caller runs the hello exchanges of several
  // connections at once. nullptr on timeout (*error "") or failure.
  std::unique_ptr<Connection> accept_raw(int timeout_ms, std::string* error);
  // Stops accepting (a blocked accept() returns nullptr with *error "listener closed").
  void close();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// ---- hello helpers (shared by the blocking Listener and the coordinator's async server)

// 32 bytes from the OS random source (getrandom).
std::string random_nonce();
// HMAC-SHA256(secret, nonce || role as 4-byte little-endian), 32 raw bytes.
std::string hello_proof(std::string_view secret, std::string_view nonce, v1::Role role);
// Checks a ClientHello against the ServerHello that was sent: version, expected role
// (ROLE_UNSPECIFIED: any of CLIENT/WORKER/DECODER), proof in constant time when secret is
// non-empty. false with a one-line *error and *code (BAD_VERSION / UNAUTHENTICATED /
// BAD_FRAME); the secret never appears in the message.
bool check_client_hello(const v1::ClientHello& hello, std::string_view nonce,
                        v1::Role expected_role, std::string_view secret, std::string* error,
                        v1::ErrorCode* code);
v1::Envelope make_server_hello(const std::string& nonce, bool auth_required);
v1::Envelope make_error(uint64_t job_id, v1::ErrorCode code, const std::string& message);

// Reads a shared secret from a file (trailing whitespace stripped). Throws
// std::runtime_error naming the path when the file is missing, unreadable or empty.
std::string load_secret_file(const std::string& path);

// "host:port" (or "[v6]:port") -> host, port in [0, 65535] (0: any port, for listening);
// throws std::invalid_argument with the text on a bad value.
void parse_host_port(const std::string& text, std::string* host, uint16_t* port);

}  // namespace mprefill::wire
