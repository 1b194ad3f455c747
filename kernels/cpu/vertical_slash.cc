// Vertical-slash estimation (two passes, shard-composable), selection and index build.
//
// Precision: scores x = scale * q.k and probabilities p = exp(x - M) / S are fp32 (the
// fp32 softmax of the definition); the per-shard sums (sum exp in pass 1, column and
// diagonal sums of p in pass 2) are accumulated in double in a fixed order, so results
// are deterministic and independent of the thread count.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/cpu.h"
#include "kernels/cpu/dot.h"
#include "kernels/cpu/parallel.h"

namespace mprefill::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

Status check(const VsEstimateParams& p) {
  if (!p.q_last || !p.k) return Status::kInvalidArgument;
  if (p.seq_len <= 0 || p.n_last != std::min<int64_t>(kBlock, p.seq_len)) {
    return Status::kInvalidArgument;
  }
  if (p.n_k < 0 || p.k_pos0 < 0 || p.k_pos0 + p.n_k > p.seq_len) return Status::kInvalidArgument;
  if (p.num_heads <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 ||
      p.num_heads % p.num_kv_heads != 0) {
    return Status::kInvalidArgument;
  }
  if (p.q_head_stride < 0 || p.k_head_stride < 0 || (p.n_last > 1 && p.q_row_stride <= 0) ||
      (p.n_k > 1 && p.k_row_stride <= 0)) {
    return Status::kInvalidArgument;
  }
  if (!(p.scale > 0.f) || !std::isfinite(p.scale)) return Status::kInvalidArgument;
  if (p.dtype != DType::kF32) return Status::kUnsupported;
  return Status::kOk;
}

// Pointers and causal extent of estimation row i (global position r) of head h.
struct EstRow {
  const float* q;
  const float* k;  // key j of the shard at k + j * k_row_stride
  int64_t r;
  int64_t n_keys;  // causal keys of the shard: local j < n_keys
};
EstRow est_row(const VsEstimateParams& p, int h, int i) {
  const int kvh = h / (p.num_heads / p.num_kv_heads);
  EstRow e;
  e.q = static_cast<const float*>(p.q_last) + i * p.q_row_stride + h * p.q_head_stride;
  e.k = static_cast<const float*>(p.k) + kvh * p.k_head_stride;
  e.r = p.seq_len - p.n_last + i;
  e.n_keys = std::clamp<int64_t>(e.r - p.k_pos0 + 1, 0, p.n_k);
  return e;
}

}  // namespace

Status vs_row_stats(const VsEstimateParams& p, RowStats* out) {
  if (!out) return Status::kInvalidArgument;
  if (const Status s = check(p); s != Status::kOk) return s;
  const int64_t rows = static_cast<int64_t>(p.num_heads) * p.n_last;
  out->max.assign(rows, kNegInf);
  out->sum.assign(rows, 0.f);
  parallel_for(rows, 4, [&](int64_t b, int64_t e) {
    std::vector<float> x(p.n_k);
    for (int64_t item = b; item < e; ++item) {
      const EstRow row = est_row(p, static_cast<int>(item / p.n_last), item % p.n_last);
      if (row.n_keys == 0) continue;  // (-inf, 0)
      float m = kNegInf;
      for (int64_t j = 0; j < row.n_keys; ++j) {
        x[j] = p.scale * detail::dot(row.q, row.k + j * p.k_row_stride, p.head_dim);
        m = std::max(m, x[j]);
      }
      double s = 0.0;
      for (int64_t j = 0; j < row.n_keys; ++j) s += std::exp(x[j] - m);
      out->max[item] = m;
      out->sum[item] = static_cast<float>(s);
    }
  });
  return Status::kOk;
}

