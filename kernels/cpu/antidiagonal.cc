// Block-sparse estimation by antidiagonal scoring (XAttention, Xu et al. 2025), fp32 with
// fp64 block sums: strided rows of stride S, one dot of S * head_dim values per strided
// cell, so a head costs N^2 d / (2 S) multiply-adds over every query block. Definitions
// in cpu.h (antidiag_pack, AntidiagParams); selection is select_by_mass's.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/cpu.h"
#include "kernels/cpu/dot.h"
#include "kernels/cpu/parallel.h"

namespace mprefill::cpu {
namespace {

int64_t strided(int64_t rows, int s) { return (rows + s - 1) / s; }

Status check(const AntidiagParams& p) {
  if (!p.q_packed || !p.k_packed) return Status::kInvalidArgument;
  if (p.seq_len <= 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 ||
      p.num_heads % p.num_kv_heads != 0 || !valid_antidiag_stride(p.stride)) {
    return Status::kInvalidArgument;
  }
  if (p.qb0 < 0 || p.qb1 <= p.qb0 || p.qb1 > num_blocks(p.seq_len)) return Status::kInvalidArgument;
  if (!(p.scale > 0.f) || !std::isfinite(p.scale)) return Status::kInvalidArgument;
  return Status::kOk;
}

// Block mass of query block qb (qb0 <= qb < qb1) of head h into mass[0..qb]; x and acc
// are scratch. Strided row I of the block: logits over J <= I (the diagonal cell J == I
// only over its causal antidiagonal cells t <= (S - 1) / 2: the first (S + 1) / 2 slots),
// softmax, p[I][J] added to key block J / (64 / S).
void block_mass(const AntidiagParams& p, int h, int64_t qb, std::vector<float>& x,
                std::vector<double>& acc, float* mass) {
  const int s = p.stride, w = s * p.head_dim, diag_w = (s + 1) / 2 * p.head_dim;
  const int64_t per_block = kBlock / s;
  const int64_t q_rows = strided(std::min(p.seq_len, p.qb1 * kBlock) - p.qb0 * kBlock, s);
  const int64_t k_rows = strided(p.seq_len, s);
  const int group = p.num_heads / p.num_kv_heads;
  const float* qh = p.q_packed + int64_t{h} * q_rows * w;
  const float* kh = p.k_packed + int64_t{h / group} * k_rows * w;
  const float f = p.scale / static_cast<float>(s);
  const int64_t i0 = qb * per_block, i1 = strided(std::min(p.seq_len, (qb + 1) * kBlock), s);
  acc.assign(qb + 1, 0.0);
  x.resize(i1);
  for (int64_t i = i0; i < i1; ++i) {
    const float* qi = qh + (i - p.qb0 * per_block) * w;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j <= i; ++j) {
      x[j] = f * detail::dot(qi, kh + j * w, j == i ? diag_w : w);
      m = std::max(m, x[j]);
    }
    double sum = 0;
    for (int64_t j = 0; j <= i; ++j) {
      x[j] = std::exp(x[j] - m);
      sum += x[j];
    }
    const double inv = 1.0 / sum;
    for (int64_t j = 0; j <= i; ++j) acc[j / per_block] += x[j] * inv;
  }
  for (int64_t j = 0; j <= qb; ++j) mass[j] = static_cast<float>(acc[j]);
}

}  // namespace

void antidiag_pack(const float* x, int64_t row_stride, int64_t head_stride, int heads, int head_dim,
                   int64_t n_rows, int stride, bool queries, float* packed) {
  const int64_t rows = strided(n_rows, stride), w = int64_t{stride} * head_dim;
  parallel_for(int64_t{heads} * rows, 64, [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t h = item / rows, i = item % rows;
      for (int t = 0; t < stride; ++t) {
        const int64_t r =
            queries ? std::min(i * stride + stride - 1 - t, n_rows - 1) : i * stride + t;
        float* out = packed + item * w + int64_t{t} * head_dim;
        if (r < n_rows)
          std::copy_n(x + r * row_stride + h * head_stride, head_dim, out);
        else
          std::fill_n(out, head_dim, 0.f);
      }
    }
  });
}

