// CPU reference backend: fp32 data, fp32 accumulation (estimation softmax in fp32,
// angles in double), multi-threaded over heads/rows. Readable first; every CUDA
// kernel is checked against these.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/attention.h"
#include "kernels/sparse.h"

namespace mprefill::cpu {

// Worker threads for CPU kernels (default: hardware concurrency, or MPREFILL_THREADS).
void set_num_threads(int n);
int num_threads();

// ---- attention (dtype must be kF32)
Status attention_dense(const AttentionParams& p);
Status attention_ashape(const AttentionParams& p, const AShapeParams& a);
// ix: index of the query heads of this call (heads 0..num_heads-1 map to ix heads
// head_offset..). Keys outside [k_pos0, k_pos0 + n_k) are skipped (ring steps).
Status attention_vs(const AttentionParams& p, const VsIndexView& ix, int head_offset = 0);
Status attention_block_sparse(const AttentionParams& p, const BlockSparseView& ix,
                              int head_offset = 0);
Status merge_states(const MergeParams& p);

// ---- vertical-slash estimation and index build
// Pass 1: per-row (max, sum exp(x - max)) of this shard's keys; rows with no causal key
// in the shard get (-inf, 0).
Status vs_row_stats(const VsEstimateParams& p, RowStats* out);
// Combine shard statistics in place: a <- a (+) b.
void combine_row_stats(RowStats& a, const RowStats& b);
// Pass 2: accumulate (+=) this shard's column and slash scores. col_score is
// [num_heads][n_k] (local columns), slash_score is [num_heads][seq_len].
Status vs_scores(const VsEstimateParams& p, const RowStats& global_stats, float* col_score,
                 float* slash_score);
// Top-k with forced entries and deterministic tie-breaks (lower column, smaller offset).
// col_score: [N] global column scores of one head; slash_score: [N].
// tau == 0: fixed budgets, the clamped v / s best. 0 < tau <= 1 (adaptive): columns and
// offsets each the shortest prefix of the same ranking whose share of the head's column
// (diagonal) score reaches tau (select_by_mass), the clamped budgets as caps.
VsSelection vs_select(const float* col_score, const float* slash_score, int64_t n, int v_budget,
                      int s_budget, double tau = 0);
// Single-process convenience: estimate + select for every head of a call. tau: null (all
// fixed) or [num_heads], each 0 or in (0, 1] (else kInvalidArgument).
Status vs_estimate(const VsEstimateParams& p, const int* v_budget, const int* s_budget,
                   std::vector<VsSelection>* out, const double* tau = nullptr);
// Canonical index of one or more heads' selections over global length n.
VsIndex vs_build_index(const std::vector<VsSelection>& heads, int64_t n);

// ---- block-sparse estimation: mean-pooled 64-token Q and K blocks, scores
// scale * qpool.kpool, block-causal, top-k per query block (diagonal always in, ties to
// the lower block). q/k hold all N tokens (global rows 0..N-1).
struct BlockSparseEstimateParams {
  const void* q = nullptr;
  const void* k = nullptr;
  int64_t q_row_stride = 0, q_head_stride = 0;
  int64_t k_row_stride = 0, k_head_stride = 0;
  int64_t seq_len = 0;
  int num_heads = 0, num_kv_heads = 0, head_dim = 0;
  float scale = 0.f;
  DType dtype = DType::kF32;
  int stride = 0;  // 0: the pooled score above; S > 0 (valid_antidiag_stride): antidiagonal
                   // block mass of stride S (block_sparse_estimate_antidiag), same selection
};
// tau: null or [num_heads] as for vs_estimate; an adaptive head keeps, per query block,
// the shortest prefix of its ranking (diagonal first) whose share of the block mass
// reaches tau, at most topk blocks. Block mass of key block j for query block b:
// keys(j) * exp(s_j - max_j' s_j') over j <= b, s_j the pooled score, keys(j) the block's
// tokens (64, fewer in the last block): the softmax of the pooled logits, each block
// standing for its keys.
Status block_sparse_estimate(const BlockSparseEstimateParams& p, const int* topk,
                             BlockSparseIndex* out, const double* tau = nullptr);
// The two stages of block_sparse_estimate, for estimation over sequence-parallel shards
// (64-aligned shards pool their own blocks; the pooled blocks are combined, then every
// rank selects on the same arrays):
// pooled[h][blk][0..head_dim) = mean of rows [64 blk, min(64 blk + 64, n_rows)) of x.
void block_mean_pool(const float* x, int64_t row_stride, int64_t head_stride, int heads,
                     int head_dim, int64_t n_rows, float* pooled);
// qpool [num_heads][nblocks][head_dim], kpool [num_kv_heads][nblocks][head_dim] of all
// seq_len tokens -> top-k lists (exactly what block_sparse_estimate selects).
Status block_sparse_select(const float* qpool, const float* kpool, int64_t seq_len, int num_heads,
                           int num_kv_heads, int head_dim, float scale, const int* topk,
                           BlockSparseIndex* out, const double* tau = nullptr);

// ---- block-sparse antidiagonal estimation (XAttention, Xu et al. 2025; antidiagonal.cc)
// Stride S (valid_antidiag_stride). Strided query row I of a head packs the rows
// I S + S-1, I S + S-2, ..., I S (reversed), strided key row J the rows J S, ..., J S + S-1.
// Strided logit x[I][J] = (scale / S) * sum_t q[I S + S-1-t] . k[J S + t], the mean logit
// of the antidiagonal (i + j = S - 1) of the S x S sub-block (I, J), over J <= I; the
// diagonal cell J == I sums only its causal cells (key <= row: t <= (S-1)/2). Past N, key
// rows are zero and query rows repeat row N - 1, so the last (partial) strided row still
// meets every key offset t (zero query rows would leave N mod S offsets of every key block
// unseen by the prompt's last rows; measured on a planted pattern, antidiagonal_test).
// Softmax over J <= I per strided row; block mass of (query block b, key block j) = sum of
// those probabilities over the strided rows of b and columns of j (64 / S of each; a query
// block's masses add up to its strided rows). Cost: N^2 d / (2 S) multiply-adds per head.
// Selection: per query block the ranking by mass (diagonal first), cut by select_by_mass at
// tau (adaptive) or at topk (fixed), so every query block is scored, not only the last.
//
// packed[h][I][t * head_dim + i] (I < ceil(n_rows / S)) from x[r][h][i] (row / head
// strides); queries = true packs the reversed (query) order, rows past n_rows repeating
// row n_rows - 1 (keys: zero). n_rows starts at a row that is a multiple of S (a block
// start for a shard) and, when not a multiple of S itself, ends at N.
void antidiag_pack(const float* x, int64_t row_stride, int64_t head_stride, int heads, int head_dim,
                   int64_t n_rows, int stride, bool queries, float* packed);
struct AntidiagParams {
  const float* q_packed = nullptr;  // [num_heads][q_rows][stride * head_dim]: the strided rows
                                    // of query blocks [qb0, qb1), q_rows = ceil((min(N, 64 qb1)
                                    // - 64 qb0) / S) (antidiag_pack, queries = true)
  const float* k_packed = nullptr;  // [num_kv_heads][ceil(N / S)][stride * head_dim]: every key
  int64_t seq_len = 0;              // N
  int64_t qb0 = 0, qb1 = 0;         // query blocks scored, 0 <= qb0 < qb1 <= ceil(N / 64)
  int num_heads = 0, num_kv_heads = 0, head_dim = 0;  // query head h reads kv head h / group
  int stride = 0;
  float scale = 0.f;  // the attention scale (1 / sqrt(d))
};
// mass[0..qb] of query block qb (qb0 <= qb < qb1) of head `head`.
Status antidiag_block_mass(const AntidiagParams& p, int head, int64_t qb, float* mass);
// Selected key blocks of every (head, query block of [qb0, qb1)): blocks[h][qb - qb0][k_out],
// ascending then -1 padded; topk [num_heads] each in [1, k_out]; tau null or [num_heads].
Status antidiag_select(const AntidiagParams& p, const int* topk, const double* tau, int k_out,
                       int* blocks);
// block_sparse_estimate for p.stride > 0 (called by it after its checks).
Status block_sparse_estimate_antidiag(const BlockSparseEstimateParams& p, const int* topk,
                                      BlockSparseIndex* out, const double* tau);

// ---- selection (kernels/cpu/select.cc), shared by the estimators above
// Ranking of score[0..n): entries in [forced_lo, forced_hi) first (ascending), then higher
// score, ties to the lower index, NaN last; returns the first `take` (clamped to [0, n]).
std::vector<int> rank_indices(const float* score, int64_t n, int64_t forced_lo, int64_t forced_hi,
                              int64_t take);
// Length of the shortest prefix of `order` (a ranking whose first n_forced entries are
// forced) that keeps the forced entries and whose mass, summed in order in double,
// reaches tau * total (total: the finite positive mass of all n entries, index order). It
// never takes an entry of no positive mass (nothing to gain: tau = 1 keeps the forced and
// every positive entry) and never more than order.size() (the cap).
int64_t mass_prefix(const std::vector<int>& order, int64_t n_forced, const float* mass, int64_t n,
                    double tau);
// rank_indices(score, n, forced_lo, forced_hi, cap), cut by mass_prefix when tau > 0.
// Best first. mass may equal score (vertical-slash) or differ (block-sparse).
std::vector<int> select_by_mass(const float* score, const float* mass, int64_t n, int64_t forced_lo,
                                int64_t forced_hi, int64_t cap, double tau);
// A threshold a kernel accepts: 0 (fixed budgets) or in (0, 1].
inline bool valid_tau(double tau) { return tau == 0 || (tau > 0 && tau <= 1); }

// ---- layer ops (fp32)
// y[n][out] = x[n][in] * W^T, W row-major [out][in]; bias may be null. Multi-threaded.
void gemm_xwt(const float* x, const float* w, const float* bias, float* y, int64_t n, int64_t in,
              int64_t out);
void rmsnorm(const float* x, const float* w, float* y, int64_t n, int64_t dim, float eps);
// In-place RoPE on x[t][h][d] with row stride / head stride; token t at positions[t]
// (or pos0 + t when positions is null). Angles: double(pos) * inv_freq[i] in double.
void rope(float* x, int64_t n_tokens, int num_heads, int head_dim, int64_t row_stride,
          int64_t head_stride, const int64_t* positions, int64_t pos0,
          const std::vector<double>& inv_freq, RopeStyle style);
// out[i] = silu(gate[i]) * up[i]
void swiglu(const float* gate, const float* up, float* out, int64_t n);
void embedding(const float* table, int64_t vocab, int64_t dim, const int* ids, int64_t n,
               float* out);  // ids must be < vocab (checked by the caller)
void add_inplace(float* x, const float* y, int64_t n);

}  // namespace mprefill::cpu
