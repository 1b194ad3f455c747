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
//
// Adaptive segments (tau > 0, cpu::select_by_mass's rule): k is the shortest prefix of
// the same ranking, capped by the budget, whose mass (the score itself where finite and
// > 0) reaches tau of the segment's total; never fewer than the forced entries. Found
// first by a mass-weighted radix select over the same keys (4 rounds; bins sum mass and
// count entries): the key T' at which the cumulative mass crosses the goal and how many
// entries rank above it; entries equal to T' carry equal mass w, so the ties taken are
// ceil(rest / w). Then the exact top-k above runs with that k. Mass is summed in 64-bit
// fixed point (scaled so that the segment's total stays below 2^62): integer atomics
// make k independent of the summation order, so every sp rank that selects from the same
// scores gets the same k. Everything stays on the device: the k of each head is written
// to n_columns / n_offsets.
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
  int k[2 * kMaxHeadsPerCall];       // the budget (adaptive: the cap)
  double tau[2 * kMaxHeadsPerCall];  // 0: fixed budget
};
struct SegState {
  uint32_t prefix;
  uint32_t kk;  // still to take among keys matching prefix
  uint32_t k;   // entries the segment takes
};
// Mass-weighted radix select of one adaptive segment.
struct MassState {
  uint32_t prefix;     // key digits fixed so far
  uint32_t above;      // entries ranked above the keys matching prefix
  uint32_t tie_count;  // entries of the last picked digit (after round 3: keys == T')
  uint32_t max_bits;   // largest mass of the segment (bits of a float >= 0)
  int done;            // k decided (k holds it)
  uint32_t k;
  unsigned long long need;  // fixed-point mass still to gather among keys matching prefix
};

// Fixed-point scale of a segment: 2^(62 - ceil(log2(max * n))), so that n entries of at
// most max sum below 2^62.
__device__ __forceinline__ double mass_scale(uint32_t max_bits, int64_t n) {
  const double top = static_cast<double>(__uint_as_float(max_bits)) * static_cast<double>(n);
  return top > 0 ? exp2(62.0 - ceil(log2(top))) : 0.0;
}
// The mass of a score in fixed point: the score where finite and > 0, else 0.
__device__ __forceinline__ unsigned long long mass_fx(float x, double scale) {
  return isfinite(x) && x > 0.f ? static_cast<unsigned long long>(static_cast<double>(x) * scale)
                                : 0ull;
}

__device__ __forceinline__ uint32_t key_at(const SegParams& sp, int seg, int64_t i) {
  const bool slash = seg >= sp.num_heads;
  const int h = slash ? seg - sp.num_heads : seg;
  const int64_t forced = slash ? kForcedOffsets : kForcedColumns;
  if (i < forced) return kForcedKey;
  const float* x = (slash ? sp.slash : sp.col) + h * sp.n;
  return score_key(x[i]);
}

__device__ __forceinline__ float score_at(const SegParams& sp, int seg, int64_t i) {
  const bool slash = seg >= sp.num_heads;
  const int h = slash ? seg - sp.num_heads : seg;
  return (slash ? sp.slash : sp.col)[h * sp.n + i];
}

// Entries forced into the segment and kept whatever tau (cpu::mass_prefix's n_forced).
__device__ __forceinline__ uint32_t forced_count(const SegParams& sp, int seg) {
  const int64_t forced = seg >= sp.num_heads ? kForcedOffsets : kForcedColumns;
  return static_cast<uint32_t>(min(min(forced, sp.n), static_cast<int64_t>(sp.k[seg])));
}

// ms may be null (no adaptive segment in the call).
__global__ void init_kernel(SegParams sp, SegState* st, const MassState* ms) {
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= 2 * sp.num_heads) return;
  const uint32_t k = ms && sp.tau[s] > 0 ? ms[s].k : static_cast<uint32_t>(sp.k[s]);
  st[s] = SegState{0u, k, k};
}

__global__ void mass_init_kernel(SegParams sp, MassState* ms) {
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s < 2 * sp.num_heads)
    ms[s] = MassState{0u, 0u, 0u, 0u, sp.tau[s] > 0 ? 0 : 1, static_cast<uint32_t>(sp.k[s]), 0ull};
}

// The largest mass per adaptive segment (positive floats order as their bits).
__global__ void __launch_bounds__(kHistThreads) mass_max_kernel(SegParams sp, MassState* ms) {
  const int seg = blockIdx.y, tid = threadIdx.x;
  if (ms[seg].done) return;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  uint32_t best = 0;
  for (int it = 0; it < kPerThread; ++it) {
    const int64_t i = i0 + it * kHistThreads + tid;
    if (i >= sp.n) break;
    const float x = score_at(sp, seg, i);
    if (isfinite(x) && x > 0.f) best = max(best, __float_as_uint(x));
  }
  for (int off = 16; off > 0; off >>= 1) best = max(best, __shfl_xor_sync(0xffffffffu, best, off));
  if ((tid & 31) == 0 && best) atomicMax(&ms[seg].max_bits, best);
}

