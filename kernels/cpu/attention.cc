// CPU reference attention: dense, A-shape, vertical-slash and block-sparse masks.
//
// Every variant runs the same row kernel (RowAttention): the mask enumerates the
// visible keys of one query row as local key indices, and the row kernel scores them in
// chunks of kChunk keys with an fp32 online softmax (running max m, running sum l,
// running output acc; each chunk is summed separately and then added, which keeps the
// fp32 rounding error small for long rows). Sparse variants iterate over their index
// only, so the cost follows the mask, never N^2.
//
// Threading: work items are (query head, chunk of kRowsPerItem rows), handed out by
// parallel_for; every item writes disjoint output rows.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/cpu.h"
#include "kernels/cpu/dot.h"
#include "kernels/cpu/parallel.h"

namespace mprefill::cpu {
namespace {

constexpr int kChunk = 128;       // keys scored per online-softmax step
constexpr int kRowsPerItem = 16;  // query rows per parallel work item
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Online-softmax state of one query row. Keys are local indices j in [0, n_k) of the
// call's K/V; each key must be added at most once.
class RowAttention {
 public:
  explicit RowAttention(const AttentionParams& p)
      : p_(p), acc_(p.head_dim), chunk_acc_(p.head_dim), score_(kChunk), idx_(kChunk) {}

  // Starts a row: q points at its head_dim values, kvh is its kv head.
  void begin(const float* q, int kvh) {
    q_ = q;
    k_ = static_cast<const float*>(p_.k) + static_cast<int64_t>(kvh) * p_.k_head_stride;
    v_ = static_cast<const float*>(p_.v) + static_cast<int64_t>(kvh) * p_.v_head_stride;
    m_ = kNegInf;
    l_ = 0.f;
    n_ = 0;
    std::fill(acc_.begin(), acc_.end(), 0.f);
  }
  void add_range(int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) add_key(j);
  }
  void add_key(int64_t j) {
    idx_[n_++] = j;
    if (n_ == kChunk) flush();
  }
  // Writes o (head_dim values) and *lse; a row without keys gives o = 0, lse = -inf.
  void finish(float* o, float* lse) {
    flush();
    const int d = p_.head_dim;
    if (l_ == 0.f) {
      std::fill(o, o + d, 0.f);
      if (lse) *lse = kNegInf;
      return;
    }
    const float inv = 1.f / l_;
    for (int i = 0; i < d; ++i) o[i] = acc_[i] * inv;
    if (lse) *lse = m_ + std::log(l_);
  }

 private:
  void flush() {
    if (n_ == 0) return;
    const int d = p_.head_dim;
    float cmax = kNegInf;
    for (int t = 0; t < n_; ++t) {
      score_[t] = p_.scale * detail::dot(q_, k_ + idx_[t] * p_.k_row_stride, d);
      cmax = std::max(cmax, score_[t]);
    }
    const float m_new = std::max(m_, cmax);
    const float alpha = std::exp(m_ - m_new);  // 0 while the row was empty (m_ = -inf)
    std::fill(chunk_acc_.begin(), chunk_acc_.end(), 0.f);
    float chunk_l = 0.f;
    for (int t = 0; t < n_; ++t) {
      const float w = std::exp(score_[t] - m_new);
      chunk_l += w;
      const float* v = v_ + idx_[t] * p_.v_row_stride;
      for (int i = 0; i < d; ++i) chunk_acc_[i] += w * v[i];
    }
    for (int i = 0; i < d; ++i) acc_[i] = acc_[i] * alpha + chunk_acc_[i];
    l_ = l_ * alpha + chunk_l;
    m_ = m_new;
    n_ = 0;
  }

