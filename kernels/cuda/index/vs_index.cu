// Canonical VS index (CSR) from device selections (kernels/cuda/index/index.h), equal to
// cpu::vs_build_index.
//
// For block b (m1 = min(64 b + 64, N)) the valid offsets d < m1 form a suffix [s, n_off)
// of the descending offset array. Offsets d >= m1 - 64 ("clamped", indices [s, c)) all
// give the window [0, min(64, m1)); the others give [m1 - d - 64, m1 - d). Two
// consecutive unclamped windows (d_{j-1} > d_j) are disjoint and not touching iff
// d_{j-1} - d_j > 64, independent of b. So per head the offsets split once into runs
// (maximal index intervals without such a gap; run k starts at index 0 or at the k-th
// element of the starts list S) with first/last offsets run_first/run_last, and block b's
// unclamped ranges are: [m1 - d_c - 64, m1 - run_last[k_c]) for the run k_c holding c,
// then [m1 - run_first[k] - 64, m1 - run_last[k]) for every later run. The clamped range
// merges into the first unclamped one iff m1 - d_c - 64 <= 64. A block's range count is
// O(log) and its ranges stream out of the run arrays.
//
// Columns: a column c < m1 is dropped iff a range holds it. With at most 32 ranges, the
// dropped columns are the index intervals [lower_bound(lo), lower_bound(hi)) of the
// sorted column array (binary searches, one lane per range) and the kept ones are the
// complement, copied segment by segment. With more ranges, each column is tested: it
// lies in a window iff an offset falls in [max(0, m1 - c - 64), c < 64 ? m1 - 1 :
// m1 - c - 1], read from a per-head bitmap of the offsets. One warp per (head, block).
#include <cuda_runtime.h>

#include <cstdint>
#include <cub/device/device_scan.cuh>

#include "kernels/cuda/check.h"
#include "kernels/cuda/index/block_scan.cuh"
#include "kernels/cuda/index/index.h"
#include "kernels/cuda/index/index_common.cuh"

namespace mprefill::cuda::index {
namespace {

using detail::Carve;

constexpr int kWarpsPerCta = 8;

struct Sel {
  int64_t n;
  int nb;
  int num_heads;
  const int* columns;
  const int* offsets;
  const int* n_columns;
  const int* n_offsets;
  int col_cap, off_cap;
  int nwords;
  const uint32_t* bitmap;  // [H][nwords]
  const int* starts;       // [H][off_cap]
  const int* n_starts;     // [H]
  const int* run_first;    // [H][off_cap]: first (largest) offset of run k
  const int* run_last;     // [H][off_cap]: last (smallest) offset of run k
};

__global__ void bitmap_kernel(Sel s, uint32_t* bitmap) {
  const int h = blockIdx.y;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= s.n_offsets[h]) return;
  const int d = s.offsets[static_cast<int64_t>(h) * s.off_cap + i];
  atomicOr(&bitmap[static_cast<int64_t>(h) * s.nwords + (d >> 5)], 1u << (d & 31));
}

// starts[h] = ascending j in [1, n_off) with d_{j-1} - d_j > 64; runs k = 0..n_starts.
__global__ void __launch_bounds__(1024)
    starts_kernel(Sel s, int* starts, int* n_starts, int* run_first, int* run_last) {
  __shared__ uint32_t scratch[32];
  const int h = blockIdx.x;
  const int n_off = s.n_offsets[h];
  const int* off = s.offsets + static_cast<int64_t>(h) * s.off_cap;
  int* out = starts + static_cast<int64_t>(h) * s.off_cap;
  int* rf = run_first + static_cast<int64_t>(h) * s.off_cap;
  int* rl = run_last + static_cast<int64_t>(h) * s.off_cap;
  uint32_t carry = 0;
  for (int base = 0; base < n_off; base += 1024) {
    const int j = base + threadIdx.x;
    const bool f = j >= 1 && j < n_off && off[j - 1] - off[j] > 64;
    uint32_t total;
    const uint32_t x = detail::block_excl_scan(f ? 1u : 0u, scratch, &total);
    if (f) {
      out[carry + x] = j;
      rf[carry + x + 1] = off[j];
      rl[carry + x] = off[j - 1];
    }
    carry += total;
  }
  if (threadIdx.x == 0) {
    n_starts[h] = static_cast<int>(carry);
    if (n_off > 0) {
      rf[0] = off[0];
      rl[carry] = off[n_off - 1];
    }
  }
}

// First index of descending off[0, n) with off[i] < x.
__device__ __forceinline__ int first_below(const int* off, int n, int64_t x) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (off[mid] < x) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}
// First index of ascending a[0, n) with a[i] > x.
__device__ __forceinline__ int first_above(const int* a, int n, int x) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (a[mid] > x) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// First index of ascending a[0, n) with a[i] >= x.
__device__ __forceinline__ int lower_bound(const int* a, int n, int x) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (a[mid] >= x) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// Any offset in [a, b] (b - a < 64)?
__device__ __forceinline__ bool any_bit(const uint32_t* bm, int a, int b) {
  if (b < a) return false;
  const int wa = a >> 5, wb = b >> 5;
  for (int w = wa; w <= wb; ++w) {
    uint32_t word = bm[w];
    if (w == wa) word &= ~0u << (a & 31);
    if (w == wb) word &= (b & 31) == 31 ? ~0u : ((1u << ((b & 31) + 1)) - 1u);
    if (word) return true;
  }
  return false;
}

