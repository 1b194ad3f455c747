// The KV handoff of one job: the sink every rank's executor writes each layer's KV to,
// carrying it to the job's decoder over the job's kv_transport (kv/kv_transport.h picks and
// sets it up; no fallback to another transport). Errors are deferred (put() records,
// finish() throws), so a collective executor finishes its layer loop in step with the other
// ranks; failed()/error() say why.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "engine/executor.h"
#include "kv/kv_transport.h"
#include "proto/wire.h"

namespace mprefill::worker {

namespace v1 = ::mprefill::v1;

using Handoff = kv::KvSender;

// What a rank needs besides the Assignment to hand its KV off.
struct HandoffParams {
  int rank = 0, local_rank = 0;  // world rank (sender rank), node-local rank (its GPU)
  std::string secret;
  std::string tls_ca;  // verifies a TLS decoder's certificate (empty: the hello proof only)
  v1::KvContract contract;
  int default_timeout_ms = 30000;  // when the Assignment gives none
  int streams = 1;
};

// The KV transports this group serves ("tcp", and "nccl" where exec can carry it).
std::vector<std::string> served_kv_transports(const Executor& exec);

// Throws std::runtime_error with one line when the job's kv_transport is not served by
// this group's executor (before any connection).
void check_kv_transport(const v1::Assignment& job, const Executor& exec);

// Sets the job's transport up to its decoder. Throws std::runtime_error "KV transport 'T'
// cannot be set up: ..." naming the decoder.
std::unique_ptr<Handoff> make_handoff(const v1::Assignment& job, const HandoffParams& p,
                                      const Executor& exec);

}  // namespace mprefill::worker