  const AttentionParams& p_;
  const float* q_ = nullptr;
  const float* k_ = nullptr;
  const float* v_ = nullptr;
  float m_ = kNegInf, l_ = 0.f;
  std::vector<float> acc_, chunk_acc_, score_;
  std::vector<int64_t> idx_;
  int n_ = 0;
};

// Local key range of the global key range [lo, hi) intersected with the shard and with
// keys <= r (causal); empty ranges come back as lo >= hi.
struct LocalRange {
  int64_t lo, hi;
};
inline LocalRange clip_to_shard(const AttentionParams& p, int64_t lo, int64_t hi, int64_t r) {
  lo = std::max(lo, p.k_pos0);
  hi = std::min({hi, p.k_pos0 + p.n_k, r + 1});
  return {lo - p.k_pos0, hi - p.k_pos0};
}

// Runs keys_of(rows, h, i, r) for every (query head h, row i) of the call, where r is
// the global query position; keys_of adds the row's visible keys to `rows`.
template <typename KeysOf>
void run_rows(const AttentionParams& p, KeysOf keys_of) {
  const int64_t row_items = (p.n_q + kRowsPerItem - 1) / kRowsPerItem;
  const int group = p.num_heads / p.num_kv_heads;
  parallel_for(static_cast<int64_t>(p.num_heads) * row_items, 1, [&](int64_t b, int64_t e) {
    RowAttention row(p);
    for (int64_t item = b; item < e; ++item) {
      const int h = static_cast<int>(item / row_items);
      const int64_t i0 = (item % row_items) * kRowsPerItem;
      const int64_t i1 = std::min<int64_t>(p.n_q, i0 + kRowsPerItem);
      for (int64_t i = i0; i < i1; ++i) {
        const float* q = static_cast<const float*>(p.q) + i * p.q_row_stride + h * p.q_head_stride;
        float* o = static_cast<float*>(p.o) + i * p.o_row_stride + h * p.o_head_stride;
        float* lse = p.lse ? p.lse + h * p.lse_head_stride + i : nullptr;
        row.begin(q, h / group);
        keys_of(row, h, i, p.q_pos0 + i);
        row.finish(o, lse);
      }
    }
  });
}

Status check_common(const AttentionParams& p, bool sparse) {
  if (const Status s = validate(p); s != Status::kOk) return s;
  if (sparse && !p.causal) return Status::kInvalidArgument;
  if (p.dtype != DType::kF32) return Status::kUnsupported;
  return Status::kOk;
}

// Structural check of the index of heads [h0, h0 + nh) (so that every key is added at
// most once): per block, ranges non-empty, inside [0, N), ascending and disjoint; columns
// strictly ascending, inside [0, N) and outside every range.
Status check_vs_index(const VsIndexView& ix, int h0, int nh) {
  if (ix.seq_len <= 0 || ix.nblocks != num_blocks(ix.seq_len) || h0 < 0) {
    return Status::kInvalidArgument;
  }
  if (!ix.range_ptr || !ix.col_ptr) return Status::kInvalidArgument;
  const int64_t b0 = h0 * ix.nblocks, b1 = (h0 + nh) * ix.nblocks;
  for (int64_t hb = b0; hb < b1; ++hb) {
    const int64_t r0 = ix.range_ptr[hb], r1 = ix.range_ptr[hb + 1];
    const int64_t c0 = ix.col_ptr[hb], c1 = ix.col_ptr[hb + 1];
    if (r0 < 0 || r1 < r0 || c0 < 0 || c1 < c0) return Status::kInvalidArgument;
    if ((r1 > r0 && (!ix.range_lo || !ix.range_hi)) || (c1 > c0 && !ix.col)) {
      return Status::kInvalidArgument;
    }
    int64_t prev_hi = 0;
    for (int64_t t = r0; t < r1; ++t) {
      if (ix.range_lo[t] < prev_hi || ix.range_hi[t] <= ix.range_lo[t] ||
          ix.range_hi[t] > ix.seq_len) {
        return Status::kInvalidArgument;
      }
      prev_hi = ix.range_hi[t];
    }
    int64_t prev_col = -1, rt = r0;
    for (int64_t t = c0; t < c1; ++t) {
      const int c = ix.col[t];
      if (c <= prev_col || c >= ix.seq_len) return Status::kInvalidArgument;
      while (rt < r1 && ix.range_hi[rt] <= c) ++rt;
      if (rt < r1 && ix.range_lo[rt] <= c) return Status::kInvalidArgument;  // inside a range
      prev_col = c;
    }
  }
  return Status::kOk;
}

}  // namespace

Status attention_dense(const AttentionParams& p) {
  if (const Status s = check_common(p, false); s != Status::kOk) return s;
  run_rows(p, [&](RowAttention& row, int, int64_t, int64_t r) {
    if (p.causal) {
      const LocalRange lr = clip_to_shard(p, p.k_pos0, p.k_pos0 + p.n_k, r);
      row.add_range(lr.lo, lr.hi);
    } else {
      row.add_range(0, p.n_k);
    }
  });
  return Status::kOk;
}