// Round `shift` of the weighted select: per digit of the keys matching the prefix, the
// summed fixed-point mass and the entry count.
__global__ void __launch_bounds__(kHistThreads)
    mass_hist_kernel(SegParams sp, const MassState* ms, unsigned long long* hist_m,
                     uint32_t* hist_c, int shift, uint32_t mask) {
  __shared__ unsigned long long shm[256];
  __shared__ uint32_t shc[256];
  const int seg = blockIdx.y, tid = threadIdx.x;
  if (ms[seg].done) return;
  const double scale = mass_scale(ms[seg].max_bits, sp.n);
  shm[tid] = 0ull;
  shc[tid] = 0;
  __syncthreads();
  const uint32_t prefix = ms[seg].prefix;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int it = 0; it < kPerThread; ++it) {
    const int64_t i = i0 + it * kHistThreads + tid;
    if (i >= sp.n) break;
    const uint32_t key = key_at(sp, seg, i);
    if ((key & mask) != prefix) continue;
    const int bin = (key >> shift) & 255;
    const unsigned long long m = mass_fx(score_at(sp, seg, i), scale);
    if (m) atomicAdd(&shm[bin], m);
    atomicAdd(&shc[bin], 1u);
  }
  __syncthreads();
  if (shc[tid]) {
    atomicAdd(&hist_m[seg * 256 + tid], shm[tid]);
    atomicAdd(&hist_c[seg * 256 + tid], shc[tid]);
  }
}