struct BlockRanges {
  int m1, s, c, n_off, pos, n_starts;
  bool clamp_alone;  // the clamped window forms its own range
  bool merged;       // the clamped window merges into the first unclamped range
  int count;
};

__device__ __forceinline__ BlockRanges block_ranges(const Sel& sel, int h, int b) {
  BlockRanges r;
  const int64_t end = static_cast<int64_t>(kBlock) * (b + 1);
  r.m1 = static_cast<int>(end < sel.n ? end : sel.n);
  const int* off = sel.offsets + static_cast<int64_t>(h) * sel.off_cap;
  r.n_off = sel.n_offsets[h];
  r.s = first_below(off, r.n_off, r.m1);
  r.c = first_below(off, r.n_off, static_cast<int64_t>(r.m1) - 64);
  r.n_starts = sel.n_starts[h];
  const int* st = sel.starts + static_cast<int64_t>(h) * sel.off_cap;
  r.pos = r.c < r.n_off ? first_above(st, r.n_starts, r.c) : r.n_starts;
  r.merged = r.c > r.s && r.c < r.n_off && r.m1 - off[r.c] - 64 <= 64;
  r.clamp_alone = r.c > r.s && !r.merged;
  r.count = (r.clamp_alone ? 1 : 0) + (r.c < r.n_off ? 1 + (r.n_starts - r.pos) : 0);
  return r;
}

// Range r (< count) of the block.
__device__ __forceinline__ void range_at(const Sel& sel, int h, const BlockRanges& br, int r,
                                         int* lo, int* hi) {
  if (br.clamp_alone) {
    if (r == 0) {
      *lo = 0;
      *hi = min(64, br.m1);
      return;
    }
    --r;
  }
  const int64_t base = static_cast<int64_t>(h) * sel.off_cap;
  const int k = br.pos + r;
  if (r == 0) {
    *lo = br.merged ? 0 : br.m1 - sel.offsets[base + br.c] - 64;
  } else {
    *lo = br.m1 - sel.run_first[base + k] - 64;
  }
  *hi = br.m1 - sel.run_last[base + k];
}

constexpr int kFewRanges = 32;

// Column c (< m1) outside every window of the block?
__device__ __forceinline__ bool column_free(const uint32_t* bm, int m1, int c) {
  const int a = max(0, m1 - c - 64);
  const int b = c < 64 ? m1 - 1 : m1 - c - 1;
  return !any_bit(bm, a, b);
}

