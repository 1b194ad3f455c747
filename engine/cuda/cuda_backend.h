// The CUDA backend (sm90): prefill on tp x sp GPUs, one rank per GPU; one GPU is the
// tp = 1 x sp = 1 case of the same class, with no communicator and no collective.
// bf16 weights resident on the device, cuBLASLt GEMMs, the WGMMA flash / sparse attention
// kernels and the GPU index estimation, with the same per-head policy and PrefillPlan as
// the CPU backend (engine/engine.h). Decoding is not done here: each layer's KV goes to a
// KvSink (kv/kv_sink.h; device pointers, bf16) and a decoder continues from it.
//
// Rank r of a group is (sp_rank = r / tp, tp_rank = r % tp):
//   - Tensor parallel over KV-head groups: rank t holds the contiguous KV heads
//     [t nkv/tp, (t+1) nkv/tp) and their query heads (column-parallel fused QKV), the
//     matching columns of Wo (row-parallel), FFN rows [t F/tp, ...) of gate / up and
//     columns of down; one fp32 all-reduce over the tp communicator after O and after
//     down. Embedding, norms and LM head are whole on every rank.
//   - Sequence parallel: zigzag token shards (plan_sequence_parallel); RoPE at global
//     positions; ring pass-KV (comm/ring_pass.h) over the sp communicator with two KV
//     slots, the transfer on a comm stream behind the attention of the current slot; the
//     partials are merged by log-sum-exp (kernels/cuda/merge.h) into an fp32 state,
//     written once as bf16 for Wo. A shard travels only as far as causally needed
//     (CudaOptions::skip_causal_kv). At sp = 1 attention writes Wo's input directly.
//   - Sparse indices: from a given plan, else estimated: on one sp rank by the local
//     estimators, across several sp ranks globally (engine/cuda/sp_estimate.h), identical
//     on every sp rank.
//   - Random weights are drawn on the device per slice with one (seed, element) hash:
//     every rank holds exactly its slices of the single-GPU random model.
//
// Numerics: residual stream fp32; normed activations, Q/K/V, attention output and MLP
// intermediates bf16 (GEMMs accumulate in fp32). Logits of the last position only, fp32.
//
// Memory: weights are uploaded once. A prefill allocates ONE workspace up front
// (MemoryPlan; refused with the numbers before any work when it does not fit) and
// nothing afterwards but the sp estimator's scratch (sp > 1, counted in the plan): x
// [n_local][hidden] fp32, xb / q / k / v of the local rows and heads, the MLP chunk
// buffers, the estimation scratch, the sparse-index capacity and, at sp > 1, the two ring
// slots and the merge state. Never [N][ffn] or [N][vocab].
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "engine/dist_engine.h"
#include "engine/engine.h"
#include "kv/kv_sink.h"
#include "model/model_config.h"
#include "model/parallel_plan.h"
#include "model/sparse_policy.h"
#include "model/weight_source.h"
#include "model/weights.h"