Status attention_ashape(const AttentionParams& p, const AShapeParams& a) {
  if (const Status s = check_common(p, true); s != Status::kOk) return s;
  if (!a.n_init || !a.n_local) return Status::kInvalidArgument;
  for (int h = 0; h < p.num_heads; ++h) {
    if (a.n_init[h] < 0 || a.n_local[h] < 0) return Status::kInvalidArgument;
  }
  run_rows(p, [&](RowAttention& row, int h, int64_t, int64_t r) {
    // Global key set: [0, n_init) and [r - n_local + 1, r], both causal.
    const int64_t init_hi = a.n_init[h];
    const int64_t local_lo = std::max<int64_t>(0, r - a.n_local[h] + 1);
    if (a.n_local[h] > 0 && local_lo <= init_hi) {  // overlapping or touching: one range
      const LocalRange lr = clip_to_shard(p, 0, r + 1, r);
      row.add_range(lr.lo, lr.hi);
      return;
    }
    const LocalRange init = clip_to_shard(p, 0, init_hi, r);
    row.add_range(init.lo, init.hi);
    if (a.n_local[h] > 0) {
      const LocalRange local = clip_to_shard(p, local_lo, r + 1, r);
      row.add_range(local.lo, local.hi);
    }
  });
  return Status::kOk;
}

// check_vs_index guarantees ranges and columns are disjoint, so each visible key is added
// exactly once.
Status attention_vs(const AttentionParams& p, const VsIndexView& ix, int head_offset) {
  if (const Status s = check_common(p, true); s != Status::kOk) return s;
  if (const Status s = check_vs_index(ix, head_offset, p.num_heads); s != Status::kOk) return s;
  if (p.q_pos0 + p.n_q > ix.seq_len) return Status::kInvalidArgument;  // rows outside the mask
  run_rows(p, [&](RowAttention& row, int h, int64_t, int64_t r) {
    const int64_t hb = (head_offset + h) * ix.nblocks + r / kBlock;
    for (int64_t t = ix.range_ptr[hb]; t < ix.range_ptr[hb + 1]; ++t) {
      const LocalRange lr = clip_to_shard(p, ix.range_lo[t], ix.range_hi[t], r);
      row.add_range(lr.lo, lr.hi);
    }
    const int64_t k_end = std::min(p.k_pos0 + p.n_k, r + 1);
    for (int64_t t = ix.col_ptr[hb]; t < ix.col_ptr[hb + 1]; ++t) {
      const int64_t c = ix.col[t];
      if (c >= p.k_pos0 && c < k_end) row.add_key(c - p.k_pos0);
    }
  });
  return Status::kOk;
}

Status attention_block_sparse(const AttentionParams& p, const BlockSparseView& ix,
                              int head_offset) {
  if (const Status s = check_common(p, true); s != Status::kOk) return s;
  if (ix.seq_len <= 0 || ix.nblocks != num_blocks(ix.seq_len) || ix.k < 0 || head_offset < 0 ||
      (ix.k > 0 && !ix.blocks)) {
    return Status::kInvalidArgument;
  }
  if (p.q_pos0 + p.n_q > ix.seq_len) return Status::kInvalidArgument;
  // Each list: strictly ascending block ids in [0, nblocks), then only -1 padding (so no
  // key is added twice).
  for (int64_t hb = static_cast<int64_t>(head_offset) * ix.nblocks;
       hb < static_cast<int64_t>(head_offset + p.num_heads) * ix.nblocks; ++hb) {
    const int* list = ix.blocks + hb * ix.k;
    int prev = -1;
    bool padding = false;
    for (int t = 0; t < ix.k; ++t) {
      if (list[t] == -1) {
        padding = true;
      } else if (padding || list[t] <= prev || list[t] >= ix.nblocks) {
        return Status::kInvalidArgument;
      } else {
        prev = list[t];
      }
    }
  }
  run_rows(p, [&](RowAttention& row, int h, int64_t, int64_t r) {
    const int* list = ix.blocks + ((head_offset + h) * ix.nblocks + r / kBlock) * ix.k;
    for (int t = 0; t < ix.k; ++t) {
      if (list[t] < 0) break;  // padding
      const int64_t lo = static_cast<int64_t>(list[t]) * kBlock;
      const LocalRange lr = clip_to_shard(p, lo, lo + kBlock, r);
      row.add_range(lr.lo, lr.hi);
    }
  });
  return Status::kOk;
}

}  // namespace mprefill::cpu