__global__ void __launch_bounds__(kWarpsPerCta * 32)
    count_kernel(Sel sel, int64_t* range_cnt, int64_t* col_cnt) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (item >= static_cast<int64_t>(sel.num_heads) * sel.nb) return;
  const int h = static_cast<int>(item / sel.nb), b = static_cast<int>(item % sel.nb);
  const BlockRanges r = block_ranges(sel, h, b);
  const int* cols = sel.columns + static_cast<int64_t>(h) * sel.col_cap;
  const int n_col = sel.n_columns[h];
  int64_t cnt = 0;
  if (r.count <= kFewRanges) {
    int covered = 0;
    if (lane < r.count) {
      int lo, hi;
      range_at(sel, h, r, lane, &lo, &hi);
      covered = lower_bound(cols, n_col, hi) - lower_bound(cols, n_col, lo);
    }
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) covered += __shfl_xor_sync(0xffffffffu, covered, off);
    cnt = lower_bound(cols, n_col, r.m1) - covered;
  } else {
    const uint32_t* bm = sel.bitmap + static_cast<int64_t>(h) * sel.nwords;
    for (int base = 0; base < n_col; base += 32) {
      const int i = base + lane;
      const int c = i < n_col ? cols[i] : INT32_MAX;
      const bool valid = c < r.m1;
      const bool keep = valid && column_free(bm, r.m1, c);
      cnt += __popc(__ballot_sync(0xffffffffu, keep));
      if (__ballot_sync(0xffffffffu, valid) != 0xffffffffu) break;
    }
  }
  if (lane == 0) {
    range_cnt[item] = r.count;
    col_cnt[item] = cnt;
  }
}