namespace mprefill::gpu {

struct CudaOptions {
  int device = 0;             // this rank's CUDA device (the node-local rank)
  int64_t mlp_chunk = 16384;  // tokens per MLP chunk
  // Device memory one prefill's workspace may use; 0: what the device reports free at the
  // start of the prefill, less `reserve_bytes`.
  size_t memory_limit = 0;
  size_t reserve_bytes = size_t{512} << 20;  // left free for cuBLAS / NCCL / the context
  // Capacity of the vertical-slash CSR value arrays (ranges and gathered columns of the
  // heads of one layer that live at once): at most this many bytes, less when the
  // policy's worst case is smaller. A layer whose index is larger is refused with the
  // numbers.
  size_t vs_index_max_bytes = size_t{8} << 30;
  // Ring KV skipping (sp > 1): a shard's rows after the last query row of every rank it
  // still reaches are not sent (causally unread; 1/4 of the ring bytes at sp 2).
  bool skip_causal_kv = true;
};

// What a prefill of n tokens needs on this rank's device, in bytes.
struct MemoryPlan {
  int64_t tokens = 0;        // prompt tokens
  int64_t local_tokens = 0;  // this rank's rows
  size_t weights = 0;        // resident, already allocated
  size_t activations = 0;    // x, xb, q, k, v, ids (and the ring slots / merge state)
  size_t mlp = 0;            // chunk buffers
  size_t estimation = 0;     // scores, selections, workspaces, plan uploads
  size_t index = 0;          // CSR / block lists
  size_t gemm_workspace = 0;
  size_t workspace = 0;  // sum of the above except weights
  size_t available = 0;  // what the backend may allocate (see CudaOptions)
  bool fits = false;
  std::string describe() const;  // one line with the numbers in GiB
};

// Per-layer time by category (ms, CUDA-event timed on the compute stream).
struct LayerTimes {
  double gemm_ms = 0, attention_ms = 0, estimate_ms = 0, kv_export_ms = 0, rest_ms = 0;
  double total() const { return gemm_ms + attention_ms + estimate_ms + kv_export_ms + rest_ms; }
};

struct CudaPrefillStats {
  int64_t tokens = 0;
  bool all_dense = true;
  bool plan_reused = false;
  int heads_by_kind[4] = {};  // this rank's heads, summed over layers
  int attention_calls = 0;
  double total_ms = 0;  // host wall time of prefill(), logits on the host
  LayerTimes sum;       // over layers (only with PrefillOptions::timing)
  std::vector<LayerTimes> layers;
  double head_ms = 0;                // embedding + final norm + lm_head (timing only)
  int64_t vs_index_entries_max = 0;  // largest CSR value count of one call
  size_t peak_device_bytes = 0;      // device memory in use after the workspace allocation
  MemoryPlan memory;
  // Sequence / tensor parallel figures (this rank).
  std::vector<TokenRanges> sp_layout;
  int64_t local_tokens = 0;
  double ring_compute_ms = 0;  // timing: attention + merge on the compute stream (sp > 1)
  double ring_wait_ms = 0;     // timing: compute stream stalled on a ring transfer
  double allreduce_ms = 0;     // timing: tp all-reduces (compute stream)
  // timing: ring transfers on the comm stream (from the comm stream reaching the group to
  // the group's end); the part not exposed as ring_wait_ms ran hidden behind attention.
  double ring_transfer_ms = 0;
  int64_t ring_bytes_sent = 0;
  int64_t estimate_bytes_sent = 0;  // sp estimation traffic (broadcast / reduces)
  int64_t kv_bytes_exported = 0;
  int64_t attention_tiles = 0;  // causal 64x64 tiles this rank computed (all-dense runs)
  double sp_imbalance = 1.0;    // max / mean over sp ranks of causal tiles
};

struct PrefillOptions {
  // CUDA-event timing per category and layer (a few hundred events per layer; off for
  // production paths), and of the ring / all-reduces.
  bool timing = false;
  // With a filled plan: still run the estimation of the planned sparse heads (timed),
  // then use the plan's indices. For benchmarks with synthetic index sets.
  bool estimate_with_plan = false;
};

class CudaBackend {
 public:
  // world: null for one GPU (topo 1 x 1), else a communicator (NCCL) of tp * sp ranks on
  // opt.device. Throws std::runtime_error naming the rank on a mismatch.
  // Host fp32 weights, each rank uploading only its slices as bf16 (fused [q;k;v] and
  // [gate;up]); tied embeddings when weights.lm_head is empty.
  CudaBackend(comm::Communicator* world, const ModelWeights& weights, DistTopology topo = {},
              CudaOptions opt = {});
  // Random weights of cfg generated on the device (normal * 0.02, norm weights 1 +- 0.05,
  // deterministic in seed, the same elements for every topology), no host copy.
  CudaBackend(comm::Communicator* world, const ModelConfig& cfg, uint64_t seed,
              DistTopology topo = {}, CudaOptions opt = {});
  // Weights read from model_path (as load_model() names it) slice by slice: from an HF
  // directory each rank converts only its rows / columns (plus the embedding and norms).
  CudaBackend(comm::Communicator* world, const std::string& model_path, DistTopology topo = {},
              CudaOptions opt = {});
  ~CudaBackend();
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  const ModelConfig& config() const { return cfg_; }
  DistTopology topology() const { return topo_; }
  int rank() const { return rank_; }
  int tp_rank() const { return rank_ % topo_.tp; }
  int sp_rank() const { return rank_ / topo_.tp; }
  // KV heads [kv_begin, kv_end) and FFN rows [ffn_begin, ffn_end) of this rank.
  int kv_begin() const { return kv0_; }
  int kv_end() const { return kv0_ + nkv_; }
  int64_t ffn_begin() const { return f0_; }
  int64_t ffn_end() const { return f0_ + nf_; }
  size_t weight_bytes() const { return weight_bytes_; }
  cudaStream_t stream() const;

  // This rank's device memory for a prefill of n tokens under policy, against what is
  // free now (no collective).
  MemoryPlan plan_memory(int64_t n, const SparsePolicy& policy) const;

  // Collective over the group: every rank passes the whole prompt. Throws
  // std::runtime_error (naming the rank) before any GPU work when the prompt is invalid,
  // the policy does not fit the model or the kernels, a given plan does not match, or the
  // memory plan does not fit; and on a communication failure. Each layer's K (after RoPE)
  // and V of this rank's (KV heads, token shard) go to sink->put (device bf16,
  // [rows][heads][head_dim], rows in the order of the shard's ascending ranges, on the
  // compute stream), then sink->finish(). sink may be null. plan_inout as in
  // Engine::prefill: an empty one is filled with the estimated indices of this rank's
  // heads (downloaded: slow, for tests; other ranks' heads left default), a filled one is
  // used as given (heads of a sparse kind with no index in it are estimated). Returns
  // the logits of position N-1 ([vocab] fp32) on every rank.
  std::vector<float> prefill(const std::vector<int>& ids, const SparsePolicy& policy, KvSink* sink,
                             PrefillPlan* plan_inout = nullptr, CudaPrefillStats* stats = nullptr,
                             const PrefillOptions& popt = {});

  struct Impl;  // device state (public name for the .cc helpers)

 private:
  void init(const WeightSource* src, uint64_t seed);  // src null: random of seed

  ModelConfig cfg_;
  DistTopology topo_;
  CudaOptions opt_;
  comm::Communicator* world_ = nullptr;
  int rank_ = 0;
  int kv0_ = 0, nkv_ = 0;
  int64_t f0_ = 0, nf_ = 0;
  size_t weight_bytes_ = 0;
  std::unique_ptr<Impl> impl_;
};

// True when this process sees a CUDA device (no exception, false without a driver).
bool cuda_available();

}  // namespace mprefill::gpu
