// ONE executor contract for every prefill backend (issue 14 step 2): the worker service,
// the tools and the tests hold an `Executor` made by make_executor() and call prefill();
// which engine runs behind it (CPU DistEngine at any tp x sp, CUDA CudaBackend at any
// tp x sp) is the factory's business, and a feature a backend lacks is
// refused by check_request() with one message, before any work.
//
// Collective semantics: every rank of the group constructs its executor with the same
// spec and calls prefill() with the same request (the whole prompt on every rank); rank r
// is (sp_rank = r / tp, tp_rank = r % tp). Each rank exports the KV of its (KV heads,
// token shard) per layer to its sink (kv/kv_sink.h), then calls sink->finish().
//
// Progress and abort: `progress(layer, n_layers)` runs on every rank after each layer's KV
// went to the sink. It may throw to stop the job: the CPU backend stops at that layer (the
// caller must make every rank throw at the same layer, e.g. by agreeing over MPI); the CUDA
// backends are not exception-safe mid-prefill, so they stop calling progress, finish the
// prefill and rethrow afterwards.
//
// Result fields are the union the service, the KV-handoff issue (dtype, export time, peak
// device bytes) and the sparse-kernel issue (per-term times, tiles, estimation) report;
// a backend that does not measure a field leaves it at its default and says so in
// `measured`.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "engine/dist_engine.h"
#include "engine/engine.h"
#include "kernels/types.h"
#include "kv/kv_sink.h"
#include "model/model_config.h"
#include "model/parallel_plan.h"
#include "model/sparse_policy.h"

