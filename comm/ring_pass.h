// Ring pass-KV: the one exchange loop of sequence-parallel attention, for both backends.
// Every sp rank holds the K/V rows of its token ranges; in `size` steps each shard travels
// round the ring (send to rank + 1, receive from rank - 1), double buffered: at step s
// this rank holds the shard of rank (rank - s) mod size in slot s % 2 (its own first) and
// computes on it while the transport moves that shard on and receives the next one into
// the other slot. What "post" and "complete" mean is the transport's business:
//   - HostRingTransport (here): fp32 host buffers, an MPI group exchange on a helper
//     thread that alone uses the communicator until completed;
//   - the CUDA backend's transport (engine/cuda/ring_step.cc): NCCL on a comm stream,
//     ordered by events against the compute stream (complete = the compute stream waits).
// Status codes (comm/ convention); a failure names the rank, the step and the peer.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "comm/communicator.h"

namespace mprefill::comm {

// Token ranges of one rank, ascending (model/parallel_plan.h's TokenRanges).
using RingRanges = std::vector<std::pair<int64_t, int64_t>>;

// Which rows travel: every rank's ranges (the same on every rank) and causal skipping.
struct RingPlan {
  std::vector<RingRanges> layout;
  // Causal skipping: a shard forwarded by `sender` still reaches ranks sender+1 .. owner-1;
  // none of them reads a key after its last query row, so only the owner's rows up to the
  // largest of those positions travel (a prefix of the shard: ranges ascend). Receivers
  // must clip their keys to key_end(). Off: whole shards.
  bool skip_causal = false;

  int size() const { return static_cast<int>(layout.size()); }
  int64_t rows(int rank) const;
  int64_t max_rows() const;
  // Rows of owner's shard that `sender` forwards.
  int64_t sent_rows(int sender, int owner) const;
  // Keys [0, key_end) may be read by `rank` (its last query row + 1; n when not skipping).
  int64_t key_end(int rank) const;
};

struct RingStep {
  int step = 0;   // 0 .. size - 1
  int owner = 0;  // the rank whose shard this step holds
  int slot = 0;   // step % 2
};

// The backend half of the loop.
class RingTransport {
 public:
  virtual ~RingTransport() = default;
  // Start moving the shard of slot s.slot (send_rows rows, to rank + 1) and receiving
  // recv_rows rows into slot 1 - s.slot (from rank - 1); returns once posted.
  virtual Status post(const RingStep& s, int64_t send_rows, int64_t recv_rows) = 0;
  // Finish the transfer posted at step s: afterwards slot 1 - s.slot may be read.
  virtual Status complete(const RingStep& s) = 0;
  virtual std::string last_error() const = 0;
};

struct RingPassStats {
  int64_t rows_sent = 0;  // K rows (each with its V row) this rank sent
  double compute_ms = 0;  // host time in compute (the CPU attention; an enqueue on a GPU)
  double wait_ms = 0;     // host time in complete() after the step's compute
};

// The loop. rank: this rank in plan.layout; compute(step) runs on the shard of the step's
// slot. On failure returns the status with a one-line message in *error (prefixed by
// who): a compute failure before a transfer failure of the same step. The posted transfer
// is completed before returning, also when compute throws.
Status ring_pass(int rank, const RingPlan& plan, RingTransport& transport,
                 const std::function<Status(const RingStep&)>& compute, RingPassStats* stats,
                 std::string* error, const std::string& who);

// fp32 host shards through an MPI (or any host-buffer) communicator; the exchange of a
// step runs on a helper thread between post() and complete(). Slot 0 of step 0 is the
// caller's own K/V (not copied); received shards land in two owned buffers.
class HostRingTransport final : public RingTransport {
 public:
  // k, v: this rank's rows [rows][kv_row]; max_rows: the largest shard.
  HostRingTransport(Communicator& sp, const float* k, const float* v, int64_t kv_row,
                    int64_t max_rows);
  ~HostRingTransport() override;
  Status post(const RingStep& s, int64_t send_rows, int64_t recv_rows) override;
  Status complete(const RingStep& s) override;
  std::string last_error() const override { return error_; }
  // The K / V rows held at `step` (valid once the transfer into it completed).
  const float* k(int step) const { return step == 0 ? k0_ : kbuf_[step % 2].data(); }
  const float* v(int step) const { return step == 0 ? v0_ : vbuf_[step % 2].data(); }

 private:
  Communicator& sp_;
  const float *k0_, *v0_;
  int64_t kv_row_;
  std::vector<float> kbuf_[2], vbuf_[2];
  std::thread xfer_;
  Status status_ = Status::kOk;
  std::string error_;
};

}  // namespace mprefill::comm
