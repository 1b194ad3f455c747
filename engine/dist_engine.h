// Distributed prefill over one group of tp x sp ranks (MPI on CPU, NCCL on GPU):
// tensor parallel over KV-head groups (column-parallel QKV / gate / up, row-parallel
// O / down, one all-reduce after each), sequence parallel over zigzag token shards with
// ring pass-KV and log-sum-exp merge, vertical-slash estimation made global over the sp
// shards. Every rank of the group calls the same methods with the same arguments
// (collective); rank r of the world is (sp_rank = r / tp, tp_rank = r % tp).
//
// CPU implementation (engine/dist_engine.cc): the ring is sparse-aware
// (ring_attention_sparse_cpu: each step computes only the query blocks whose mask selects
// a tile of the visiting shard); vertical-slash and block-sparse indices are estimated
// over the sp shards and equal the single process's; the FFN rows are split evenly over
// tp; the token embedding is held whole on every rank (any id may come), the LM head is
// split by vocab rows over tp and gathered by the owner of the last position.
//
// CONTRACT (used through engine/executor.h by the worker service, worker/): keep these
// names and meanings; add fields freely.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "engine/engine.h"
#include "kv/kv_sink.h"
#include "model/parallel_plan.h"
#include "model/sparse_policy.h"

namespace mprefill {

struct DistTopology {
  int tp = 1, sp = 1;
};

// Load-time choices of a DistEngine (added by the dist helper; all have defaults).
struct DistOptions {
  // KV-head groups are placed on tp ranks at load time (each rank loads only the weight
  // slices of its groups): place_kv_heads(config, placement_policy, placement_tokens, tp),
  // which is the contiguous placement under the default all-dense policy (every group
  // costs the same), the one a coordinator assumes a group holds when it registers.
  // A prefill under another policy is still exact; tp_imbalance reports its cost.
  SparsePolicy placement_policy;
  int64_t placement_tokens = 131072;
  // Before a prefill without a given placement whose policy makes the current placement's
  // expected max/mean over tp ranks exceed tp_replace_threshold, the groups are re-placed
  // (place_kv_heads) and the changed layers' attention slices re-read. Needs the weight source: an
  // HF checkpoint (memory-mapped), or a llama2.c / random model of at most 2 GiB kept in memory;
  // larger ones keep the load-time placement.
  bool replace_heads_per_prefill = true;
  double tp_replace_threshold = 1.10;
  // The zigzag token split is replaced by a weighted one (plan_sequence_parallel_weighted)
  // when its predicted max/mean of mask tiles over sp ranks exceeds this.
  double sp_rebalance_threshold = 1.10;
};

struct DistPrefillResult {
  std::vector<float> logits;  // [vocab] of the last prompt position, on every rank
  PrefillStats stats;         // this rank's timings
  // Balance of this prefill, same on every rank: max / mean over ranks of the computed
  // 64x64 attention tiles (sp) and of the expected per-rank head cost (tp).
  double sp_imbalance = 1.0, tp_imbalance = 1.0;
  int64_t kv_bytes_exported = 0;  // by this rank

  // How the work was split (same on every rank unless noted).
  std::vector<TokenRanges> sp_layout;   // token ranges of every sp rank
  bool sp_rebalanced = false;           // the weighted split replaced the zigzag
  bool tp_replaced = false;             // the KV-head groups were re-placed for this prefill
  double tp_replace_ms = 0;             // time spent re-reading attention slices for that
  double sp_imbalance_zigzag = 1.0;     // predicted max/mean tiles of the layout started
                                        // from (the given one, else the plain zigzag)
  double sp_imbalance_predicted = 1.0;  // predicted for sp_layout (block weights below)
  double tp_imbalance_tiles = 1.0;      // measured from the computed tiles
  int64_t tiles_computed = 0;           // mask tiles this rank computed (all layers)
  double ring_compute_ms = 0, ring_wait_ms = 0;  // this rank: attention vs exposed transfer
  int64_t ring_bytes_sent = 0;                   // this rank
  // sp_imbalance and tp_imbalance_tiles are sum over layers of the max over ranks /
  // sum over layers of the mean (every layer ends in collectives, so per-layer balance is
  // what counts). Predicted figures use per-block weights: the tiles of the given plan's
  // indices when the plan is fixed, else the policy's expected tiles per block.
};

// Called on every rank after each layer (layer index, n_layers).
using LayerProgressFn = std::function<void(int layer, int n_layers)>;

class DistEngine {
 public:
  // world: the group's communicator (size == topo.tp * topo.sp; clear error otherwise);
  // model_path as in load_model(); each rank loads only its tensor-parallel slices.
  DistEngine(comm::Communicator* world, const std::string& model_path, DistTopology topo,
             EngineOptions opt = {}, DistOptions dist = {});
  // The same over a model already in memory (borrowed: w must outlive the engine). At tp 1
  // the forward reads w in place; at tp > 1 each rank copies its slices. Engine runs this
  // at tp 1 x sp 1 over the one-rank group (comm/self_comm.h).
  DistEngine(comm::Communicator* world, const ModelWeights& w, DistTopology topo,
             EngineOptions opt = {}, DistOptions dist = {});
  ~DistEngine();

  // Collective. ids: the whole prompt (every rank passes it); each rank computes its
  // shard. plan_inout as in Engine::prefill (a filled plan fixes the indices; an empty one
  // is filled with the globally estimated indices, identical on every rank). KV of each
  // layer for this rank's (kv heads, token shard) goes to sink (may be null). Throws
  // std::runtime_error naming the rank on a communication failure or timeout.
  // An enabled audit (same options on every rank) fills stats.audit with every audited
  // head of the prefill, identical on every rank (engine/audit.h: each sp rank scores the
  // sampled rows against its key shard, partials merged over sp, figures gathered over tp).
  // sp_layout (non-empty): the token ranges of every sp rank to start from (the
  // coordinator's plan; check_sp_layout's rules), in place of the zigzag; the sparse-aware
  // re-balance may still replace it (sp_rebalanced). tp_placement (non-null): the KV heads
  // of every (layer, tp rank) to run (the coordinator's plan; check_tp_placement's rules);
  // the attention slices of the layers whose heads move are re-read first (tp_replaced),
  // which needs can_replace_heads() unless nothing moves. Null: the current placement, or
  // place_kv_heads' when replace_heads_per_prefill and it is off by the threshold.
  DistPrefillResult prefill(const std::vector<int>& ids, const SparsePolicy& policy, KvSink* sink,
                            PrefillPlan* plan_inout = nullptr, const LayerProgressFn& progress = {},
                            const AuditOptions& audit = {},
                            const std::vector<TokenRanges>* sp_layout = nullptr,
                            const TpPlan* tp_placement = nullptr);

  const ModelConfig& config() const;
  DistTopology topology() const;
  int rank() const;
  int tp_rank() const;
  int sp_rank() const;
  // KV-head placement of every layer and tp rank: place_kv_heads(placement_policy) at load
  // time (the contiguous one for the dense default), then the one the last prefill ran.
  const TpPlan& placement() const;
  // True when a prefill may move KV heads between tp ranks (the weight source is kept, so
  // attention slices can be re-read; always at tp 1, where there is one placement).
  bool can_replace_heads() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mprefill