// Precondition: a and b describe the same rows (or a is empty, then a <- b). On a size
// mismatch a is cleared, so that a following vs_scores reports kInvalidArgument.
void combine_row_stats(RowStats& a, const RowStats& b) {
  if (a.max.empty() && a.sum.empty()) {
    a = b;
    return;
  }
  if (a.max.size() != b.max.size() || a.sum.size() != a.max.size() ||
      b.sum.size() != b.max.size()) {
    a.max.clear();
    a.sum.clear();
    return;
  }
  for (size_t i = 0; i < a.max.size(); ++i) {
    const float m = std::max(a.max[i], b.max[i]);
    if (m == kNegInf) continue;  // both empty: stays (-inf, 0)
    const double s = a.sum[i] * std::exp(static_cast<double>(a.max[i]) - m) +
                     b.sum[i] * std::exp(static_cast<double>(b.max[i]) - m);
    a.max[i] = m;
    a.sum[i] = static_cast<float>(s);
  }
}

Status vs_scores(const VsEstimateParams& p, const RowStats& stats, float* col_score,
                 float* slash_score) {
  if (const Status s = check(p); s != Status::kOk) return s;
  const size_t rows = static_cast<size_t>(p.num_heads) * p.n_last;
  if (stats.max.size() != rows || stats.sum.size() != rows || !slash_score ||
      (p.n_k > 0 && !col_score)) {
    return Status::kInvalidArgument;
  }
  if (p.n_k == 0) return Status::kOk;
  // Offsets d = r - c this shard can produce: [d_lo, d_hi].
  const int64_t r_first = p.seq_len - p.n_last, r_last = p.seq_len - 1;
  const int64_t d_lo = std::max<int64_t>(0, r_first - (p.k_pos0 + p.n_k - 1));
  const int64_t d_hi = r_last - p.k_pos0;
  if (d_hi < 0) return Status::kOk;  // the shard lies after every estimation row
  parallel_for(p.num_heads, 1, [&](int64_t hb, int64_t he) {
    std::vector<double> col(p.n_k), slash(d_hi - d_lo + 1);
    for (int64_t h = hb; h < he; ++h) {
      std::fill(col.begin(), col.end(), 0.0);
      std::fill(slash.begin(), slash.end(), 0.0);
      for (int i = 0; i < p.n_last; ++i) {
        const EstRow row = est_row(p, static_cast<int>(h), i);
        const float m = stats.max[h * p.n_last + i], s = stats.sum[h * p.n_last + i];
        if (row.n_keys == 0 || m == kNegInf || !(s > 0.f)) continue;
        const float inv_s = 1.f / s;
        // d = r - (k_pos0 + j); slash index d - d_lo.
        double* sl = slash.data() + (row.r - p.k_pos0 - d_lo);
        for (int64_t j = 0; j < row.n_keys; ++j) {
          const float x = p.scale * detail::dot(row.q, row.k + j * p.k_row_stride, p.head_dim);
          const float prob = std::exp(x - m) * inv_s;
          col[j] += prob;
          *(sl - j) += prob;
        }
      }
      float* cs = col_score + h * p.n_k;
      for (int64_t j = 0; j < p.n_k; ++j) cs[j] += static_cast<float>(col[j]);
      float* ss = slash_score + h * p.seq_len;
      for (int64_t d = d_lo; d <= d_hi; ++d) ss[d] += static_cast<float>(slash[d - d_lo]);
    }
  });
  return Status::kOk;
}

VsSelection vs_select(const float* col_score, const float* slash_score, int64_t n, int v_budget,
                      int s_budget, double tau) {
  VsSelection sel;
  if (n <= 0 || !col_score || !slash_score) return sel;
  sel.columns = select_by_mass(col_score, col_score, n, 0, kForcedColumns,
                               clamp_vertical_budget(v_budget, n), tau);
  std::sort(sel.columns.begin(), sel.columns.end());
  sel.offsets = select_by_mass(slash_score, slash_score, n, 0, kForcedOffsets,
                               clamp_slash_budget(s_budget, n), tau);
  std::sort(sel.offsets.begin(), sel.offsets.end(), std::greater<int>());
  return sel;
}