Status antidiag_block_mass(const AntidiagParams& p, int head, int64_t qb, float* mass) {
  if (const Status s = check(p); s != Status::kOk) return s;
  if (!mass || head < 0 || head >= p.num_heads || qb < p.qb0 || qb >= p.qb1)
    return Status::kInvalidArgument;
  std::vector<float> x;
  std::vector<double> acc;
  block_mass(p, head, qb, x, acc, mass);
  return Status::kOk;
}

Status antidiag_select(const AntidiagParams& p, const int* topk, const double* tau, int k_out,
                       int* blocks) {
  if (const Status s = check(p); s != Status::kOk) return s;
  if (!topk || !blocks) return Status::kInvalidArgument;
  for (int h = 0; h < p.num_heads; ++h)
    if (topk[h] < 1 || topk[h] > k_out || (tau && !valid_tau(tau[h])))
      return Status::kInvalidArgument;
  const int64_t nq = p.qb1 - p.qb0;
  parallel_for(int64_t{p.num_heads} * nq, 1, [&](int64_t b, int64_t e) {
    std::vector<float> x, mass;
    std::vector<double> acc;
    for (int64_t item = b; item < e; ++item) {
      const int h = static_cast<int>(item / nq);
      const int64_t qb = p.qb0 + item % nq;
      mass.resize(qb + 1);
      block_mass(p, h, qb, x, acc, mass.data());
      std::vector<int> idx =
          select_by_mass(mass.data(), mass.data(), qb + 1, qb, qb + 1, topk[h], tau ? tau[h] : 0.0);
      std::sort(idx.begin(), idx.end());
      int* out = blocks + item * k_out;
      std::fill_n(out, k_out, -1);
      std::copy(idx.begin(), idx.end(), out);
    }
  });
  return Status::kOk;
}

Status block_sparse_estimate_antidiag(const BlockSparseEstimateParams& p, const int* topk,
                                      BlockSparseIndex* out, const double* tau) {
  if (!p.q || !p.k || !topk || !out || p.seq_len <= 0 || p.num_heads <= 0 || p.head_dim <= 0 ||
      p.num_kv_heads <= 0 || !valid_antidiag_stride(p.stride) || p.dtype != DType::kF32)
    return Status::kInvalidArgument;
  const int s = p.stride, d = p.head_dim;
  const int64_t rows = strided(p.seq_len, s);
  std::vector<float> qp(static_cast<size_t>(p.num_heads * rows * s * d));
  std::vector<float> kp(static_cast<size_t>(p.num_kv_heads * rows * s * d));
  antidiag_pack(static_cast<const float*>(p.q), p.q_row_stride, p.q_head_stride, p.num_heads, d,
                p.seq_len, s, true, qp.data());
  antidiag_pack(static_cast<const float*>(p.k), p.k_row_stride, p.k_head_stride, p.num_kv_heads, d,
                p.seq_len, s, false, kp.data());
  AntidiagParams a;
  a.q_packed = qp.data();
  a.k_packed = kp.data();
  a.seq_len = p.seq_len;
  a.qb0 = 0;
  a.qb1 = num_blocks(p.seq_len);
  a.num_heads = p.num_heads;
  a.num_kv_heads = p.num_kv_heads;
  a.head_dim = d;
  a.stride = s;
  a.scale = p.scale;
  const int kmax = *std::max_element(topk, topk + p.num_heads);
  out->seq_len = p.seq_len;
  out->num_heads = p.num_heads;
  out->nblocks = a.qb1;
  out->k = kmax;
  out->blocks.assign(static_cast<size_t>(p.num_heads) * a.qb1 * kmax, -1);
  return antidiag_select(a, topk, tau, kmax, out->blocks.data());
}

}  // namespace mprefill::cpu
