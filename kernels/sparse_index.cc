// Backend-independent queries on sparse indices.
#include <cstdint>

#include "kernels/sparse.h"

namespace mprefill {

int64_t vs_mask_tiles(const VsIndex& ix, int head) {
  if (head < 0 || head >= ix.num_heads) return -1;
  int64_t tiles = 0;
  for (int64_t b = 0; b < ix.nblocks; ++b) {
    const int64_t hb = head * ix.nblocks + b;
    for (int64_t t = ix.range_ptr[hb]; t < ix.range_ptr[hb + 1]; ++t)
      tiles += (ix.range_hi[t] - ix.range_lo[t] + kBlock - 1) / kBlock;
    tiles += (ix.col_ptr[hb + 1] - ix.col_ptr[hb] + kBlock - 1) / kBlock;
  }
  return tiles;
}

}  // namespace mprefill
