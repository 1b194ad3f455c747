// Sequence-parallel ring attention on CPU ranks (dense causal, fp32): each sp rank holds
// the query rows and K/V of its zigzag token ranges (plan_sequence_parallel); K/V shards
// travel round the ring and the partial outputs are merged by log-sum-exp, so the result
// equals single-process causal attention over all n_total tokens.
#pragma once
#include <cstdint>
#include <string>

#include "comm/communicator.h"
#include "kernels/status.h"
#include "worker/parallel_plan.h"

namespace mprefill {

// Causal attention of this rank's query rows against the keys of all sp ranks: K/V
// shards travel round the ring (send to rank+1, receive from rank-1, sp-1 steps), double
// buffered so the next shard's transfer runs (on a helper thread, which alone uses `sp`
// until it is joined) while the current one is computed; partial outputs are merged by
// log-sum-exp.
//   mine: this rank's ranges; must equal plan_sequence_parallel(n_total, sp.size())[rank]
//         (every rank derives every other rank's ranges from that plan).
//   q, o: [local tokens][num_heads][head_dim]; k, v: [local tokens][num_kv_heads][head_dim],
//         fp32, packed, rows in range order (local tokens = sum of range lengths, may be 0).
//   lse:  [num_heads][local tokens] (may be null); rows with no visible key get o = 0 and
//         lse = -inf.
// Every rank of `sp` must call this with the same n_total and shapes. On failure returns
// the status and, if error is non-null, a one-line message naming rank and ring step.
Status ring_attention_cpu(comm::Communicator& sp, const TokenRanges& mine, int64_t n_total,
                          const float* q, const float* k, const float* v, float* o, float* lse,
                          int num_heads, int num_kv_heads, int head_dim, float scale,
                          std::string* error);

}  // namespace mprefill
