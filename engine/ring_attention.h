// Sequence-parallel ring attention on CPU ranks (dense causal, fp32): each sp rank holds
// the query rows and K/V of its zigzag token ranges (plan_sequence_parallel); K/V shards
// travel round the ring and the partial outputs are merged by log-sum-exp, so the result
// equals single-process causal attention over all n_total tokens.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "engine/engine.h"
#include "kernels/sparse.h"
#include "kernels/status.h"
#include "model/parallel_plan.h"
#include "model/sparse_policy.h"

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

// The mask of one query head of a sparse ring (global positions, sparse.h definitions).
struct HeadMask {
  PatternKind kind = PatternKind::kDense;
  int n_init = 0, n_local = 0;  // kAShape
  VsIndexView vs;               // kVerticalSlash: index holding this head ...
  int vs_head = 0;              // ... as head vs_head
  BlockSparseView bs;           // kBlockSparse: list of this head ...
  int bs_head = 0;              // ... as head bs_head
};

// 64x64 tiles the mask selects for query block qb among the keys [kb, ke) (kb, ke on
// 64-token block edges or ke == N). Counted as in vs_mask_tiles: dense, A-shape and
// block-sparse count the key blocks touched; vertical-slash counts each range in
// 64-column pieces plus the gathered vertical columns 64 at a time. Zero means the
// ring step skips the block.
int64_t mask_tiles(const HeadMask& m, int64_t qb, int64_t kb, int64_t ke, int64_t n_total);

struct RingStats {
  int64_t tiles = 0;      // mask tiles computed by this rank (all steps, all heads)
  double compute_ms = 0;  // attention + merge
  double wait_ms = 0;     // waiting for a transfer after the step's compute (exposed)
  int64_t bytes_sent = 0;
};

// Expected 64x64 tiles of query block b of an n-token prompt under a head pattern (the
// planning weights of the sp layout, as expected_tiles per block).
double expected_block_tiles(const HeadPattern& p, int64_t b, int64_t n);

// The masks of a set of heads with their index storage (vertical-slash indices built
// here from each head's selection; block-sparse lists stay in the plans, which must
// outlive the set).
struct HeadMaskSet {
  std::vector<HeadMask> masks;
  std::vector<VsIndex> vs;  // one per vertical-slash head (stable: reserved up front)

  void build(const std::vector<const HeadPlan*>& plans, const std::vector<HeadPattern>& pats,
             int64_t n);
};

// Sparse-aware ring attention: like ring_attention_cpu, for any layout of 64-aligned
// token ranges (layout[i]: rank i's ranges, together covering [0, n_total) once; every
// rank passes the same layout) and one mask per query head (masks[h], h < num_heads).
// At each step a head computes only the runs of its query blocks whose mask selects a
// tile of the visiting KV shard, and merges those rows by log-sum-exp.
Status ring_attention_sparse_cpu(comm::Communicator& sp, const std::vector<TokenRanges>& layout,
                                 int64_t n_total, const float* q, const float* k, const float* v,
                                 float* o, float* lse, int num_heads, int num_kv_heads,
                                 int head_dim, float scale, const HeadMask* masks, RingStats* stats,
                                 std::string* error);

}  // namespace mprefill
