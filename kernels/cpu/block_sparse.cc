// Block-sparse estimation: mean-pooled 64-token blocks of Q (per query head) and K (per
// kv head), block scores scale * qpool[b] . kpool[j] for j <= b, top-k key blocks per
// query block with the diagonal forced in; ties go to the lower block. All fp32; an
// adaptive head (tau > 0) cuts that ranking where its block mass reaches tau (cpu.h).
// A stride S > 0 in the params scores by antidiagonals instead (antidiagonal.cc).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/cpu.h"
#include "kernels/cpu/dot.h"
#include "kernels/cpu/parallel.h"

namespace mprefill::cpu {
namespace {

// pooled[h][b][0..d): mean of the rows of block b (the last block may be partial).
std::vector<float> mean_pool(const float* x, int64_t row_stride, int64_t head_stride, int heads,
                             int d, int64_t n) {
  const int64_t nb = num_blocks(n);
  std::vector<float> pooled(static_cast<size_t>(heads) * nb * d, 0.f);
  parallel_for(heads * nb, 4, [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t h = item / nb, blk = item % nb;
      const int64_t r0 = blk * kBlock, r1 = std::min<int64_t>(n, r0 + kBlock);
      float* out = pooled.data() + item * d;
      for (int64_t r = r0; r < r1; ++r) {
        const float* row = x + r * row_stride + h * head_stride;
        for (int i = 0; i < d; ++i) out[i] += row[i];
      }
      const float inv = 1.f / static_cast<float>(r1 - r0);
      for (int i = 0; i < d; ++i) out[i] *= inv;
    }
  });
  return pooled;
}

}  // namespace

void block_mean_pool(const float* x, int64_t row_stride, int64_t head_stride, int heads,
                     int head_dim, int64_t n_rows, float* pooled) {
  const std::vector<float> p = mean_pool(x, row_stride, head_stride, heads, head_dim, n_rows);
  std::copy(p.begin(), p.end(), pooled);
}

Status block_sparse_select(const float* qpool, const float* kpool, int64_t seq_len, int num_heads,
                           int num_kv_heads, int head_dim, float scale, const int* topk,
                           BlockSparseIndex* out, const double* tau) {
  if (!qpool || !kpool || !topk || !out) return Status::kInvalidArgument;
  if (seq_len <= 0 || num_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 ||
      num_heads % num_kv_heads != 0) {
    return Status::kInvalidArgument;
  }
  if (!(scale > 0.f) || !std::isfinite(scale)) return Status::kInvalidArgument;
  int kmax = 0;
  for (int h = 0; h < num_heads; ++h) {
    if (topk[h] < 1 || (tau && !valid_tau(tau[h]))) return Status::kInvalidArgument;
    kmax = std::max(kmax, topk[h]);
  }
  const int d = head_dim, group = num_heads / num_kv_heads;
  const int64_t nb = num_blocks(seq_len);
  out->seq_len = seq_len;
  out->num_heads = num_heads;
  out->nblocks = nb;
  out->k = kmax;
  out->blocks.assign(static_cast<size_t>(num_heads) * nb * kmax, -1);
  parallel_for(num_heads * nb, 4, [&](int64_t b, int64_t e) {
    std::vector<float> score, mass;
    for (int64_t item = b; item < e; ++item) {
      const int h = static_cast<int>(item / nb);
      const int64_t qb = item % nb;
      const float* qv = qpool + item * d;
      const float* kv = kpool + static_cast<int64_t>(h / group) * nb * d;
      score.resize(qb + 1);
      for (int64_t j = 0; j <= qb; ++j) score[j] = scale * detail::dot(qv, kv + j * d, d);
      const double t = tau ? tau[h] : 0.0;
      if (t > 0) {
        float m = -std::numeric_limits<float>::infinity();
        for (float s : score) m = std::isnan(s) ? m : std::max(m, s);
        mass.resize(qb + 1);
        for (int64_t j = 0; j <= qb; ++j) {
          const int64_t keys = std::min<int64_t>(kBlock, seq_len - j * kBlock);
          mass[j] = std::isnan(score[j]) ? 0.f : static_cast<float>(keys) * std::exp(score[j] - m);
        }
      }
      std::vector<int> idx =
          select_by_mass(score.data(), mass.data(), qb + 1, qb, qb + 1, topk[h], t);
      std::sort(idx.begin(), idx.end());
      std::copy(idx.begin(), idx.end(), out->blocks.begin() + item * kmax);
    }
  });
  return Status::kOk;
}

Status block_sparse_estimate(const BlockSparseEstimateParams& p, const int* topk,
                             BlockSparseIndex* out, const double* tau) {
  if (!p.q || !p.k || !topk || !out) return Status::kInvalidArgument;
  if (p.seq_len <= 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 ||
      p.num_heads % p.num_kv_heads != 0) {
    return Status::kInvalidArgument;
  }
  if (p.q_head_stride < 0 || p.k_head_stride < 0 ||
      (p.seq_len > 1 && (p.q_row_stride <= 0 || p.k_row_stride <= 0))) {
    return Status::kInvalidArgument;
  }
  if (!(p.scale > 0.f) || !std::isfinite(p.scale)) return Status::kInvalidArgument;
  for (int h = 0; h < p.num_heads; ++h) {
    if (topk[h] < 1 || (tau && !valid_tau(tau[h]))) return Status::kInvalidArgument;
  }
  if (p.stride != 0 && !valid_antidiag_stride(p.stride)) return Status::kInvalidArgument;
  if (p.dtype != DType::kF32) return Status::kUnsupported;
  if (p.stride != 0) return block_sparse_estimate_antidiag(p, topk, out, tau);
  const int d = p.head_dim;
  const std::vector<float> qpool = mean_pool(static_cast<const float*>(p.q), p.q_row_stride,
                                             p.q_head_stride, p.num_heads, d, p.seq_len);
  const std::vector<float> kpool = mean_pool(static_cast<const float*>(p.k), p.k_row_stride,
                                             p.k_head_stride, p.num_kv_heads, d, p.seq_len);
  return block_sparse_select(qpool.data(), kpool.data(), p.seq_len, p.num_heads, p.num_kv_heads, d,
                             p.scale, topk, out, tau);
}

}  // namespace mprefill::cpu
