// The KV handoff of one job: the sink every rank's executor writes each layer's KV to,
// carrying it to the job's decoder: TcpKvHandoff, or for kv_transport "nccl" (a one-rank
// GPU group in a CUDA build with NCCL) NcclKvSink. Errors are deferred (put() records,
// finish() throws), so a collective executor finishes its layer loop in step with the
// other ranks; failed()/error() say why.
#pragma once
#include <memory>
#include <string>

#include "engine/executor.h"
#include "kv/kv_handoff.h"
#include "kv/kv_sink.h"
#include "proto/wire.h"

namespace mprefill::worker {

namespace v1 = ::mprefill::v1;

class Handoff : public KvSink {
 public:
  virtual bool failed() const = 0;
  virtual std::string error() const = 0;
  virtual KvHandoffStats stats() const = 0;
};

// What a rank needs besides the Assignment to hand its KV off.
struct HandoffParams {
  int rank = 0, local_rank = 0;  // world rank (sender rank), node-local rank (its GPU)
  std::string secret;
  v1::KvContract contract;
  int default_timeout_ms = 30000;  // when the Assignment gives none
  int streams = 1;
};

// The KV transports this group serves ("tcp", and "nccl" where exec can carry it).
std::vector<std::string> served_kv_transports(const Executor& exec);

// Throws std::runtime_error with one line when the job's kv_transport is not served by
// this group's executor (before any connection).
void check_kv_transport(const v1::Assignment& job, const Executor& exec);

// Connects the job's streams to its decoder. Throws std::runtime_error naming the decoder.
std::unique_ptr<Handoff> make_handoff(const v1::Assignment& job, const HandoffParams& p);

}  // namespace mprefill::worker
