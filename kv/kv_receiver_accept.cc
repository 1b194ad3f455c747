// KvReceiver's pre-hello stage: accepting KV-port connections, holding those in their hello
// in one poll() set until their first frame is all there, the pool's eviction and the
// rate-limited refusal log. The hellos themselves and the pages: kv_receiver.cc.
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include "kv/kv_receiver.h"
#include "kv/kv_receiver_stream.h"

namespace mprefill::kv {

void KvReceiver::log_refusal(const std::string& line) {
  uint64_t held = 0;
  if (!refusal_log_.admit(&held)) return;
  if (held > 0)
    std::fprintf(stderr,
                 "mprefill-decoder: KV stream refused: %s (and %llu more since the last line)\n",
                 line.c_str(), static_cast<unsigned long long>(held));
  else
    std::fprintf(stderr, "mprefill-decoder: KV stream refused: %s\n", line.c_str());
}

// Accepts connections, sends each its ServerHello and adds it to the silent ones that
// hello_loop polls (no thread until it speaks), at most max_prehello in their hello.
void KvReceiver::accept_loop() {
  while (!stop_) {
    std::string error;
    std::unique_ptr<wire::Connection> conn;
    try {
      conn = listener_->accept_raw(200, &error);
    } catch (const std::exception& e) {
      if (stop_) return;
      std::fprintf(stderr, "mprefill-decoder: KV port accept: %s\n", e.what());
      continue;
    }
    if (!conn) {
      if (!error.empty() && !stop_) log_refusal(error);
      continue;
    }
    // A full pre-hello pool closes its oldest member for the new connection (a peer that
    // says its hellos promptly always gets in, as on the coordinator's port); only when as
    // many again are closed but not yet gone is the new one refused.
    if (prehello_.load() >= opt_.max_prehello && !evict_oldest_prehello()) {
      log_refusal(conn->peer() + ": " + std::to_string(opt_.max_prehello) +
                  " connections already in their hello");
      conn->close();
      continue;
    }
    auto s = std::make_shared<Stream>();
    s->peer = conn->peer();
    s->conn = std::move(conn);
    s->hello_deadline = Clock::now() + std::chrono::milliseconds(opt_.prehello_timeout_ms);
    s->wait_fd = s->conn->wait_fd();
    // A fresh socket's buffer takes the small ServerHello at once; a peer that does not
    // read is found out by its hello deadline.
    if (!s->conn->send_server_hello(!opt_.secret.empty(), 1000, &error)) {
      log_refusal(s->peer + ": " + error);
      s->conn->close();
      continue;
    }
    ++prehello_;
    s->prehello = true;
    std::lock_guard<std::mutex> lock(wait_mu_);
    if (stop_) return;
    waiting_.push_back(std::move(s));
  }
}

void KvReceiver::start_stream(std::shared_ptr<Stream> s) {
  std::lock_guard<std::mutex> lock(mu_);
  if (stop_) return s->conn->close();
  streams_.push_back(s);
  s->th = std::thread([this, s] { serve_stream(s); });
}

namespace {

// A plain-TCP peer's first frame (its ClientHello) is all there, or cannot be one (too
// long, the peer gone): either way its thread may take it without waiting on the peer.
bool first_frame_ready(int fd) {
  uint8_t head[4];
  const ssize_t got = ::recv(fd, head, sizeof(head), MSG_PEEK | MSG_DONTWAIT);
  if (got < 0) return errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
  if (got == 0) return true;  // closed: its thread finds out at once
  if (got < 4) return false;
  const uint32_t len = wire::frame_body_length(head);
  if (len > wire::kHelloMaxFrame) return true;  // refused at once
  int avail = 0;
  if (::ioctl(fd, FIONREAD, &avail) != 0) return true;
  return int64_t(avail) >= int64_t(4) + len;
}

}  // namespace

void KvReceiver::hello_loop() {
  // A peer that sent part of its first frame and stalls is looked at again after this
  // (poll() would report it readable at once every time).
  constexpr auto kRecheck = std::chrono::milliseconds(20);
  const bool tls = listener_->tls();
  std::vector<std::shared_ptr<Stream>> polled;
  std::vector<pollfd> fds;
  std::vector<int> slot;  // polled[i]'s entry in fds, or -1 (waiting for its recheck)
  while (!stop_) {
    {
      std::lock_guard<std::mutex> lock(wait_mu_);
      polled.assign(waiting_.begin(), waiting_.end());
    }
    auto now = Clock::now();
    fds.clear();
    slot.assign(polled.size(), -1);
    for (size_t i = 0; i < polled.size(); ++i) {
      if (polled[i]->recheck > now) continue;
      slot[i] = int(fds.size());
      fds.push_back({polled[i]->wait_fd, POLLIN, 0});
    }
    if (fds.empty()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    } else if (::poll(fds.data(), fds.size(), 20) < 0 && errno != EINTR) {
      std::fprintf(stderr, "mprefill-decoder: KV port poll: %s\n", std::strerror(errno));
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    now = Clock::now();
    std::vector<std::shared_ptr<Stream>> spoke, expired;
    {
      // Under wait_mu_: a connection still in waiting_ is not closed meanwhile (eviction
      // takes it out under this lock first), so peeking at its socket is safe.
      std::lock_guard<std::mutex> lock(wait_mu_);
      for (size_t i = 0; i < polled.size(); ++i) {
        const auto& s = polled[i];
        const short ev = slot[i] >= 0 ? fds[size_t(slot[i])].revents : 0;
        const bool late = now >= s->hello_deadline;
        if (ev == 0 && !late) continue;
        auto it = std::find(waiting_.begin(), waiting_.end(), s);
        if (it == waiting_.end()) continue;  // evicted meanwhile
        if (!late && !tls && !(ev & (POLLHUP | POLLERR | POLLNVAL)) &&
            !first_frame_ready(s->wait_fd)) {
          s->recheck = now + kRecheck;
          continue;
        }
        waiting_.erase(it);
        (late ? expired : spoke).push_back(s);
      }
    }
    for (auto& s : spoke) start_stream(std::move(s));
    // A silent peer on a TLS port may be a plain-TCP client waiting for its ServerHello:
    // its thread's handshake times out at once and tells it the port speaks TLS.
    if (tls)
      for (auto& s : expired) start_stream(std::move(s));
    else
      for (auto& s : expired) {
        if (s->prehello.exchange(false)) --prehello_;
        s->conn->close();
        log_refusal("hello from " + s->peer + ": no ClientHello within " +
                    std::to_string(opt_.prehello_timeout_ms) + " ms");
      }
  }
}

bool KvReceiver::evict_oldest_prehello() {
  std::shared_ptr<Stream> oldest;
  {
    std::lock_guard<std::mutex> lock(wait_mu_);
    if (!waiting_.empty()) {  // the oldest silent one
      oldest = std::move(waiting_.front());
      waiting_.pop_front();
    }
  }
  if (oldest) {
    if (oldest->prehello.exchange(false)) --prehello_;
  } else {  // the oldest one in its hellos on its own thread
    std::lock_guard<std::mutex> lock(mu_);
    int evicted = 0;
    for (const auto& st : streams_) {
      if (!st->prehello) continue;
      if (st->evicted) {
        ++evicted;
      } else if (!oldest) {
        oldest = st;
      }
    }
    if (!oldest || evicted >= opt_.max_prehello) return false;
    oldest->evicted = true;  // its reader wakes from the hello with an error and leaves
  }
  oldest->conn->close();
  log_refusal(oldest->peer + ": closed in its hello for a new connection (" +
              std::to_string(opt_.max_prehello) + " in their hello)");
  return true;
}

}  // namespace mprefill::kv