// One CTA per segment; thread 0 walks the 256 digits from the top (256 steps a round).
// Round 0 also sets the goal, ceil(tau * total).
__global__ void __launch_bounds__(256)
    mass_pick_kernel(SegParams sp, MassState* ms, unsigned long long* hist_m, uint32_t* hist_c,
                     int shift, int round) {
  using u64 = unsigned long long;
  const int seg = blockIdx.x, tid = threadIdx.x;
  __shared__ u64 hm[256];
  __shared__ uint32_t hc[256];
  hm[tid] = hist_m[seg * 256 + tid];
  hc[tid] = hist_c[seg * 256 + tid];
  hist_m[seg * 256 + tid] = 0ull;  // ready for the next round
  hist_c[seg * 256 + tid] = 0;
  __syncthreads();
  if (tid != 0) return;
  MassState m = ms[seg];
  if (m.done) return;
  const uint32_t n_forced = forced_count(sp, seg), cap = static_cast<uint32_t>(sp.k[seg]);
  if (round == 0) {
    u64 total = 0;
    for (int d = 0; d < 256; ++d) total += hm[d];
    m.need = static_cast<u64>(ceil(sp.tau[seg] * static_cast<double>(total)));
    if (m.need == 0) {  // nothing to gather: the forced entries alone
      m.done = 1;
      m.k = n_forced;
      ms[seg] = m;
      return;
    }
  }
  u64 cum = 0;
  uint32_t cnt = 0;
  int pick = -1;
  for (int d = 255; d >= 0; --d) {
    if (hm[d] > 0 && cum + hm[d] >= m.need) {
      pick = d;
      break;
    }
    cum += hm[d];
    cnt += hc[d];
  }
  if (pick < 0) {
    // The goal is a rounding step above what is left (ceil of tau = 1 in fp64 over a
    // total above 2^53): take every entry with mass, i.e. stop at the lowest digit with some.
    cum = 0;
    cnt = 0;
    int last = -1;
    for (int d = 0; d < 256; ++d)
      if (hm[d] > 0) {
        last = d;
        break;
      }
    if (last < 0) {  // unreachable: the prefix was picked for its mass
      m.done = 1;
      m.k = max(min(m.above, cap), n_forced);
      ms[seg] = m;
      return;
    }
    for (int d = 255; d > last; --d) cum += hm[d], cnt += hc[d];
    pick = last;
    m.need = cum + hm[last];
  }
  m.prefix |= static_cast<uint32_t>(pick) << shift;
  m.need -= cum;
  m.above += cnt;
  m.tie_count = hc[pick];
  if (round == 3) {
    uint32_t k;
    if (m.prefix == kForcedKey) {
      k = n_forced;  // reached inside the forced entries, which are all kept
    } else {         // every key == T' has the mass w (> 0: its bin held some)
      const u64 w = mass_fx(__uint_as_float(m.prefix & 0x7fffffffu), mass_scale(m.max_bits, sp.n));
      u64 t = w ? (m.need + w - 1) / w : 1ull;
      t = min(max(t, 1ull), static_cast<u64>(m.tie_count));
      k = m.above + static_cast<uint32_t>(t);
    }
    m.k = min(max(k, n_forced), cap);
    m.done = 1;
  }
  ms[seg] = m;
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
    st[seg] = SegState{s.prefix | (static_cast<uint32_t>(digit) << shift), s.kk - excl, s.k};
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
    tile_scan_kernel(SegParams sp, const SegState* st, uint32_t* cnt_gt, uint32_t* cnt_eq,
                     int ntiles, int* n_columns, int* n_offsets) {
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
    const int k = static_cast<int>(st[seg].k);
    if (seg < sp.num_heads) {
      n_columns[seg] = k;
    } else {
      n_offsets[seg - sp.num_heads] = k;
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
  const int k = static_cast<int>(s.k);
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
  c.take<MassState>(nseg);
  c.take<unsigned long long>(static_cast<size_t>(nseg) * 256);
  c.take<uint32_t>(static_cast<size_t>(nseg) * 256);
  return c.used;
}

Status vs_select(const float* col_score, const float* slash_score, const int* v_budget,
                 const int* s_budget, const VsSelectionsDevice* sel, void* workspace,
                 size_t workspace_bytes, cudaStream_t stream, const double* tau) {
  MPREFILL_CHECK_ARG(col_score && slash_score && v_budget && s_budget && sel,
                     Status::kInvalidArgument);
  const int H = sel->num_heads;
  const int64_t n = sel->seq_len;
  MPREFILL_CHECK_ARG(H > 0 && H <= kMaxHeadsPerCall, Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(n > 0 && n < (int64_t{1} << 31) - kTile, Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(sel->columns && sel->offsets && sel->n_columns && sel->n_offsets,
                     Status::kInvalidArgument);
  SegParams sp{};
  bool any_tau = false;
  sp.col = col_score;
  sp.slash = slash_score;
  sp.n = n;
  sp.num_heads = H;
  for (int h = 0; h < H; ++h) {
    sp.k[h] = clamp_vertical_budget(v_budget[h], n);
    sp.k[H + h] = clamp_slash_budget(s_budget[h], n);
    const double t = tau ? tau[h] : 0.0;
    MPREFILL_CHECK_ARG(t == 0.0 || (t > 0.0 && t <= 1.0), Status::kInvalidArgument);
    sp.tau[h] = sp.tau[H + h] = t;
    any_tau = any_tau || t > 0.0;
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
  MassState* ms = c.take<MassState>(nseg);
  unsigned long long* hist_m = c.take<unsigned long long>(static_cast<size_t>(nseg) * 256);
  uint32_t* hist_c = c.take<uint32_t>(static_cast<size_t>(nseg) * 256);
  const dim3 grid(nt, nseg);

  if (any_tau) {
    MPREFILL_CUDA_TRY(cudaMemsetAsync(hist_m, 0, static_cast<size_t>(nseg) * 256 * 8, stream));
    MPREFILL_CUDA_TRY(cudaMemsetAsync(hist_c, 0, static_cast<size_t>(nseg) * 256 * 4, stream));
    mass_init_kernel<<<(nseg + 127) / 128, 128, 0, stream>>>(sp, ms);
    MPREFILL_CUDA_LAUNCH_CHECK("mass_init_kernel");
    mass_max_kernel<<<grid, kHistThreads, 0, stream>>>(sp, ms);
    MPREFILL_CUDA_LAUNCH_CHECK("mass_max_kernel");
    for (int round = 0; round < 4; ++round) {
      const int shift = 24 - 8 * round;
      const uint32_t mask = round == 0 ? 0u : ~0u << (shift + 8);
      mass_hist_kernel<<<grid, kHistThreads, 0, stream>>>(sp, ms, hist_m, hist_c, shift, mask);
      MPREFILL_CUDA_LAUNCH_CHECK("mass_hist_kernel");
      mass_pick_kernel<<<nseg, 256, 0, stream>>>(sp, ms, hist_m, hist_c, shift, round);
      MPREFILL_CUDA_LAUNCH_CHECK("mass_pick_kernel");
    }
  }
  MPREFILL_CUDA_TRY(cudaMemsetAsync(hist, 0, static_cast<size_t>(nseg) * 256 * 4, stream));
  init_kernel<<<(nseg + 127) / 128, 128, 0, stream>>>(sp, st, any_tau ? ms : nullptr);
  MPREFILL_CUDA_LAUNCH_CHECK("init_kernel");
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
  tile_scan_kernel<<<nseg, 1024, 0, stream>>>(sp, st, cnt_gt, cnt_eq, nt, sel->n_columns,
                                              sel->n_offsets);
  MPREFILL_CUDA_LAUNCH_CHECK("tile_scan_kernel");
  write_kernel<<<grid, kHistThreads, 0, stream>>>(
      sp, st, cnt_gt, cnt_eq, nt, sel->columns, sel->col_capacity, sel->offsets, sel->off_capacity);
  MPREFILL_CUDA_LAUNCH_CHECK("write_kernel");
  return Status::kOk;
}

}  // namespace mprefill::cuda::index