__global__ void __launch_bounds__(kWarpsPerCta * 32)
    fill_kernel(Sel sel, const int64_t* range_ptr, const int64_t* col_ptr, int* range_lo,
                int* range_hi, int* col) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (item >= static_cast<int64_t>(sel.num_heads) * sel.nb) return;
  const int h = static_cast<int>(item / sel.nb), b = static_cast<int>(item % sel.nb);
  const BlockRanges r = block_ranges(sel, h, b);
  const int64_t out = range_ptr[item];
  // Four ranges per lane per round, all loads before the stores: the compiler may not
  // move a load across a store to range_lo/range_hi (possible alias), so one range per
  // round left a single load in flight per lane (v1: uniform 1000/6096 fill at 1M ran at
  // ~3x its byte floor, bench/NOTES.md section 2).
  constexpr int kUnroll = 4;
  for (int q0 = lane; q0 < r.count; q0 += 32 * kUnroll) {
    int lo[kUnroll], hi[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int q = q0 + 32 * u;
      if (q < r.count) range_at(sel, h, r, q, &lo[u], &hi[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int q = q0 + 32 * u;
      if (q < r.count) {
        range_lo[out + q] = lo[u];
        range_hi[out + q] = hi[u];
      }
    }
  }
  const int* cols = sel.columns + static_cast<int64_t>(h) * sel.col_cap;
  const int n_col = sel.n_columns[h];
  int64_t cout = col_ptr[item];
  if (r.count <= kFewRanges) {
    // kept columns: index segments [0, a_0), [b_0, a_1), ..., [b_{R-1}, n_lt)
    int a = 0, bnd = 0;
    if (lane < r.count) {
      int lo, hi;
      range_at(sel, h, r, lane, &lo, &hi);
      a = lower_bound(cols, n_col, lo);
      bnd = lower_bound(cols, n_col, hi);
    }
    const int n_lt = lower_bound(cols, n_col, r.m1);
    for (int sgm = 0; sgm <= r.count; ++sgm) {
      const int prev_b = __shfl_sync(0xffffffffu, bnd, (sgm + 31) & 31);
      const int next_a = __shfl_sync(0xffffffffu, a, sgm & 31);
      const int from = sgm == 0 ? 0 : prev_b;
      const int to = sgm == r.count ? n_lt : next_a;
      // Four loads in flight per lane (see the range loop above).
      for (int i0 = from + lane; i0 < to; i0 += 32 * kUnroll) {
        int v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (i0 + 32 * u < to) v[u] = cols[i0 + 32 * u];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (i0 + 32 * u < to) col[cout + (i0 + 32 * u - from)] = v[u];
      }
      if (to > from) cout += to - from;
    }
    return;
  }
  const uint32_t* bm = sel.bitmap + static_cast<int64_t>(h) * sel.nwords;
  for (int base = 0; base < n_col; base += 32) {
    const int i = base + lane;
    const int c = i < n_col ? cols[i] : INT32_MAX;
    const bool valid = c < r.m1;
    const bool keep = valid && column_free(bm, r.m1, c);
    const unsigned kb = __ballot_sync(0xffffffffu, keep);
    if (keep) col[cout + __popc(kb & ((1u << lane) - 1u))] = c;
    cout += __popc(kb);
    if (__ballot_sync(0xffffffffu, valid) != 0xffffffffu) break;
  }
}

struct Parts {
  uint32_t* bitmap;
  int* starts;
  int* n_starts;
  int* run_first;
  int* run_last;
  int64_t* range_cnt;
  int64_t* col_cnt;
  void* scan_tmp;
  size_t scan_bytes;
};

size_t scan_temp_bytes(int64_t items) {
  size_t bytes = 0;
  cub::DeviceScan::InclusiveSum(nullptr, bytes, static_cast<const int64_t*>(nullptr),
                                static_cast<int64_t*>(nullptr), static_cast<int>(items));
  return bytes;
}

Parts carve(int H, int64_t n, int off_cap, void* ws) {
  const int64_t nb = num_blocks(n);
  Carve c(ws);
  Parts p;
  p.bitmap = c.take<uint32_t>(static_cast<size_t>(H) * ((n + 31) / 32));
  p.starts = c.take<int>(static_cast<size_t>(H) * off_cap);
  p.n_starts = c.take<int>(H);
  p.run_first = c.take<int>(static_cast<size_t>(H) * off_cap);
  p.run_last = c.take<int>(static_cast<size_t>(H) * off_cap);
  p.range_cnt = c.take<int64_t>(static_cast<size_t>(H) * nb);
  p.col_cnt = c.take<int64_t>(static_cast<size_t>(H) * nb);
  p.scan_bytes = scan_temp_bytes(H * nb);
  p.scan_tmp = c.take<char>(p.scan_bytes);
  return p;
}

Status check(const VsSelectionsDevice& s) {
  MPREFILL_CHECK_ARG(s.num_heads > 0 && s.seq_len > 0 && s.seq_len < (int64_t{1} << 31) - 64,
                     Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(s.columns && s.offsets && s.n_columns && s.n_offsets,
                     Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(s.col_capacity >= 0 && s.off_capacity >= 0, Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(static_cast<int64_t>(s.num_heads) * num_blocks(s.seq_len) < (int64_t{1} << 31),
                     Status::kInvalidArgument);
  return Status::kOk;
}

Sel make_sel(const VsSelectionsDevice& s, const Parts& p) {
  Sel r;
  r.n = s.seq_len;
  r.nb = static_cast<int>(num_blocks(s.seq_len));
  r.num_heads = s.num_heads;
  r.columns = s.columns;
  r.offsets = s.offsets;
  r.n_columns = s.n_columns;
  r.n_offsets = s.n_offsets;
  r.col_cap = s.col_capacity;
  r.off_cap = s.off_capacity;
  r.nwords = static_cast<int>((s.seq_len + 31) / 32);
  r.bitmap = p.bitmap;
  r.starts = p.starts;
  r.n_starts = p.n_starts;
  r.run_first = p.run_first;
  r.run_last = p.run_last;
  return r;
}

// Per-head offset bitmap and starts list, used by both passes.
Status prepare(const VsSelectionsDevice& s, const Parts& p, cudaStream_t stream) {
  const Sel sel = make_sel(s, p);
  MPREFILL_CUDA_TRY(cudaMemsetAsync(
      p.bitmap, 0, static_cast<size_t>(s.num_heads) * sel.nwords * sizeof(uint32_t), stream));
  if (s.off_capacity > 0) {
    bitmap_kernel<<<dim3((s.off_capacity + 255) / 256, s.num_heads), 256, 0, stream>>>(sel,
                                                                                       p.bitmap);
    MPREFILL_CUDA_LAUNCH_CHECK("bitmap_kernel");
  }
  starts_kernel<<<s.num_heads, 1024, 0, stream>>>(sel, p.starts, p.n_starts, p.run_first,
                                                  p.run_last);
  MPREFILL_CUDA_LAUNCH_CHECK("starts_kernel");
  return Status::kOk;
}

}  // namespace

size_t vs_index_workspace_size(int num_heads, int64_t n, int off_capacity) {
  if (num_heads <= 0 || n <= 0 || off_capacity < 0) return 256;
  Carve c(nullptr);
  const int64_t nb = num_blocks(n);
  c.take<uint32_t>(static_cast<size_t>(num_heads) * ((n + 31) / 32));
  c.take<int>(static_cast<size_t>(num_heads) * off_capacity);
  c.take<int>(num_heads);
  c.take<int>(static_cast<size_t>(num_heads) * off_capacity);
  c.take<int>(static_cast<size_t>(num_heads) * off_capacity);
  c.take<int64_t>(static_cast<size_t>(num_heads) * nb);
  c.take<int64_t>(static_cast<size_t>(num_heads) * nb);
  c.take<char>(scan_temp_bytes(num_heads * nb));
  return c.used;
}

Status vs_index_count(const VsSelectionsDevice& s, int64_t* range_ptr, int64_t* col_ptr,
                      void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (const Status st = check(s); st != Status::kOk) return st;
  MPREFILL_CHECK_ARG(range_ptr && col_ptr, Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(workspace && workspace_bytes >= vs_index_workspace_size(s.num_heads, s.seq_len,
                                                                             s.off_capacity),
                     Status::kOutOfMemory);
  const Parts p = carve(s.num_heads, s.seq_len, s.off_capacity, workspace);
  if (const Status st = prepare(s, p, stream); st != Status::kOk) return st;
  const Sel sel = make_sel(s, p);
  const int64_t items = static_cast<int64_t>(s.num_heads) * sel.nb;
  const unsigned grid = static_cast<unsigned>((items + kWarpsPerCta - 1) / kWarpsPerCta);
  count_kernel<<<grid, kWarpsPerCta * 32, 0, stream>>>(sel, p.range_cnt, p.col_cnt);
  MPREFILL_CUDA_LAUNCH_CHECK("count_kernel");
  MPREFILL_CUDA_TRY(cudaMemsetAsync(range_ptr, 0, sizeof(int64_t), stream));
  MPREFILL_CUDA_TRY(cudaMemsetAsync(col_ptr, 0, sizeof(int64_t), stream));
  size_t bytes = p.scan_bytes;
  MPREFILL_CUDA_TRY(cub::DeviceScan::InclusiveSum(p.scan_tmp, bytes, p.range_cnt, range_ptr + 1,
                                                  static_cast<int>(items), stream));
  bytes = p.scan_bytes;
  MPREFILL_CUDA_TRY(cub::DeviceScan::InclusiveSum(p.scan_tmp, bytes, p.col_cnt, col_ptr + 1,
                                                  static_cast<int>(items), stream));
  return Status::kOk;
}

Status vs_index_fill(const VsSelectionsDevice& s, const int64_t* range_ptr, const int64_t* col_ptr,
                     int* range_lo, int* range_hi, int* col, void* workspace,
                     size_t workspace_bytes, cudaStream_t stream) {
  if (const Status st = check(s); st != Status::kOk) return st;
  MPREFILL_CHECK_ARG(range_ptr && col_ptr && range_lo && range_hi, Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(workspace && workspace_bytes >= vs_index_workspace_size(s.num_heads, s.seq_len,
                                                                             s.off_capacity),
                     Status::kOutOfMemory);
  const Parts p = carve(s.num_heads, s.seq_len, s.off_capacity, workspace);
  // The bitmap and starts left by vs_index_count are still in the workspace when the
  // caller passes the same one; rebuilding them keeps fill self-contained and costs O(s).
  if (const Status st = prepare(s, p, stream); st != Status::kOk) return st;
  const Sel sel = make_sel(s, p);
  const int64_t items = static_cast<int64_t>(s.num_heads) * sel.nb;
  const unsigned grid = static_cast<unsigned>((items + kWarpsPerCta - 1) / kWarpsPerCta);
  fill_kernel<<<grid, kWarpsPerCta * 32, 0, stream>>>(sel, range_ptr, col_ptr, range_lo, range_hi,
                                                      col);
  MPREFILL_CUDA_LAUNCH_CHECK("fill_kernel");
  return Status::kOk;
}

}  // namespace mprefill::cuda::index
