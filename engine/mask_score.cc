#include "engine/mask_score.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace mprefill {
namespace {

template <class W>
RowPartial row_partial_impl(const W* w, double m, const uint8_t* vis, int64_t count, const float* v,
                            int64_t v_stride, int d) {
  RowPartial p;
  p.m = m;
  const bool outputs = v != nullptr && d > 0;
  if (outputs) {
    p.o.assign(d, 0.0);
    p.o_mask.assign(d, 0.0);
  }
  for (int64_t c = 0; c < count; ++c) {
    const double x = w[c];
    const bool in = vis == nullptr || vis[c] != 0;
    p.s += x;
    if (in) p.s_mask += x;
    if (!outputs) continue;
    const float* vc = v + c * v_stride;
    for (int j = 0; j < d; ++j) {
      const double t = x * static_cast<double>(vc[j]);
      p.o[j] += t;
      if (in) p.o_mask[j] += t;
    }
  }
  return p;
}

}  // namespace

void RowPartial::merge(const RowPartial& b) {
  if (b.m == -INFINITY) return;
  if (m == -INFINITY) {
    *this = b;
    return;
  }
  const double mx = std::max(m, b.m), fa = std::exp(m - mx), fb = std::exp(b.m - mx);
  s = s * fa + b.s * fb;
  s_mask = s_mask * fa + b.s_mask * fb;
  if (o.size() != b.o.size())
    throw std::runtime_error("row partials of different head sizes cannot merge");
  for (size_t j = 0; j < o.size(); ++j) {
    o[j] = o[j] * fa + b.o[j] * fb;
    o_mask[j] = o_mask[j] * fa + b.o_mask[j] * fb;
  }
  m = mx;
}

RowPartial row_partial(const float* w, double m, const uint8_t* vis, int64_t count, const float* v,
                       int64_t v_stride, int d) {
  return row_partial_impl(w, m, vis, count, v, v_stride, d);
}
RowPartial row_partial(const double* w, double m, const uint8_t* vis, int64_t count, const float* v,
                       int64_t v_stride, int d) {
  return row_partial_impl(w, m, vis, count, v, v_stride, d);
}

void OutputError::add(const RowPartial& p) {
  for (size_t j = 0; j < p.o.size(); ++j) {
    const double od = p.s > 0 ? p.o[j] / p.s : 0.0;
    const double om = p.s_mask > 0 ? p.o_mask[j] / p.s_mask : 0.0;
    const double diff = om - od;
    sq_diff += diff * diff;
    sq_dense += od * od;
    max_diff = std::max(max_diff, std::abs(diff));
    max_dense = std::max(max_dense, std::abs(od));
  }
}

void fill_vs_block_keys(const VsIndex& ix, int64_t b, uint8_t* keys) {
  for (int64_t t = ix.range_ptr[b]; t < ix.range_ptr[b + 1]; ++t)
    std::fill(keys + ix.range_lo[t], keys + ix.range_hi[t], 1);
  for (int64_t t = ix.col_ptr[b]; t < ix.col_ptr[b + 1]; ++t) keys[ix.col[t]] = 1;
}

void fill_bs_block_keys(const std::vector<int>& blocks, int topk, int64_t n, int64_t b,
                        uint8_t* keys) {
  const int64_t m1 = std::min(n, (b + 1) * kBlock);
  for (int j = 0; j < topk; ++j) {
    const int x = blocks[b * topk + j];
    if (x < 0) continue;
    std::fill(keys + int64_t{x} * kBlock, keys + std::min(m1, (int64_t{x} + 1) * kBlock), 1);
  }
}

BlockKeys block_keys(const HeadPlan& plan, const HeadPattern& pattern, const VsIndex* vs_index,
                     int64_t n, int64_t b) {
  BlockKeys k;
  k.kind = plan.kind;
  const int64_t m1 = std::min(n, (b + 1) * kBlock);
  switch (plan.kind) {
    case PatternKind::kDense:
      break;
    case PatternKind::kAShape:
      k.n_init = pattern.a;
      k.n_local = pattern.b;
      break;
    case PatternKind::kVerticalSlash:
      if (!vs_index || vs_index->seq_len != n || vs_index->num_heads != 1)
        throw std::runtime_error(
            "block_keys: a one-head vertical-slash index of the prompt is needed");
      k.keys.assign(m1, 0);
      fill_vs_block_keys(*vs_index, b, k.keys.data());
      break;
    case PatternKind::kBlockSparse:
      if (plan.topk <= 0 || static_cast<int64_t>(plan.blocks.size()) < num_blocks(n) * plan.topk)
        throw std::runtime_error("block_keys: the block-sparse plan has no blocks for the prompt");
      k.keys.assign(m1, 0);
      fill_bs_block_keys(plan.blocks, plan.topk, n, b, k.keys.data());
      break;
  }
  return k;
}

}  // namespace mprefill
