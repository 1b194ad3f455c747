// Log-sum-exp merge of two partial attention states over disjoint key sets:
//   lse = log(exp(lse_a) + exp(lse_b)),
//   o   = (exp(lse_a - lse) o_a + exp(lse_b - lse) o_b).
// An empty side (lse = -inf) contributes nothing; two empty sides give o = 0, lse = -inf.
#include <algorithm>
#include <cmath>

#include "kernels/cpu/cpu.h"
#include "kernels/cpu/parallel.h"

namespace mprefill::cpu {

Status merge_states(const MergeParams& p) {
  if (!p.o_a || !p.lse_a || !p.o_b || !p.lse_b) return Status::kInvalidArgument;
  if (p.n < 0 || p.num_heads <= 0 || p.head_dim <= 0 || p.lse_head_stride < p.n ||
      p.head_stride < 0 || (p.n > 1 && p.row_stride <= 0)) {
    return Status::kInvalidArgument;
  }
  const int d = p.head_dim;
  parallel_for(static_cast<int64_t>(p.num_heads) * p.n, 256, [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t h = item / p.n, i = item % p.n;
      float* oa = p.o_a + i * p.row_stride + h * p.head_stride;
      const float* ob = p.o_b + i * p.row_stride + h * p.head_stride;
      float& la = p.lse_a[h * p.lse_head_stride + i];
      const float lb = p.lse_b[h * p.lse_head_stride + i];
      if (std::isinf(lb) && lb < 0) continue;  // b empty: a unchanged
      if (std::isinf(la) && la < 0) {          // a empty: take b
        std::copy(ob, ob + d, oa);
        la = lb;
        continue;
      }
      const float m = std::max(la, lb);
      const float wa = std::exp(la - m), wb = std::exp(lb - m);  // one of them is 1
      const float sum = wa + wb;
      const float ca = wa / sum, cb = wb / sum;
      for (int t = 0; t < d; ++t) oa[t] = ca * oa[t] + cb * ob[t];
      la = m + std::log(sum);
    }
  });
  return Status::kOk;
}

}  // namespace mprefill::cpu
