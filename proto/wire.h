// Frames on every mprefill TCP connection: a 4-byte little-endian length, then a
// serialized mprefill.v1.Envelope of that many bytes (see envelope.proto).
//
// CONTRACT (lead): the coordinator (async, Boost.Asio strands) uses encode_frame /
// FrameParser; worker ranks, decoders and the CLI use the blocking Connection below.
// Keep these names and meanings; add what you need.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
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

// A frame's body length: its 4-byte little-endian prefix at p.
inline uint32_t frame_body_length(const uint8_t* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
}

// A connection-level failure: closed peer, timeout, malformed or oversize frame, version
// mismatch, failed authentication. what() is one line with the peer and the operation.
// What the connecting side proves in its hello: the shared infrastructure secret (key_id
// empty: worker groups, decoders, and clients of a coordinator without --client-keys), or
// one client's key from the coordinator's --client-keys file. Empty secret: no credential.
struct Credential {
  std::string key_id;
  std::string secret;
};

// TLS of a connecting side (OpenSSL, TLS 1.3 only). Without ca_file the certificate is
// not verified: a side that holds a key still authenticates the server through the
// hello's server proof, which covers the TLS exporter (a relaying man in the middle has
// two TLS sessions with different exporters and cannot produce it).
struct TlsClientOptions {
  bool enabled = false;
  std::string ca_file;  // PEM; verifies the chain and the host name / IP address
};
// A host given as "tls://HOST" (e.g. --coordinator tls://HOST:PORT, for every component)
// makes Connection::connect run TLS right away (verifying against its tls.ca_file when
// one is given, else without certificate verification).
constexpr const char* kTlsScheme = "tls://";
// Label of the TLS exporter value the hello proofs cover (32 bytes, no context).
constexpr const char* kTlsExporterLabel = "EXPORTER-mprefill-hello";

class WireError : public std::runtime_error {
 public:
  // kBusy: the server closed the connection after its ServerHello without answering the
  // client's hello (a full pre-hello pool closes its oldest member under a flood, or the
  // server is stopping); a refusal (auth, version) always comes as an Error frame, so
  // kBusy is worth a bounded retry.
  enum class Kind { kClosed, kTimeout, kBadFrame, kBadVersion, kAuth, kConnect, kBusy };
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
  // Bytes (4-byte length included) of the frame being assembled once its length arrived;
  // 0 before that. Lets a receiver budget a large frame before buffering it.
  size_t pending_frame_bytes() const;
  // Room for n buffered bytes at once (no doubling while a budgeted frame arrives).
  void reserve(size_t n);
  // Drops consumed bytes and returns spare capacity (after a large frame).
  void release_memory();
  // Limit for frames not yet started (e.g. raised from kHelloMaxFrame after the hello).
  void set_max_frame(size_t max_frame) { max_frame_ = max_frame; }
  size_t max_frame() const { return max_frame_; }
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
  void compact();  // moves the buffered bytes to the front
};

