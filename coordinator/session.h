// Private to coordinator/: one connection of the coordinator (client, worker group rank 0
// or decoder). All socket work, timers and the parser run on the session's strand; send()
// and the close requests may be called from any thread (they post onto the strand).
// Until the hello is accepted a frame may be at most kHelloMaxFrame bytes and must arrive
// within hello_timeout_ms; after it, a frame begun must be complete within
// frame_timeout_ms, and a client's frame over kSmallFrame is read on only once the
// coordinator granted its whole length (max_large_frame_bytes over all connections).
#pragma once
#include <array>
#include <cstddef>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "coordinator/state.h"
#include "proto/wire.h"

namespace mprefill::coord {

// A session whose unsent frames exceed this is a peer that does not read: closed.
constexpr size_t kMaxQueuedBytes = size_t{256} << 20;
constexpr size_t kReadChunk = size_t{64} << 10;
constexpr size_t kHelloReadChunk = size_t{4} << 10;  // before the hello (cheap idle peers)
// Client frames up to this are read without a grant (a connection holds at most this
// plus one read chunk of an ungranted frame).
constexpr size_t kSmallFrame = size_t{256} << 10;

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(std::shared_ptr<Coordinator::Impl> c, tcp::socket sock);

  void start();  // ServerHello, the hello timer, the first read
  // A connection over --max-connections: one Error, then closed (never registered).
  void refuse(const std::string& why);
  // Thread-safe: queues a frame onto the strand.
  void send(const v1::Envelope& env);
  // Error, then close once it is written (or after 5 s if the peer does not read).
  void send_error_and_close(uint64_t job, v1::ErrorCode code, const std::string& msg);
  void close_async();
  void close();  // on the strand (or at stop): idempotent, tells the coordinator
  // Thread-safe: reading goes on after a message the coordinator took off the strand
  // (on_message returned false; until then no further frame is read or handled).
  void resume();

  const std::string& peer() const { return peer_; }
  // Set once by the hello on the strand, read under the coordinator's mutex afterwards.
  v1::Role role() const { return role_; }
  const std::string& name() const { return name_; }
  // Client key name ("" without --client-keys), admin role, SHA-256 of the key proved.
  const std::string& owner() const { return owner_; }
  bool admin() const { return admin_; }
  const std::string& key_digest() const { return key_digest_; }
  std::string registered;  // group / decoder name once registered (under coordinator mu)
  bool pre_hello = false;  // counted in Impl::pre_hello (under coordinator mu)
  // Hello accepted (under coordinator mu): role(), owner() are final and may be read.
  bool authenticated = false;

 private:
  void write(std::string frame);
  void write_next();
  void read();
  void watch_partial_frame(bool progressed);
  void drain();
  bool take_hello(const v1::Envelope& env);  // false: refused, the session is closing
  void bad_frame(v1::ErrorCode code, const std::string& why);
  void send_server_hello();  // after the TLS handshake, if any
  // false: the large frame being received waits for a grant (read() is called later).
  bool grant_large_frame();
  void release_grant();

  std::shared_ptr<Coordinator::Impl> coord_;
  tcp::socket socket_;
  // With --tls-cert: every byte after accept goes through this (TLS 1.3); the hello proofs
  // cover exporter_.
  std::unique_ptr<asio::ssl::stream<tcp::socket&>> tls_;
  std::string exporter_;
  asio::strand<asio::io_context::executor_type> strand_;
  asio::steady_timer hello_timer_;
  asio::steady_timer linger_timer_;  // bounds close-after-flush
  asio::steady_timer frame_timer_;   // bounds a frame begun after the hello
  asio::steady_timer grant_timer_;   // retries a large frame's grant
  size_t granted_ = 0;               // bytes granted to the frame being received
  bool frame_timer_armed_ = false;
  uint64_t frame_gen_ = 0;
  wire::FrameParser parser_;
  std::vector<char> buf_;  // kHelloReadChunk, kReadChunk once the hello is accepted
  std::deque<std::string> outq_;
  size_t queued_bytes_ = 0;
  bool writing_ = false, closed_ = false, close_after_flush_ = false, hello_done_ = false;
  bool paused_ = false;  // a message is being handled off the strand
  std::string nonce_, peer_, name_, owner_, key_digest_;
  bool admin_ = false;
  v1::Role role_ = v1::ROLE_UNSPECIFIED;
};

}  // namespace mprefill::coord
