// Rank 0's link to the coordinator: the registration of the group (connect, hello with the
// shared secret, WorkerRegister, the answer), then one connection with a reader thread
// (assignments, cancels, errors into an inbox) and a heartbeat thread. A lost coordinator
// shows up as closed(); sends never throw.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "proto/wire.h"

namespace mprefill::worker {

namespace v1 = ::mprefill::v1;

class CoordinatorLink {
 public:
  CoordinatorLink(std::unique_ptr<wire::Connection> conn, int heartbeat_ms);
  ~CoordinatorLink();
  CoordinatorLink(const CoordinatorLink&) = delete;
  CoordinatorLink& operator=(const CoordinatorLink&) = delete;

  // Never throws: a lost coordinator shows up as closed().
  void send(const v1::Envelope& env);
  // The next message within timeout_ms (nullopt on timeout or a closed link).
  std::optional<v1::Envelope> next(int timeout_ms);
  bool closed();
  // A CancelJob for this job arrived.
  bool cancelled(uint64_t job);
  // The running job, sent with each heartbeat (0: idle).
  void set_running(uint64_t job) { running_ = job; }

 private:
  std::unique_ptr<wire::Connection> conn_;
  int heartbeat_ms_;
  std::mutex mu_, send_mu_;
  std::condition_variable cv_;
  std::deque<v1::Envelope> inbox_;
  bool stop_ = false, closed_ = false;
  uint64_t cancelled_ = 0;
  std::atomic<uint64_t> running_{0};
  std::thread reader_, beater_;

  void read_loop();
  void beat_loop();
};

// This rank's RankInfo as a text record for Control::all_gather, and back.
std::string rank_info_record(const std::string& device);
v1::RankInfo parse_rank_info(int rank, const std::string& record);

// A registration the coordinator refused (auth, version, fingerprint, a taken name):
// retrying cannot help. Other failures (connect, timeout) throw std::runtime_error.
struct RegisterRefused : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Connects to coordinator (HOST:PORT, tls://HOST:PORT for TLS verified against tls_ca
// when given), proves the secret, sends reg and waits for WorkerRegistered, each step
// within timeout_ms. Errors name the coordinator.
std::unique_ptr<CoordinatorLink> register_group(const std::string& coordinator,
                                                const std::string& secret,
                                                const v1::WorkerRegister& reg, int timeout_ms,
                                                const std::string& tls_ca = "");

}  // namespace mprefill::worker
