// The worker group's control channel: collectives over a communicator of its own (MPI), by
// which rank 0 relays the coordinator's commands and the ranks agree on errors, totals and
// per-rank figures. Every call is collective (all ranks, same order) and bounded by the
// communicator's timeout; a failure throws CommFailure: the group is out of step and must
// exit.
#pragma once
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "kernels/edge_check.h"

namespace mprefill::worker {

// A failed or timed-out control collective (the edge check's StatusError: rank, file:line
// and the communicator's last error), or a group that is out of step.
struct CommFailure : StatusError {
  explicit CommFailure(const std::string& text, Status s = Status::kCommError)
      : StatusError(s, text) {}
};

// Commands rank 0 broadcasts to the group.
enum Cmd : int64_t { kTick = 0, kJob = 1, kExit = 2, kExitFailed = 3 };

class Control {
 public:
  explicit Control(std::unique_ptr<comm::Communicator> c) : c_(std::move(c)) {}
  int rank() const { return c_->rank(); }
  int size() const { return c_->size(); }

  // Rank 0's bytes on every rank.
  void bcast(std::string* s);
  // Every rank's text record, truncated to kRecord - 1 bytes.
  static constexpr size_t kRecord = 1024;
  std::vector<std::string> all_gather(const std::string& mine);
  // The first rank whose error is non-empty (-1: none) and its message, on every rank.
  int agree(const std::string& my_error, std::string* msg);
  int64_t max(int64_t v);
  // Sum of non-negative values that fit int64 (byte counts, times in microunits).
  double sum(double v);

 private:
  std::unique_ptr<comm::Communicator> c_;
  void check(Status st, const char* what);
};

}  // namespace mprefill::worker
