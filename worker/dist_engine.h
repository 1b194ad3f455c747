// Distributed prefill over one group of tp x sp ranks (MPI on CPU, NCCL on GPU):
// tensor parallel over KV-head groups (column-parallel QKV / gate / up, row-parallel
// O / down, one all-reduce after each), sequence parallel over zigzag token shards with
// ring pass-KV and log-sum-exp merge, vertical-slash estimation made global over the sp
// shards. Every rank of the group calls the same methods with the same arguments
// (collective); rank r of the world is (sp_rank = r / tp, tp_rank = r % tp).
//
// CONTRACT (used by the worker service loop, tools/mprefill_worker_main.cc): keep these
// names and meanings; add fields freely.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "worker/engine.h"
#include "worker/kv_sink.h"
#include "worker/parallel_plan.h"
#include "worker/sparse_policy.h"

namespace mprefill {

struct DistTopology {
  int tp = 1, sp = 1;
};

struct DistPrefillResult {
  std::vector<float> logits;  // [vocab] of the last prompt position, on every rank
  PrefillStats stats;         // this rank's timings
  // Balance of this prefill, same on every rank: max / mean over ranks of the computed
  // 64x64 attention tiles (sp) and of the expected per-rank head cost (tp).
  double sp_imbalance = 1.0, tp_imbalance = 1.0;
  int64_t kv_bytes_exported = 0;  // by this rank
};

// Called on every rank after each layer (layer index, n_layers).
using LayerProgressFn = std::function<void(int layer, int n_layers)>;

class DistEngine {
 public:
  // world: the group's communicator (size == topo.tp * topo.sp; clear error otherwise);
  // model_path as in load_model(); each rank loads only its tensor-parallel slices.
  DistEngine(comm::Communicator* world, const std::string& model_path, DistTopology topo,
             EngineOptions opt = {});
  ~DistEngine();

  // Collective. ids: the whole prompt (every rank passes it); each rank computes its
  // shard. plan_inout as in Engine::prefill (a filled plan fixes the indices; an empty one
  // is filled with the globally estimated indices, identical on every rank). KV of each
  // layer for this rank's (kv heads, token shard) goes to sink (may be null). Throws
  // std::runtime_error naming the rank on a communication failure or timeout.
  DistPrefillResult prefill(const std::vector<int>& ids, const SparsePolicy& policy, KvSink* sink,
                            PrefillPlan* plan_inout = nullptr,
                            const LayerProgressFn& progress = {});

  const ModelConfig& config() const;
  DistTopology topology() const;
  int rank() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mprefill
