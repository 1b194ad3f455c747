// Single-process CPU engine (fp32): prefill of every layer into a KV cache with the
// per-head sparse policy, logits of the last position, then decoding on that cache.
// The reference that the GPU executors are compared against. A prefill is the tp 1 x sp 1
// case of the distributed engine (engine/dist_engine.h) over the one-rank group
// (comm/self_comm.h), reading the weights in place: one prefill code path for every CPU
// shape. Decode steps run the same layer forward (engine/cpu_layer.h) with dense attention
// over the cache (engine/cpu_local.h).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kernels/sparse.h"
#include "kv/kv_cache.h"
#include "model/sampler.h"
#include "model/sparse_policy.h"
#include "model/weights.h"

namespace mprefill {

namespace comm {
class Communicator;
}
class DistEngine;

// Estimated sparse indices of one query head for one prompt.
struct HeadPlan {
  PatternKind kind = PatternKind::kDense;
  VsSelection vs;           // kVerticalSlash: the estimated selection
  int topk = 0;             // kBlockSparse: slots per query block
  std::vector<int> blocks;  // kBlockSparse: [nblocks][topk], ascending then -1 padded
};

// Indices of every (layer, head) of one prefill. prefill fills an empty plan and reuses
// a filled one as given (same seq_len and kinds as the policy), so tests and other
// executors can fix the indices. Heads that run dense or A-shape carry no index.
struct PrefillPlan {
  int64_t seq_len = 0;
  std::vector<std::vector<HeadPlan>> layers;  // [n_layers][n_heads]
  bool empty() const { return layers.empty(); }
};

// Online accuracy audit of a prefill (engine/audit.h): per layer, heads_per_layer heads
// that do not run dense (seeded choice) are scored on query_blocks sampled 64-row query
// blocks (the last one always) against their dense causal attention.
struct AuditOptions {
  int heads_per_layer = 0;  // 0: no audit
  int query_blocks = 4;     // sampled query blocks per head (all when >= the prompt's blocks)
  uint64_t seed = 0;
  bool enabled() const { return heads_per_layer > 0; }
  // Throws std::runtime_error naming the bad field.
  void validate() const;
};

// One audited head: recall = mean over the sampled rows of the softmax mass that the
// head's mask captures; output_rel_error = max |O_sparse - O_dense| / max |O_dense| over
// the sampled rows (O_sparse: the renormalised softmax over the mask, what the kernel
// outputs); output_rel_error_fro: the same in Frobenius norm.
struct HeadAuditResult {
  int layer = 0, head = 0;
  HeadPattern pattern;
  int64_t rows = 0;  // query rows scored
  double recall = 1.0, output_rel_error = 0.0, output_rel_error_fro = 0.0;
};

struct PrefillStats {
  int64_t tokens = 0;
  bool all_dense = true;      // the policy ran dense on every head (short prompt or "dense")
  bool plan_reused = false;   // the plan came filled in
  int heads_by_kind[4] = {};  // this rank's (layer, head) pairs per PatternKind
  double total_ms = 0, attention_ms = 0, estimate_ms = 0, gemm_ms = 0, mlp_ms = 0;
  std::vector<HeadAuditResult> audit;  // layer-major, heads ascending (AuditOptions)
  double audit_ms = 0;
};

struct EngineOptions {
  int64_t mlp_chunk = 512;  // tokens per MLP chunk (never a [N x ffn] buffer)
  // Engine::prefill calls it after each layer (progress lines); may be empty.
  std::function<void(int layer, int n_layers)> on_layer;
};

struct GenerateOptions {
  int decode_steps = 0;  // tokens decoded after the first one (from the prefill)
  SamplerOptions sampler;
  std::vector<int> stop_ids;  // generation ends after emitting one of these
  SparsePolicy policy;        // default: dense
  int64_t max_prompt = 0;     // prompt limit; 0: config.max_position
  AuditOptions audit;         // results in GenerateResult::prefill.audit
};

struct GenerateResult {
  int64_t prompt_tokens = 0;
  int first_token_id = -1;
  float first_token_logit = 0.f;
  std::vector<int> generated_ids;  // the first token, then the decoded ones
  std::vector<float> logits;       // raw logit of each chosen token at its step
  std::vector<double> logprobs;    // see SampledToken::logprob
  double ttft_ms = 0, decode_ms = 0;
  std::string stopped_by;  // "length" | "stop_id"
  PrefillStats prefill;
};

class Engine {
 public:
  explicit Engine(const ModelWeights& w, EngineOptions opt = {});
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // ids: the whole prompt (positions 0..N-1) into an empty cache of capacity >= N (fp32,
  // or bf16: rows rounded as a worker's KV export rounds them). Returns the logits of
  // position N-1 ([vocab]). plan_inout and stats may be null; an enabled audit fills
  // stats->audit (stats must then be given). Prefills of one engine run one at a time.
  std::vector<float> prefill(const std::vector<int>& ids, const SparsePolicy& policy,
                             KvCache* cache, PrefillPlan* plan_inout = nullptr,
                             PrefillStats* stats = nullptr, const AuditOptions& audit = {}) const;
  // One token at position pos == cache->n_tokens (dense attention over the cache).
  std::vector<float> decode_step(int token, int64_t pos, KvCache* cache) const;
  // Validates the prompt (non-empty, ids in range, length limit), prefills, samples.
  GenerateResult generate(const std::vector<int>& ids, const GenerateOptions& opt) const;
  // The same with another prefill (e.g. the GPU engine's): prefill(cache, stats) fills the
  // empty cache with the prompt's KV and returns the last position's logits; this engine
  // decodes the rest. opt.policy and opt.audit are the caller's to apply.
  using PrefillFn = std::function<std::vector<float>(KvCache* cache, PrefillStats* stats)>;
  GenerateResult generate_with(const std::vector<int>& ids, const GenerateOptions& opt,
                               const PrefillFn& prefill) const;
  // The checks of generate(): prompt, sampler options, decode steps.
  void check_generate(const std::vector<int>& ids, const GenerateOptions& opt) const;

  // Throws std::runtime_error for an empty prompt, an id out of [0, vocab), or a prompt
  // longer than max_prompt (config.max_position when 0).
  void check_prompt(const std::vector<int>& ids, int64_t max_prompt) const;

  const ModelWeights& weights() const { return w_; }

 private:
  const ModelWeights& w_;
  EngineOptions opt_;
  std::vector<double> inv_freq_;
  std::unique_ptr<comm::Communicator> self_;  // the one-rank group of dist_
  std::unique_ptr<DistEngine> dist_;          // tp 1 x sp 1 over w_ (prefill)
  mutable std::mutex prefill_mu_;             // dist_ runs one prefill at a time
};

}  // namespace mprefill