namespace mprefill {

enum class Backend { kCpu, kCuda };
const char* to_string(Backend b);
// "cpu" | "cuda"; throws std::invalid_argument naming the value otherwise.
Backend parse_backend(const std::string& s);

// Load-time choices, the same on every rank of the group.
struct ExecutorSpec {
  Backend backend = Backend::kCpu;
  std::string model;  // load_model() naming: HF directory, llama2.c .bin, random:NAME[:SEED]
  DistTopology topo;  // tp x sp == the group's size
  int device = 0;     // kCuda: this rank's GPU (the node-local rank)
  int comm_timeout_ms = 120000;  // bound of every collective wait of the backend
};

// What a backend can do (check_request refuses the rest with one message).
struct ExecutorCaps {
  bool audit = false;       // AuditOptions (head audit against dense attention)
  bool fixed_plan = false;  // PrefillRequest::plan (indices given by the caller)
  bool nccl_kv = false;     // the NCCL KV transport (kv/cuda/nccl_kv_sink.h) can carry its KV
  bool abort_mid_prefill = false;  // a throwing progress stops the prefill at that layer
  bool sp_layout = false;          // PrefillRequest::sp_layout other than plan_sequence_parallel's
  // PrefillRequest::tp_placement other than contiguous_tensor_parallel's (the executor
  // re-reads the attention slices of the layers whose KV heads move).
  bool any_tp_placement = false;
  // Block-sparse heads the backend can estimate (indices given in a plan need neither):
  bool adaptive_blocks = false;      // a mass threshold (HeadPattern::tau)
  bool antidiagonal_blocks = false;  // the antidiagonal block score (HeadPattern::stride)
};

struct PrefillRequest {
  const std::vector<int>* ids = nullptr;  // the whole prompt, on every rank
  const SparsePolicy* policy = nullptr;   // null: dense
  const PrefillPlan* plan = nullptr;      // fixed sparse indices (caps.fixed_plan)
  AuditOptions audit;                     // caps.audit
  LayerProgressFn progress;               // see the header comment; may be empty
  // The token ranges of every sp rank (the coordinator's plan, model/parallel_plan.h
  // check_sp_layout's rules); empty: the executor plans (zigzag). A backend without
  // caps.sp_layout runs only the zigzag layout. The sparse-aware re-balance may replace
  // the layout at run time (PrefillResult::sp_rebalanced).
  std::vector<TokenRanges> sp_layout;
  // The KV heads of every (layer, tp rank) (the coordinator's plan, model/parallel_plan.h
  // check_tp_placement's rules); empty kv_heads: the executor keeps its placement, or
  // re-places by place_kv_heads when it can. A backend without caps.any_tp_placement
  // runs only the contiguous placement.
  TpPlan tp_placement;
};

struct PrefillResult {
  std::vector<float> logits;  // [vocab] of the last prompt position, on every rank
  int64_t tokens = 0;
  bool all_dense = true;
  int heads_by_kind[4] = {};  // this rank's (layer, head) pairs per PatternKind
  // This rank's time, ms. total_ms: host wall time of prefill(); the terms are measured
  // where `measured` says so (the CUDA backends time per category only on request).
  double total_ms = 0, gemm_ms = 0, attention_ms = 0, estimate_ms = 0, kv_export_ms = 0;
  double ring_wait_ms = 0;  // exposed sequence-parallel transfer time
  bool measured = false;    // gemm / attention / estimate terms are filled
  // KV this rank exported, in the dtype the slices carried.
  DType kv_dtype = DType::kF32;
  int64_t kv_bytes_exported = 0;
  size_t peak_device_bytes = 0;  // CUDA backends: device memory in use at the peak
  // Work split (same on every rank): the layout run, whether the sparse-aware re-balance
  // replaced the requested (or zigzag) one, the measured max/mean over ranks, and the
  // predicted max/mean tiles of the layout as requested.
  std::vector<TokenRanges> sp_layout;
  bool sp_rebalanced = false;
  double sp_imbalance = 1.0, tp_imbalance = 1.0, sp_imbalance_planned = 1.0;
  TpPlan tp_placement;                 // the KV heads run per (layer, tp rank); kv_heads only
  bool tp_replaced = false;            // they moved for this prefill (attention slices re-read)
  double tp_replace_ms = 0;            // this rank's time re-reading them
  int64_t tiles_computed = 0;          // 64x64 attention tiles this rank computed (all layers)
  std::vector<HeadAuditResult> audit;  // every audited head, identical on every rank
  double audit_ms = 0;
};

class Executor {
 public:
  virtual ~Executor() = default;
  virtual const ModelConfig& config() const = 0;
  virtual DistTopology topology() const = 0;
  virtual int rank() const = 0;
  virtual Backend backend() const = 0;
  virtual ExecutorCaps caps() const = 0;
  // "cpu-dist", "cuda", "cuda-dist": which engine runs (logs, results).
  virtual const char* name() const = 0;
  // Collective; see the header comment. Throws std::runtime_error with context (rank,
  // device) on bad input, a refused feature (check_request) or a failure.
  virtual PrefillResult prefill(const PrefillRequest& req, KvSink* sink) = 0;
};

// Throws std::runtime_error "<executor>: <feature> is not supported (...)" for a request
// the executor's caps refuse, a request without ids, or an sp_layout that is not one of
// the prompt over the executor's sp ranks; the one place such refusals live.
void check_request(const Executor& e, const PrefillRequest& req);
// The policy part of check_request, for the single-process paths that drive a backend
// without an Executor (engine/single_process.h, the benches): throws std::runtime_error
// "<who>sparse policy ...: <feature> is not supported ..." when a head of policy that the
// backend would estimate on a prompt of n tokens needs an estimator caps lacks. A
// block-sparse head whose indices plan gives (may be null) is not estimated.
void check_policy(const ExecutorCaps& caps, const SparsePolicy& policy, int64_t n,
                  const PrefillPlan* plan, const std::string& who);

// Builds the executor of spec on this rank. world: the group's MPI communicator (CPU
// collectives, and the bootstrap of the NCCL communicator of a multi-rank CUDA group);
// it must outlive the executor. Throws std::runtime_error naming what is missing (a CUDA
// build, NCCL, a visible device, a topology that does not match the group or the model).
std::unique_ptr<Executor> make_executor(const ExecutorSpec& spec, comm::Communicator* world);

}  // namespace mprefill
