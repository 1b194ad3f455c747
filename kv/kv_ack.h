// The part of a worker-side KV sink that does not depend on how the pages travel, shared
// by TcpKvHandoff (pages over TCP) and gpu::NcclKvSink (pages by NCCL, headers over TCP):
// the contract's shape, the first failure, put()'s checks, the decoder's replies
// (LayerAck of each layer, due within timeout_ms of the moment its deadline starts: TCP,
// its last page sent; NCCL, its put) and finish()'s bounded wait for them.
// Defined in kv_handoff.cc (mprefill_handoff, which has the wire protocol).
#pragma once
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <vector>

#include "kv/kv_handoff.h"
#include "kv/kv_sink.h"
#include "proto/wire.h"

namespace mprefill {

struct KvSinkCore {
  using Clock = std::chrono::steady_clock;

  KvHandoffOptions opt;
  std::string where;  // prefix of every error: "KV handoff to decoder H:P (job J, rank R)"
  int head_dim = 0, n_kv_heads = 0, n_layers = 0, page_tokens = 0;

  mutable std::mutex mu;  // guards every member below
  std::condition_variable cv;
  bool stopping = false, failed = false;
  std::string error;
  int layers_put = 0;  // written by put() only (which may read it unlocked)
  bool any_put = false;
  // first_put / last_call: the first / latest put() call (the executor's layer done);
  // last_put: the latest put() returned; last_ack: the latest LayerAck.
  Clock::time_point first_put, last_call, last_put, last_ack;
  std::vector<char> acked, ack_due;             // [layer]
  std::vector<Clock::time_point> ack_due_from;  // [layer]
  int acked_prefix = 0;                         // layers [0, acked_prefix) acked
  KvHandoffStats st;

  virtual ~KvSinkCore() = default;

  // Takes the options and the contract's shape; throws std::runtime_error "WHERE: ..."
  // for a bad timeout, a contract without shape or page size, or another page layout.
  void init(KvHandoffOptions o, std::string where_prefix);
  // Records the first failure (none once stopping): error = where + ": " + msg; calls
  // on_fail() under the lock, wakes every waiter, then close_connections().
  void fail(const std::string& msg);
  // put()'s start: false when a failure is recorded already (the layer is dropped under
  // defer_errors, else that failure is thrown); notes the put's time (last_call, and
  // first_put for the first).
  bool begin_put();
  // put()'s way out: records msg and throws it unless defer_errors.
  void give_up(const std::string& msg);
  // "" or what is wrong with a slice put next: layer order, placement (on the device for
  // NCCL, on the host for TCP; placement_msg when not), head_dim, dtype (f32 or bf16),
  // KV heads (ascending ids of the contract).
  std::string slice_problem(const KvSlice& s, bool want_device,
                            const std::string& placement_msg) const;
  // Under mu: the layer's ack falls due timeout_ms after t.
  void start_ack_deadline(int layer, Clock::time_point t);
  // The reader loop: the decoder's replies on conn (100 ms polls) until stopping or a
  // failure. LayerAcks of this job are recorded; a refusal, a failed job, a dropped
  // connection, or a layer not acked in time ("no LayerAck for layer L within T ms " +
  // overdue_what) fail the handoff.
  void read_acks(wire::Connection* conn, const std::string& overdue_what);
  // finish()'s wait: fails when not every layer was put, then waits for every ack (each
  // is bounded by the reader; the outer bound timeout_ms * (n_layers + 2) catches a
  // wedged stream); sets st.handoff_ms / tail_ms / last_put_ms / kv_ready_ms when all
  // were acked.
  void await_acks();

  bool has_failed() const;
  std::string error_message() const;
  KvHandoffStats stats() const;

 protected:
  virtual void on_fail() {}            // under mu, once (NCCL: abort the communicator)
  virtual void close_connections() {}  // after on_fail, outside mu
};

}  // namespace mprefill
