// Exact top-k of vertical and slash scores (kernels/cuda/index/index.h).
//
// Segments: s < H are the column scores of head s, s >= H the slash scores of head
// s - H. Each element gets a 32-bit key (score_key; forced entries kForcedKey); the
// order is (key descending, index ascending), the CPU's. A 4-round radix select (8 bits
// a round: block histograms with warp-aggregated shared atomics, then one CTA per segment
// picks the digit) finds the k-th key T and kk = how many entries equal to T are taken.
// The chosen set is {key > T} plus the kk lowest indices with key == T; a tiled
// compaction (tile counts, per-segment scan, write) emits it in index order: columns
// ascending, offsets written back to front (descending). No sort is needed.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/check.h"
#include "kernels/cuda/index/block_scan.cuh"
#include "kernels/cuda/index/index.h"
#include "kernels/cuda/index/index_common.cuh"

namespace mprefill::cuda::index {
namespace {

using detail::Carve;
using detail::kForcedKey;
using detail::score_key;

constexpr int kHistThreads = 256;
constexpr int kTile = 4096;  // elements per CTA in the histogram and compaction kernels
constexpr int kPerThread = kTile / kHistThreads;

struct SegParams {
  const float* col;
  const float* slash;
  int64_t n;
  int num_heads;
  int k[2 * kMaxHeadsPerCall];
};
struct SegState {
  uint32_t prefix;
  uint32_t kk;  // still to take among keys matching prefix
};

__device__ __forceinline__ uint32_t key_at(const SegParams& sp, int seg, int64_t i) {
  const bool slash = seg >= sp.num_heads;
  const int h = slash ? seg - sp.num_heads : seg;
  const int64_t forced = slash ? kForcedOffsets : kForcedColumns;
  if (i < forced) return kForcedKey;
  const float* x = (slash ? sp.slash : sp.col) + h * sp.n;
  return score_key(x[i]);
}

__global__ void init_kernel(SegParams sp, SegState* st) {
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s < 2 * sp.num_heads) st[s] = SegState{0u, static_cast<uint32_t>(sp.k[s])};
}

__global__ void __launch_bounds__(kHistThreads)
    hist_kernel(SegParams sp, const SegState* st, uint32_t* hist, int shift, uint32_t mask) {
  __shared__ uint32_t sh[256];
  const int seg = blockIdx.y, tid = threadIdx.x, lane = tid & 31;
  sh[tid] = 0;
  __syncthreads();
  const uint32_t prefix = st[seg].prefix;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int it = 0; it < kPerThread; ++it) {
    const int64_t i = i0 + it * kHistThreads + tid;
    int bin = 256;
    if (i < sp.n) {
      const uint32_t key = key_at(sp, seg, i);
      if ((key & mask) == prefix) bin = (key >> shift) & 255;
    }
    const unsigned peers = __match_any_sync(0xffffffffu, bin);
    if (bin < 256 && lane == __ffs(peers) - 1) atomicAdd(&sh[bin], __popc(peers));
  }
  __syncthreads();
  if (sh[tid]) atomicAdd(&hist[seg * 256 + tid], sh[tid]);
}

// One CTA of 256 threads per segment: thread t looks at digit 255 - t.
__global__ void __launch_bounds__(256) pick_kernel(SegState* st, uint32_t* hist, int shift) {
  __shared__ uint32_t scratch[32];
  const int seg = blockIdx.x, tid = threadIdx.x, digit = 255 - tid;
  const uint32_t c = hist[seg * 256 + digit];
  uint32_t total;
  const uint32_t excl = detail::block_excl_scan(c, scratch, &total);
  const SegState s = st[seg];
  __syncthreads();
  if (c > 0 && excl < s.kk && s.kk <= excl + c) {
    st[seg] = SegState{s.prefix | (static_cast<uint32_t>(digit) << shift), s.kk - excl};
  }
  hist[seg * 256 + digit] = 0;  // ready for the next round
}

