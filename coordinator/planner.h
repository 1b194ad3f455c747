// Pure planning and admission arithmetic of the coordinator: KV bytes of a job, the
// per-rank memory estimate of a worker group, the shard plan sent with an Assignment, and
// the KV-contract comparison that pairs worker groups with decoders.
#pragma once
#include <cstdint>
#include <string>

#include "common.pb.h"
#include "model/model_config.h"
#include "model/parallel_plan.h"
#include "model/sparse_policy.h"
#include "worker.pb.h"

namespace mprefill::coord {

namespace v1 = ::mprefill::v1;

// Bytes of one KV element; 0 for an unspecified dtype.
int dtype_bytes(v1::DType d);

// KV bytes of a prompt: 2 (K and V) * layers * kv_heads * head_dim * dtype bytes * tokens.
uint64_t kv_bytes(const v1::KvContract& kv, int64_t tokens);

// Planning estimate of the peak bytes one rank of a tp x sp group needs for a prompt of
// n tokens beyond its weights (free_memory_bytes is measured after loading them):
//   its KV share of all layers, kept until the decoder acks (kv_bytes / (tp * sp)),
// + activations of its ceil(n / sp) tokens in fp32: residual, norm output, attention
//   output and O/MLP output (4 * hidden), Q/K/V of its heads ((q_dim + 2 kv_dim) / tp) and
//   the MLP's gate/up (2 * 4 * hidden / tp, the Llama ratio when the intermediate size is
//   unknown here),
// + two ring buffers of the peer's K/V ((2 * kv_dim / tp) * ceil(n / sp) each, fp32).
uint64_t rank_bytes_estimate(const v1::KvContract& kv, int64_t n, int tp, int sp);

// The model shape carried by a fingerprint, as a ModelConfig for the planner.
ModelConfig config_of(const v1::ModelFingerprint& m);

// Token split over sp ranks (zigzag, plan_sequence_parallel) and the KV heads of every
// layer over tp ranks (place_kv_heads from the group's current placement, null: the
// contiguous one it loaded; any: the group runs any placement) for a prompt of n tokens.
// *placement (may be null) receives the KV-head placement sent. Throws
// std::runtime_error when tp does not divide the KV heads.
v1::ShardPlan make_shard_plan(const v1::ModelFingerprint& m, const SparsePolicy& policy, int64_t n,
                              int tp, int sp, const TpPlan* current = nullptr, bool any = false,
                              TpPlan* placement = nullptr);

// The policy as sent in Assignment.policy (the worker decodes it; it never loads one).
v1::SparsePolicyTable policy_table(const SparsePolicy& policy);

// Empty when the contracts are equal, else a one-line description of the first
// difference ("kv_dtype: F32 vs BF16").
std::string contract_difference(const v1::KvContract& a, const v1::KvContract& b);

// "1.50 GiB (1610612736 bytes)"
std::string format_bytes(uint64_t bytes);

// proto3 string fields must hold valid UTF-8 (the receiver's parse fails otherwise), but
// detokenized text may end inside a multi-byte character or hold raw byte tokens: each
// byte that does not start a valid sequence becomes U+FFFD.
std::string valid_utf8(const std::string& in);

}  // namespace mprefill::coord