Status vs_estimate(const VsEstimateParams& p, const int* v_budget, const int* s_budget,
                   std::vector<VsSelection>* out, const double* tau) {
  if (!v_budget || !s_budget || !out) return Status::kInvalidArgument;
  for (int h = 0; tau && h < p.num_heads; ++h) {
    if (!valid_tau(tau[h])) return Status::kInvalidArgument;
  }
  if (const Status s = check(p); s != Status::kOk) return s;
  if (p.k_pos0 != 0 || p.n_k != p.seq_len) return Status::kInvalidArgument;  // all keys needed
  RowStats stats;
  if (const Status s = vs_row_stats(p, &stats); s != Status::kOk) return s;
  std::vector<float> col(static_cast<size_t>(p.num_heads) * p.seq_len, 0.f);
  std::vector<float> slash(col.size(), 0.f);
  if (const Status s = vs_scores(p, stats, col.data(), slash.data()); s != Status::kOk) return s;
  out->assign(p.num_heads, {});
  parallel_for(p.num_heads, 1, [&](int64_t b, int64_t e) {
    for (int64_t h = b; h < e; ++h) {
      (*out)[h] = vs_select(col.data() + h * p.seq_len, slash.data() + h * p.seq_len, p.seq_len,
                            v_budget[h], s_budget[h], tau ? tau[h] : 0.0);
    }
  });
  return Status::kOk;
}

// Per head and block b (m1 = min(64 b + 64, N)): windows [max(m1 - d, 64) - 64,
// max(m1 - d, 64)) clipped to [0, m1) for every offset d < m1, merged while they overlap
// or touch; then the vertical columns c < m1 outside every range. Input order and
// duplicates do not matter (the selection is sorted and de-duplicated first); values
// outside [0, n) are ignored.
VsIndex vs_build_index(const std::vector<VsSelection>& heads, int64_t n) {
  VsIndex ix;
  ix.seq_len = std::max<int64_t>(n, 0);
  ix.num_heads = static_cast<int>(heads.size());
  ix.nblocks = num_blocks(ix.seq_len);
  ix.range_ptr.assign(1, 0);
  ix.col_ptr.assign(1, 0);
  for (const VsSelection& sel : heads) {
    std::vector<int> cols, offs;
    for (int c : sel.columns) {
      if (c >= 0 && c < n) cols.push_back(c);
    }
    for (int d : sel.offsets) {
      if (d >= 0 && d < n) offs.push_back(d);
    }
    std::sort(cols.begin(), cols.end());
    cols.erase(std::unique(cols.begin(), cols.end()), cols.end());
    // Descending offsets give windows in ascending order of lo.
    std::sort(offs.begin(), offs.end(), std::greater<int>());
    offs.erase(std::unique(offs.begin(), offs.end()), offs.end());
    for (int64_t b = 0; b < ix.nblocks; ++b) {
      const int64_t m1 = std::min<int64_t>(kBlock * (b + 1), n);
      const size_t first_range = ix.range_lo.size();
      for (int d : offs) {
        if (d >= m1) continue;
        const int64_t e = std::max<int64_t>(m1 - d, kBlock);
        const int lo = static_cast<int>(e - kBlock), hi = static_cast<int>(std::min(e, m1));
        if (ix.range_lo.size() > first_range && lo <= ix.range_hi.back()) {
          ix.range_hi.back() = std::max(ix.range_hi.back(), hi);
        } else {
          ix.range_lo.push_back(lo);
          ix.range_hi.push_back(hi);
        }
      }
      size_t rt = first_range;
      for (int c : cols) {
        if (c >= m1) break;
        while (rt < ix.range_lo.size() && ix.range_hi[rt] <= c) ++rt;
        if (rt < ix.range_lo.size() && ix.range_lo[rt] <= c) continue;  // inside a range
        ix.col.push_back(c);
      }
      ix.range_ptr.push_back(static_cast<int64_t>(ix.range_lo.size()));
      ix.col_ptr.push_back(static_cast<int64_t>(ix.col.size()));
    }
  }
  return ix;
}

}  // namespace mprefill::cpu
