// Online accuracy audit of a sparse prefill: for a seeded sample of heads per layer (heads
// that do not run dense) and of 64-row query blocks (the last block always), the head's
// dense causal softmax over every key <= row against the mask its kernel computed (A-shape
// rule, vertical-slash index, block-sparse blocks of the prefill's plan):
//   recall           = mean over the sampled rows of the captured softmax mass
//   output_rel_error = max |O_sparse - O_dense| / max |O_dense| over the sampled rows
// Scored with the mask scoring primitives of engine/mask_score.h (RowPartial, OutputError,
// BlockKeys), so an audit of every block equals the search's scores of the same head and mask.
//
// Cost per layer: O(K * blocks * 64 * N * d) multiply-adds (fp32 logits by the CPU GEMM,
// softmax and sums in fp64), keys in chunks of kAuditKeyChunk (memory O(64 * chunk)).
//
// Distributed form (DistEngine): a sampled row lives on one sp rank, its keys on all of
// them. The q rows of the sampled heads' blocks (K * blocks * 64 * d floats) are summed
// over the sp group (each row has exactly one non-zero writer), every sp rank scores them
// against its own key shard into RowPartials (log-sum-exp sums), the partials are
// all-gathered over sp and merged in rank order, and the per-head figures all-gathered
// over tp. Traffic per layer: O(K * blocks * 64 * d * sp) values; no K/V moves.
#pragma once
#include <cstdint>
#include <vector>

#include "model/sparse_policy.h"
#include "engine/engine.h"
#include "engine/mask_score.h"

namespace mprefill {

constexpr int64_t kAuditKeyChunk = 2048;

// Heads of a layer to audit: min(K, non-dense heads) of them, a seeded choice (same
// seed, layer, policy and n: same heads), ascending. Empty when the policy runs all dense.
std::vector<int> audit_heads(const SparsePolicy& policy, int layer, int n_heads, int64_t n,
                             const AuditOptions& opt);

// Query blocks to audit for a layer: the last block and query_blocks - 1 others (seeded),
// ascending; every block when query_blocks >= the prompt's blocks.
std::vector<int64_t> audit_blocks(int64_t n, int layer, const AuditOptions& opt);

// The sampled rows of one head and their masks.
struct AuditRows {
  int64_t n = 0;
  std::vector<int64_t> blocks;   // ascending
  std::vector<int64_t> rows;     // every row of the blocks, ascending
  std::vector<BlockKeys> masks;  // [blocks]
};
AuditRows audit_rows(const HeadPlan& plan, const HeadPattern& pattern, int64_t n,
                     const std::vector<int64_t>& blocks);

// Partial sums of the rows over a set of keys: key j at global position key_pos[j]
// (null: j), K row at k + j * kv_stride, V likewise; q: [rows][d] packed. Keys after a
// row are skipped (causal). Returns one RowPartial per row (m = -inf when no key of the
// set is <= the row).
std::vector<RowPartial> audit_partials(const AuditRows& ar, const float* q, const float* k,
                                       const float* v, int64_t kv_stride, const int64_t* key_pos,
                                       int64_t n_keys, int d, double scale);

// The figures of finished (all keys merged) partials.
HeadAuditResult audit_result(int layer, int head, const HeadPattern& pattern,
                             const std::vector<RowPartial>& rows);

// Wire form of a partial (m, s, s_mask, o[d], o_mask[d]): 3 + 2 d doubles.
void encode_partial(const RowPartial& p, int d, double* out);
RowPartial decode_partial(const double* in, int d);

}  // namespace mprefill
