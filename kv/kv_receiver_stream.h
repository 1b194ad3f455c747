// KvReceiver's internals shared by its .cc files (not a public header): one connection of
// the KV port, from its accept through its hellos to its pages.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "kv/kv_receiver.h"
#include "proto/wire.h"

namespace mprefill::kv {

using Clock = std::chrono::steady_clock;

inline double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

struct KvReceiver::Stream {
  std::unique_ptr<wire::Connection> conn;
  std::mutex send_mu;
  std::string peer;
  uint64_t job_id = 0;
  int rank = -1;
  std::atomic<bool> done{false};
  // Counted in KvReceiver::prehello_ until its hellos are done (cleared by its reader);
  // evicted: closed by the accept loop to make room (the oldest in its hello first).
  std::atomic<bool> prehello{false};
  bool evicted = false;              // under KvReceiver::mu_
  Clock::time_point hello_deadline;  // both hellos by then
  // The socket as accepted, for hello_loop's poll(): read there without touching conn,
  // which another thread may close meanwhile (a reused number is filtered by waiting_).
  int wait_fd = -1;
  Clock::time_point recheck{};  // hello_loop: not polled before (a partial first frame)
  std::thread th;

  // Never throws: a stream that cannot take a frame is dropped by its reader.
  void send(const std::string& frame, int timeout_ms) {
    std::lock_guard<std::mutex> lock(send_mu);
    try {
      conn->send_frame(frame, timeout_ms);
    } catch (const std::exception&) {
      conn->close();
    }
  }
};

}  // namespace mprefill::kv
