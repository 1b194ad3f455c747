// Lines a stranger on a port can cause at will (refusals, connections, bad frames) are
// written at most once per interval per limiter; the next line written says how many were
// held back. The one limiter of the coordinator (per kind and per client key) and the
// decoder's KV port. Thread-safe; the lock covers two counters only (the caller writes the
// line after admit() returns, never under it).
#pragma once
#include <chrono>
#include <cstdint>
#include <mutex>

namespace mprefill::wire {

class LineLimiter {
 public:
  using Clock = std::chrono::steady_clock;
  explicit LineLimiter(std::chrono::milliseconds interval = std::chrono::seconds(1))
      : interval_(interval) {}
  LineLimiter(const LineLimiter&) = delete;
  LineLimiter& operator=(const LineLimiter&) = delete;

  // True: write the line now, *held = lines held back since the last one written. False:
  // the line is counted and must not be written.
  bool admit(uint64_t* held) {
    std::lock_guard<std::mutex> lock(mu_);
    const auto now = Clock::now();
    if (written_ && now - last_ < interval_) {
      ++held_;
      return false;
    }
    written_ = true;
    last_ = now;
    *held = held_;
    held_ = 0;
    return true;
  }

 private:
  const std::chrono::milliseconds interval_;
  std::mutex mu_;
  bool written_ = false;
  Clock::time_point last_{};
  uint64_t held_ = 0;
};

}  // namespace mprefill::wire