// Per tile: how many keys are > T and == T.
__global__ void __launch_bounds__(kHistThreads)
    tile_count_kernel(SegParams sp, const SegState* st, uint32_t* cnt_gt, uint32_t* cnt_eq,
                      int ntiles) {
  __shared__ uint32_t scratch[32];
  const int seg = blockIdx.y, tid = threadIdx.x;
  const uint32_t T = st[seg].prefix;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile + tid * kPerThread;
  uint32_t gt = 0, eq = 0;
  for (int e = 0; e < kPerThread; ++e) {
    const int64_t i = i0 + e;
    if (i >= sp.n) break;
    const uint32_t key = key_at(sp, seg, i);
    gt += key > T;
    eq += key == T;
  }
  uint32_t tg, te;
  detail::block_excl_scan(gt, scratch, &tg);
  detail::block_excl_scan(eq, scratch, &te);
  if (tid == 0) {
    cnt_gt[static_cast<int64_t>(seg) * ntiles + blockIdx.x] = tg;
    cnt_eq[static_cast<int64_t>(seg) * ntiles + blockIdx.x] = te;
  }
}

// One CTA of 1024 per segment: exclusive scans of the tile counts (in place); also
// publishes the per-head counts.
__global__ void __launch_bounds__(1024)
    tile_scan_kernel(SegParams sp, uint32_t* cnt_gt, uint32_t* cnt_eq, int ntiles, int* n_columns,
                     int* n_offsets) {
  __shared__ uint32_t scratch[32];
  const int seg = blockIdx.x;
  uint32_t* g = cnt_gt + static_cast<int64_t>(seg) * ntiles;
  uint32_t* e = cnt_eq + static_cast<int64_t>(seg) * ntiles;
  uint32_t carry_g = 0, carry_e = 0;
  for (int base = 0; base < ntiles; base += 1024) {
    const int i = base + threadIdx.x;
    const uint32_t vg = i < ntiles ? g[i] : 0u, ve = i < ntiles ? e[i] : 0u;
    uint32_t tg, te;
    const uint32_t xg = detail::block_excl_scan(vg, scratch, &tg);
    const uint32_t xe = detail::block_excl_scan(ve, scratch, &te);
    if (i < ntiles) {
      g[i] = carry_g + xg;
      e[i] = carry_e + xe;
    }
    carry_g += tg;
    carry_e += te;
  }
  if (threadIdx.x == 0) {
    if (seg < sp.num_heads) {
      n_columns[seg] = sp.k[seg];
    } else {
      n_offsets[seg - sp.num_heads] = sp.k[seg];
    }
  }
}

__global__ void __launch_bounds__(kHistThreads)
    write_kernel(SegParams sp, const SegState* st, const uint32_t* excl_gt, const uint32_t* excl_eq,
                 int ntiles, int* columns, int col_cap, int* offsets, int off_cap) {
  __shared__ uint32_t scratch[32];
  const int seg = blockIdx.y, tid = threadIdx.x;
  const SegState s = st[seg];
  const uint32_t T = s.prefix, kk = s.kk;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile + tid * kPerThread;
  uint32_t keys[kPerThread];
  uint32_t gt = 0, eq = 0;
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    const int64_t i = i0 + e;
    keys[e] = i < sp.n ? key_at(sp, seg, i) : 0u;  // 0 is below every real key
    gt += i < sp.n && keys[e] > T;
    eq += i < sp.n && keys[e] == T;
  }
  uint32_t tg, te;
  uint32_t before_gt = detail::block_excl_scan(gt, scratch, &tg);
  uint32_t before_eq = detail::block_excl_scan(eq, scratch, &te);
  before_gt += excl_gt[static_cast<int64_t>(seg) * ntiles + blockIdx.x];
  before_eq += excl_eq[static_cast<int64_t>(seg) * ntiles + blockIdx.x];
  const bool slash = seg >= sp.num_heads;
  const int h = slash ? seg - sp.num_heads : seg;
  const int k = sp.k[seg];
  int* out = slash ? offsets + static_cast<int64_t>(h) * off_cap
                   : columns + static_cast<int64_t>(h) * col_cap;
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    const int64_t i = i0 + e;
    if (i >= sp.n) break;
    bool take = false;
    uint32_t pos = 0;
    if (keys[e] > T) {
      take = true;
      pos = before_gt + min(before_eq, kk);
      ++before_gt;
    } else if (keys[e] == T) {
      if (before_eq < kk) {
        take = true;
        pos = before_gt + before_eq;
      }
      ++before_eq;
    }
    if (take)
      out[slash ? k - 1 - static_cast<int>(pos) : static_cast<int>(pos)] = static_cast<int>(i);
  }
}

