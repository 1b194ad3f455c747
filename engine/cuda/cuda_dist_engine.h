// Distributed prefill on GPUs: one rank per GPU, tp x sp ranks over NCCL (the GPU
// backend of engine/dist_engine.h's design, as a separate class with the same prefill
// semantics; rank r of the group is (sp_rank = r / tp, tp_rank = r % tp)).
//
//   - Tensor parallel over KV-head groups: rank t holds the contiguous KV heads
//     [t nkv/tp, (t+1) nkv/tp) and their query heads (column-parallel fused QKV), the
//     matching columns of Wo (row-parallel), FFN rows [t F/tp, ...) of gate / up and
//     columns of down; one fp32 all-reduce over the tp communicator after O and after
//     down. Embedding, norms and LM head are whole on every rank.
//   - Sequence parallel: zigzag token shards (plan_sequence_parallel); RoPE at global
//     positions; ring pass-KV over the sp communicator with two KV slots: step s sends the
//     slot holding shard (sp_rank - s) to the next rank and receives the next shard into
//     the other slot (grouped ncclSend / ncclRecv on a comm stream) while the compute
//     stream runs flash attention on the current slot (global q_pos0 / k_pos0 per range
//     pair, LSE output); the partials are merged by log-sum-exp
//     (kernels/cuda/merge.h) into an fp32 state, written once as bf16 for Wo. A shard
//     travels only as far as causally needed (skip_causal_kv).
//   - Sparse indices: from a given plan, or estimated globally across the sp ranks per
//     layer (engine/cuda/sp_estimate.h), identical on every sp rank.
//   - Random weights are drawn on the device per slice with the same (seed, element)
//     hash as CudaEngine(cfg, seed): every rank holds exactly its slices of the
//     single-GPU random model, so the two can be compared.
//
// Memory: weights slices + per prefill one set of buffers sized by the largest shard
// (no [N][ffn] or [N][vocab]).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "kv/kv_sink.h"
#include "model/model_config.h"
#include "model/parallel_plan.h"
#include "model/sparse_policy.h"
#include "model/weight_source.h"
#include "model/weights.h"
#include "engine/dist_engine.h"
#include "engine/engine.h"

namespace mprefill::gpu {

struct CudaDistOptions {
  int device = 0;             // this rank's CUDA device (the node-local rank)
  int64_t mlp_chunk = 16384;  // tokens per MLP chunk
  bool timing = false;        // CUDA-event timing of the ring (compute vs exposed wait)
  // Ring KV skipping: a shard's rows after the last query row of every rank it still
  // reaches are not sent (causally unread; 1/4 of the ring bytes at sp 2, 1/8 at sp 4).
  bool skip_causal_kv = true;
};

struct CudaDistResult {
  std::vector<float> logits;  // [vocab] of the last prompt position, on every rank
  std::vector<TokenRanges> sp_layout;
  int64_t local_tokens = 0;
  double total_ms = 0;         // host wall time of prefill() on this rank
  double ring_compute_ms = 0;  // timing: attention + merge on the compute stream
  double ring_wait_ms = 0;     // timing: compute stream stalled on a ring transfer
  double allreduce_ms = 0;     // timing: tp all-reduces (compute stream)
  // timing: ring transfers on the comm stream (from the comm stream reaching the group,
  // i.e. after its wait for the compute stream, to the group's end); the part not
  // exposed as ring_wait_ms ran hidden behind attention.
  double ring_transfer_ms = 0;
  int64_t ring_bytes_sent = 0;      // this rank
  int64_t estimate_bytes_sent = 0;  // this rank: sp estimation traffic (broadcast / reduces)
  int64_t kv_bytes_exported = 0;    // this rank
  int64_t attention_tiles = 0;      // causal 64x64 tiles this rank computed (all layers)
  double sp_imbalance = 1.0;        // max / mean over sp ranks of causal tiles
  size_t peak_device_bytes = 0;     // device memory in use after the allocations
};

class CudaDistEngine {
 public:
  // world: an NCCL communicator of tp * sp ranks on `opt.device` (clear error otherwise).
  // Random weights of cfg as CudaEngine(cfg, seed) draws them, sliced for this rank.
  CudaDistEngine(comm::Communicator* world, const ModelConfig& cfg, uint64_t seed,
                 DistTopology topo, CudaDistOptions opt = {});
  // Host weights (load_model: fp32), each rank uploading only its slices as bf16 (the
  // rounding of CudaEngine(weights)); tied embeddings when weights.lm_head is empty.
  CudaDistEngine(comm::Communicator* world, const ModelWeights& weights, DistTopology topo,
                 CudaDistOptions opt = {});
  // Weights read from model_path (as load_model() names it) slice by slice: from an HF
  // directory each rank converts only its rows / columns (plus the embedding and norms);
  // other formats are loaded whole on the host, then sliced.
  CudaDistEngine(comm::Communicator* world, const std::string& model_path, DistTopology topo,
                 CudaDistOptions opt = {});
  ~CudaDistEngine();
  CudaDistEngine(const CudaDistEngine&) = delete;
  CudaDistEngine& operator=(const CudaDistEngine&) = delete;

  // Collective: every rank passes the whole prompt. Each layer's K (after RoPE) and V of
  // this rank's (KV heads, token shard) go to sink (device bf16, [rows][heads][head_dim],
  // rows in the order of the shard's ascending ranges). Throws std::runtime_error naming
  // the rank on a bad prompt / policy or a communication failure.
  // Sparse heads (policy): A-shape by global positions. Vertical-slash and block-sparse
  // heads take their indices from `plan` when it is filled (e.g. from CudaEngine or the CPU
  // engines); without a plan they are estimated per layer globally across the sp ranks
  // (engine/cuda/sp_estimate.h: last 64 queries broadcast from their owner, global row
  // statistics, column / slash scores and pooled blocks combined over NCCL, one top-k on
  // the same arrays on every sp rank), and `estimated`, if given, receives the indices of
  // this rank's heads ([n_layers][n_heads], other ranks' heads left default). Each ring
  // step runs the sparse kernel on the visiting shard only (keys outside
  // [k_pos0, k_pos0 + n_k) are skipped), with the CSR / block index built on this GPU once
  // per layer.
  CudaDistResult prefill(const std::vector<int>& ids, const SparsePolicy& policy, KvSink* sink,
                         const PrefillPlan* plan = nullptr, PrefillPlan* estimated = nullptr);

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

  struct Impl;

 private:
  // src: host weights (null: random of seed).
  void init(const WeightSource* src, uint64_t seed);

  ModelConfig cfg_;
  DistTopology topo_;
  CudaDistOptions opt_;
  comm::Communicator* world_;
  int rank_ = 0;
  int kv0_ = 0, nkv_ = 0;
  int64_t f0_ = 0, nf_ = 0;
  size_t weight_bytes_ = 0;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mprefill::gpu