// Blocking framed TCP connection with a deadline on every call (Boost.Asio underneath).
// Not thread-safe: one sender and one receiver thread at most (send and recv may run
// concurrently with each other).
class Connection {
 public:
  // Connects within timeout_ms; throws WireError(kConnect / kTimeout). TLS (start_tls)
  // within the same timeout when tls.enabled or host is "tls://HOST".
  static std::unique_ptr<Connection> connect(const std::string& host, uint16_t port, int timeout_ms,
                                             size_t max_frame = kDefaultMaxFrame,
                                             const TlsClientOptions& tls = {});
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
  // role, name, a fresh client nonce and, when the server requires auth, hello_proof with
  // the credential; then waits for HelloAccepted and checks its server_proof. Throws
  // WireError(kBadVersion / kAuth / kTimeout / kClosed). kAuth without sending anything:
  // a server that requires auth while this side has no credential, and a server that
  // does NOT ask for auth while this side holds one (an impostor, or a misconfigured
  // server: a credential is never sent to, nor a prompt trusted from, an unproven server).
  // kAuth after the exchange: the server's proof is missing or wrong.
  void client_handshake(v1::Role role, const std::string& name, const Credential& cred,
                        int timeout_ms);
  // Accepting side (a connection from Listener::accept_raw): on a TLS listener first the
  // TLS handshake, then sends ServerHello, checks the ClientHello (role expected, proof
  // when secret is non-empty, bound to the TLS exporter) within timeout_ms in all, answers
  // HelloAccepted with server_name and raises the frame limit to max_frame. false with a
  // one-line *error (the peer was told why where it could be: a plain-TCP peer that said
  // nothing to a TLS listener gets a plain Error frame saying the port speaks TLS).
  bool server_handshake(v1::Role expected_role, const std::string& secret,
                        const std::string& server_name, size_t max_frame, int timeout_ms,
                        std::string* error);
  // Accepting side, optional first step: on a plain-TCP connection sends the ServerHello
  // now (auth: the server requires a proof), so that the caller can wait for the peer's
  // ClientHello with poll() on wait_fd() without a thread per connection;
  // server_handshake then goes on from the ClientHello (same nonce). A no-op on a TLS
  // connection (its handshake starts with the client's bytes). false with *error when the
  // send fails.
  bool send_server_hello(bool auth, int timeout_ms, std::string* error);
  // The socket, for poll(POLLIN) by the caller: readable once the peer sent bytes (or
  // closed). Not for reading or writing.
  int wait_fd() const;
  // The shared secret (no key id).
  void client_handshake(v1::Role role, const std::string& name, const std::string& secret,
                        int timeout_ms) {
    client_handshake(role, name, Credential{"", secret}, timeout_ms);
  }
  // TLS handshake on the connected socket, before client_handshake (which then binds
  // its proofs to the exporter). Throws WireError(kConnect / kTimeout) with the reason.
  void start_tls(const TlsClientOptions& o, int timeout_ms);
  // The TLS exporter value (kTlsExporterLabel, 32 bytes); empty without TLS.
  const std::string& channel_binding() const;
  // HelloAccepted.identity / admin of the last client_handshake.
  const std::string& identity() const;
  bool admin() const;

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
  // TLS 1.3 on every connection accepted from now on (PEM chain and key; `who` starts the
  // error messages). Throws std::runtime_error naming the file on a bad one.
  void enable_tls(const std::string& cert, const std::string& key, const std::string& who);
  bool tls() const;
  // The bound address is a loopback address (127.0.0.0/8, ::1).
  bool loopback() const;
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
// What both proofs of a hello cover: the two fresh nonces, the connecting side's role and
// key id, and the channel binding (TLS exporter value; empty on plain TCP). A proof is
// HMAC-SHA256(key, label || each field with a 4-byte little-endian length); the labels of
// the two directions differ, so neither proof can be reflected or replayed: not as the
// other direction, not under another role or key id, not on another connection.
struct HelloBinding {
  std::string_view server_nonce, client_nonce;
  v1::Role role = v1::ROLE_UNSPECIFIED;
  std::string_view key_id, channel;
};
// The connecting side's proof (32 raw bytes).
std::string hello_proof(std::string_view secret, const HelloBinding& b);
// The accepting side's proof, sent in HelloAccepted.server_proof (32 raw bytes).
std::string server_proof(std::string_view secret, const HelloBinding& b);
// The binding of a received ClientHello against the ServerHello nonce that was sent.
HelloBinding binding_of(const v1::ClientHello& hello, std::string_view server_nonce,
                        std::string_view channel = {});
// Checks a ClientHello against the ServerHello that was sent: version, expected role
// (ROLE_UNSPECIFIED: any of CLIENT/WORKER/DECODER), a 32-byte client nonce and the proof
// in constant time when secret is non-empty. false with a one-line *error and *code
// (BAD_VERSION / UNAUTHENTICATED / BAD_FRAME); the secret never appears in the message.
bool check_client_hello(const v1::ClientHello& hello, std::string_view nonce,
                        v1::Role expected_role, std::string_view secret, std::string* error,
                        v1::ErrorCode* code, std::string_view channel = {});
// HelloAccepted for an accepted ClientHello; with a non-empty secret it carries the
// server's proof (the key the ClientHello was checked with).
v1::Envelope make_hello_accepted(const std::string& server, const v1::ClientHello& hello,
                                 std::string_view server_nonce, std::string_view secret,
                                 const std::string& identity = "", bool admin = false,
                                 std::string_view channel = {});
v1::Envelope make_server_hello(const std::string& nonce, bool auth_required);
v1::Envelope make_error(uint64_t job_id, v1::ErrorCode code, const std::string& message);

// Reads a shared secret from a file (trailing whitespace stripped). Throws
// std::runtime_error naming the path when the file is missing, unreadable or empty.
std::string load_secret_file(const std::string& path);
// Reads a client key file: one line "NAME SECRET" (the line of that client in the
// coordinator's --client-keys file, without the role). Throws std::runtime_error naming
// the path (never the secret) when it is missing, unreadable or not of that form.
Credential load_key_file(const std::string& path);

// A connection through its hello: open(left_ms) connects, runs TLS and the hello within
// left_ms and returns the connection. A hello the server closed without answering
// (WireError::kBusy: a full pre-hello pool evicts its oldest member under a flood, which
// may be this one on a loaded host; or the server is stopping) is tried again after 5,
// 10, 20 ... ms, at most `tries` times in all and within timeout_ms; any other error, and
// the last kBusy, is thrown as it came.
std::unique_ptr<Connection> open_retrying_busy(
    const std::function<std::unique_ptr<Connection>(int left_ms)>& open, int timeout_ms,
    int tries = 8);

// "host:port" (or "[v6]:port") -> host, port in [0, 65535] (0: any port, for listening);
// throws std::invalid_argument with the text on a bad value.
void parse_host_port(const std::string& text, std::string* host, uint16_t* port);

}  // namespace mprefill::wire