int num_tiles(int64_t n) { return static_cast<int>((n + kTile - 1) / kTile); }

}  // namespace

size_t vs_select_workspace_size(int num_heads, int64_t n) {
  if (num_heads <= 0 || n <= 0) return 256;
  const int nseg = 2 * num_heads, nt = num_tiles(n);
  Carve c(nullptr);
  c.take<SegState>(nseg);
  c.take<uint32_t>(static_cast<size_t>(nseg) * 256);
  c.take<uint32_t>(static_cast<size_t>(nseg) * nt);
  c.take<uint32_t>(static_cast<size_t>(nseg) * nt);
  return c.used;
}

Status vs_select(const float* col_score, const float* slash_score, const int* v_budget,
                 const int* s_budget, const VsSelectionsDevice* sel, void* workspace,
                 size_t workspace_bytes, cudaStream_t stream) {
  MPREFILL_CHECK_ARG(col_score && slash_score && v_budget && s_budget && sel,
                     Status::kInvalidArgument);
  const int H = sel->num_heads;
  const int64_t n = sel->seq_len;
  MPREFILL_CHECK_ARG(H > 0 && H <= kMaxHeadsPerCall, Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(n > 0 && n < (int64_t{1} << 31) - kTile, Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(sel->columns && sel->offsets && sel->n_columns && sel->n_offsets,
                     Status::kInvalidArgument);
  SegParams sp{};
  sp.col = col_score;
  sp.slash = slash_score;
  sp.n = n;
  sp.num_heads = H;
  for (int h = 0; h < H; ++h) {
    sp.k[h] = clamp_vertical_budget(v_budget[h], n);
    sp.k[H + h] = clamp_slash_budget(s_budget[h], n);
    MPREFILL_CHECK_ARG(sp.k[h] <= sel->col_capacity && sp.k[H + h] <= sel->off_capacity,
                       Status::kInvalidArgument);
  }
  MPREFILL_CHECK_ARG(workspace && workspace_bytes >= vs_select_workspace_size(H, n),
                     Status::kOutOfMemory);
  const int nseg = 2 * H, nt = num_tiles(n);
  Carve c(workspace);
  SegState* st = c.take<SegState>(nseg);
  uint32_t* hist = c.take<uint32_t>(static_cast<size_t>(nseg) * 256);
  uint32_t* cnt_gt = c.take<uint32_t>(static_cast<size_t>(nseg) * nt);
  uint32_t* cnt_eq = c.take<uint32_t>(static_cast<size_t>(nseg) * nt);

  MPREFILL_CUDA_TRY(cudaMemsetAsync(hist, 0, static_cast<size_t>(nseg) * 256 * 4, stream));
  init_kernel<<<(nseg + 127) / 128, 128, 0, stream>>>(sp, st);
  MPREFILL_CUDA_LAUNCH_CHECK("init_kernel");
  const dim3 grid(nt, nseg);
  for (int round = 0; round < 4; ++round) {
    const int shift = 24 - 8 * round;
    const uint32_t mask = round == 0 ? 0u : ~0u << (shift + 8);
    hist_kernel<<<grid, kHistThreads, 0, stream>>>(sp, st, hist, shift, mask);
    MPREFILL_CUDA_LAUNCH_CHECK("hist_kernel");
    pick_kernel<<<nseg, 256, 0, stream>>>(st, hist, shift);
    MPREFILL_CUDA_LAUNCH_CHECK("pick_kernel");
  }
  tile_count_kernel<<<grid, kHistThreads, 0, stream>>>(sp, st, cnt_gt, cnt_eq, nt);
  MPREFILL_CUDA_LAUNCH_CHECK("tile_count_kernel");
  tile_scan_kernel<<<nseg, 1024, 0, stream>>>(sp, cnt_gt, cnt_eq, nt, sel->n_columns,
                                              sel->n_offsets);
  MPREFILL_CUDA_LAUNCH_CHECK("tile_scan_kernel");
  write_kernel<<<grid, kHistThreads, 0, stream>>>(
      sp, st, cnt_gt, cnt_eq, nt, sel->columns, sel->col_capacity, sel->offsets, sel->off_capacity);
  MPREFILL_CUDA_LAUNCH_CHECK("write_kernel");
  return Status::kOk;
}

}  // namespace mprefill::cuda::index
