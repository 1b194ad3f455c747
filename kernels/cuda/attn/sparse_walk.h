// The sparse patterns' key-tile walk of the attention skeleton, as plain host/device C++
// (no CUDA or CuTe types), so that the tile stream a CTA's producer computes can be
// replayed on the CPU and checked against the mask definitions of kernels/sparse.h
// (tests/cpu/sparse_walk_test.cc) — the kernel and the test run this same code.
//
// CTA = global query blocks A and B = A + 1 (rows [m0a, m0a + 128); B may be absent).
// Tiles, in this order:
//   1. the union of A's and B's key intervals (VS: canonical ranges; block-sparse:
//      [64 j, 64 j + 64) per listed j; A-shape: [0, n_init) and the local window), each
//      clipped to the shard and to the block's causal bound, cut into kBlockN-key pieces
//      from each union interval's start (a TMA box at an arbitrary key row); a consumer's
//      membership marks the piece's keys in its own intervals;
//   2. gathered vertical columns (VS). Union gathers (B present): B's list kBlockN at a
//      time, used by both consumers, A's membership = the columns in A's list. This
//      covers A's gathered columns because a head's verticals are the same for every
//      block: a column A gathers (a vertical below A's causal bound, outside A's ranges)
//      is either in B's ranges, hence in a union piece, where A's membership includes its
//      gathered columns, or in B's list. A column of B's list inside A's ranges is A's in
//      the piece only (it is not in A's list). Without B, or with union gathers off: A's
//      and B's lists alternating, each tile used by its owner only.
// A consumer masks a tile (key <= row && member && A-shape predicate) unless every key of
// the tile is a member and visible to each of its 64 rows.
//
// Positions are 32-bit: the launcher runs the walk only when every global query and key
// position is below 2^31 - 256 (sparse::sparse_v2_positions_ok).
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define MPREFILL_HD __host__ __device__ __forceinline__
#else
#define MPREFILL_HD inline
#endif
#if defined(__CUDA_ARCH__)
#define MPREFILL_LDG(ptr) __ldg(ptr)
#else
#define MPREFILL_LDG(ptr) (*(ptr))
#endif

namespace mprefill::cuda::walk {

enum class Kind : int { kVs = 0, kBlockSparse = 1, kAShape = 2 };

// Flags of a K slot: consumer w uses the tile (kUse0 << w) / masks it (kMask0 << w).
constexpr uint32_t kUse0 = 1, kMask0 = 4, kGather = 16, kEnd = 32;

MPREFILL_HD int imin(int a, int b) { return a < b ? a : b; }
MPREFILL_HD int imax(int a, int b) { return a > b ? a : b; }
MPREFILL_HD int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
MPREFILL_HD int64_t lmax(int64_t a, int64_t b) { return a > b ? a : b; }

// First position in [lo, hi) of the ascending list a whose value is >= x (hi if none).
template <class X>
MPREFILL_HD int64_t lower_bound(const int* a, int64_t lo, int64_t hi, X x) {
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (MPREFILL_LDG(a + mid) < x)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// Vertical-slash: the positions [g, g_end) of the index's gathered columns (ascending) of
// index row hb = (head, block) that fall in the visible keys [klo, khi).
template <class P, class K>
MPREFILL_HD void vs_column_span(P const& p, int64_t hb, K klo, K khi, int64_t& g, int64_t& g_end) {
  const int64_t lo = p.col_ptr[hb], hi = p.col_ptr[hb + 1];
  g = lower_bound(p.col, lo, hi, klo);
  g_end = lower_bound(p.col, g, hi, khi);
}

// A-shape: the key ranges of the query block at m0, [0, n_init) and the local window
// [m0 - n_local + 1, m0 + 64) (one range [0, m0 + 64) when they touch, [0, n_init) alone
// when n_local = 0). Sets [lo0, hi0) and, for two ranges, [lo1, hi1); returns the count.
template <class P, class I>
MPREFILL_HD int ashape_ranges(P const& p, int64_t m0, I& lo0, I& hi0, I& lo1, I& hi1) {
  const int64_t init_hi = lmin(p.n_init, m0 + 64);
  const int64_t loc_lo = lmax(m0 - p.n_local + 1, 0);
  if (p.n_local > 0 && loc_lo <= init_hi) {
    lo0 = 0;
    hi0 = I(m0 + 64);
    return 1;
  }
  lo0 = 0;
  hi0 = I(init_hi);
  lo1 = I(loc_lo);
  hi1 = I(m0 + 64);
  return p.n_local > 0 ? 2 : 1;
}

// One query block's key intervals [lo, hi), ascending, clipped to [klo, khi); `has` /
// (lo, hi) is the current one, advance() moves to the next non-empty one.
struct KeyIntervals {
  const int* a;  // VS: range_lo + base; block-sparse: the block list
  const int* b;  // VS: range_hi + base
  int i, n;
  int klo, khi;
  int a_lo0, a_hi0, a_lo1, a_hi1;  // A-shape
  int lo, hi;
  bool has;

  MPREFILL_HD void advance(Kind kind) {
    has = false;
    while (i < n) {
      int l, h;
      if (kind == Kind::kVs) {
        l = a[i];
        h = b[i];
      } else if (kind == Kind::kBlockSparse) {
        const int j = a[i];
        if (j < 0) {
          n = i;
          break;
        }
        l = j * 64;
        h = l + 64;
      } else {
        l = i == 0 ? a_lo0 : a_lo1;
        h = i == 0 ? a_hi0 : a_hi1;
      }
      ++i;
      l = imax(l, klo);
      h = imin(h, khi);
      if (l < h) {
        lo = l;
        hi = h;
        has = true;
        return;
      }
    }
  }
};

// Bits [a, b) of a 64-bit mask, 0 <= a <= b <= 64.
MPREFILL_HD uint64_t bit_span(int a, int b) {
  const uint64_t hi = b >= 64 ? ~0ull : ((1ull << b) - 1);
  const uint64_t lo = a >= 64 ? ~0ull : ((1ull << a) - 1);
  return hi & ~lo;
}

// Membership of keys [s, e) (e - s <= 64) in the intervals of `m`; advances `m` past the
// intervals that end at or before s (pieces are asked for in ascending order).
MPREFILL_HD uint64_t member_bits(KeyIntervals& m, Kind kind, int s, int e) {
  while (m.has && m.hi <= s) m.advance(kind);
  uint64_t bits = 0;
  if (!m.has || m.lo >= e) return 0;
  KeyIntervals t = m;
  while (t.has && t.lo < e) {
    bits |= bit_span(imax(t.lo, s) - s, imin(t.hi, e) - s);
    if (t.hi >= e) break;
    t.advance(kind);
  }
  return bits;
}

// Intervals (and, VS, the gathered-column span [*g, *g_end)) of the query block at m0.
template <class P>
MPREFILL_HD void init_intervals(KeyIntervals& it, P const& p, int head, int64_t m0, bool valid,
                                int64_t* g, int64_t* g_end) {
  it.i = it.n = 0;
  it.has = false;
  it.klo = int(lmax(p.k_pos0, 0));
  it.khi = int(lmin(p.k_pos0 + p.n_k, m0 + 64));
  *g = *g_end = 0;
  if (!valid || it.khi <= it.klo) return;
  const int64_t blk = m0 / 64;
  if (p.kind == Kind::kVs) {
    const int64_t hb = int64_t(p.head_offset + head) * p.nblocks + blk;
    const int64_t r0 = p.range_ptr[hb];
    it.a = p.range_lo + r0;
    it.b = p.range_hi + r0;
    it.n = int(p.range_ptr[hb + 1] - r0);
    vs_column_span(p, hb, it.klo, it.khi, *g, *g_end);
  } else if (p.kind == Kind::kBlockSparse) {
    it.a = p.blocks + (int64_t(p.head_offset + head) * p.nblocks + blk) * p.bs_k;
    it.n = p.bs_k;
  } else {
    it.n = ashape_ranges(p, m0, it.a_lo0, it.a_hi0, it.a_lo1, it.a_hi1);
  }
  it.advance(p.kind);
}

// One key tile: keys [ts, te) of a union piece, or positions [ts, te) of the gathered
// list (gw: owner 0 / 1; -1 for a piece), the K slot flags and the interval membership
// of each consumer (words 0 / 1 = key rows 0..63 / 64..127). end: no more tiles.
struct TileDesc {
  int ts, te, gw;
  uint32_t flags;
  uint64_t a0, a1, b0, b1;
  bool end;
};

template <int kBlockN>
struct SparseWalk {
  static_assert(kBlockN == 128, "membership is two 64-bit words per consumer");
  KeyIntervals ua, ub, ma, mb;  // union walk, membership walk (A, B)
  int64_t ga, ga_end, gb, gb_end;
  int64_t m0a;
  int ulo, uhi, s;  // current union interval, next piece start
  int turn;         // alternating gathers: whose list goes next
  Kind kind;
  bool union_gather;

  template <class P>
  MPREFILL_HD void init(P const& p, int head, int64_t m0a_, bool valid_b, bool union_allowed) {
    m0a = m0a_;
    kind = p.kind;
    init_intervals(ua, p, head, m0a, true, &ga, &ga_end);
    init_intervals(ub, p, head, m0a + 64, valid_b, &gb, &gb_end);
    ma = ua;
    mb = ub;
    ulo = uhi = s = turn = 0;
    // ga stays at the start of A's list under union gathers: it is searched, not walked.
    union_gather = union_allowed && kind == Kind::kVs && valid_b;
  }

  // Whether consumer rows [m0w, m0w + 64) must mask piece [ts, te) with membership w0/w1.
  template <class P>
  MPREFILL_HD static bool need_mask(P const& p, int64_t m0w, int ts, int te, uint64_t w0,
                                    uint64_t w1) {
    if (te - ts < kBlockN || w0 != ~0ull || w1 != ~0ull || int64_t(te) - 1 > m0w) return true;
    return p.kind == Kind::kAShape && !(te <= p.n_init || (m0w + 63) - ts < p.n_local);
  }

  template <class P>
  MPREFILL_HD void next(P const& p, TileDesc& d) {
    d.ts = d.te = 0;
    d.gw = -1;
    d.flags = 0;
    d.a0 = d.a1 = d.b0 = d.b1 = 0;
    d.end = false;
    if (s >= uhi && (ua.has || ub.has)) {
      // (Explicit branches: a reference chosen at run time would put the walkers in
      // local memory.)
      if (ua.has && (!ub.has || ua.lo <= ub.lo)) {
        ulo = ua.lo;
        uhi = ua.hi;
        ua.advance(kind);
      } else {
        ulo = ub.lo;
        uhi = ub.hi;
        ub.advance(kind);
      }
      for (;;) {
        if (ua.has && ua.lo <= uhi) {
          uhi = imax(uhi, ua.hi);
          ua.advance(kind);
        } else if (ub.has && ub.lo <= uhi) {
          uhi = imax(uhi, ub.hi);
          ub.advance(kind);
        } else {
          break;
        }
      }
      s = ulo;
    }
    if (s < uhi) {
      const int ts = s, te = imin(s + kBlockN, uhi);
      s = te;
      const int mid = imin(ts + 64, te);
      d.ts = ts;
      d.te = te;
      d.a0 = member_bits(ma, kind, ts, mid);
      d.a1 = te > mid ? member_bits(ma, kind, mid, te) : 0;
      d.b0 = member_bits(mb, kind, ts, mid);
      d.b1 = te > mid ? member_bits(mb, kind, mid, te) : 0;
      // Union gathers: A's gathered columns inside this piece (in B's ranges) are A's too;
      // they are outside A's ranges, so such a piece is masked anyway.
      bool a_extra = false;
      if (union_gather) {
        const int64_t q = lower_bound(p.col, ga, ga_end, ts);
        a_extra = q < ga_end && MPREFILL_LDG(p.col + q) < te;
      }
      if (d.a0 | d.a1 || a_extra)
        d.flags |= kUse0 | (need_mask(p, m0a, ts, te, d.a0, d.a1) ? kMask0 : 0u);
      if (d.b0 | d.b1)
        d.flags |= (kUse0 << 1) | (need_mask(p, m0a + 64, ts, te, d.b0, d.b1) ? kMask0 << 1 : 0u);
      return;
    }
    if (union_gather ? gb < gb_end : (ga < ga_end || gb < gb_end)) {
      const int gw = union_gather ? 1 : ((turn == 0 && ga < ga_end) || gb >= gb_end ? 0 : 1);
      turn = gw ^ 1;
      const int ts = int(gw == 0 ? ga : gb);
      const int te = int(lmin(int64_t(ts) + kBlockN, gw == 0 ? ga_end : gb_end));
      if (gw == 0) {
        ga = te;
      } else {
        gb = te;
      }
      const int mid = imin(ts + 64, te);
      const uint64_t w0 = bit_span(0, mid - ts), w1 = bit_span(0, te - mid);
      d.ts = ts;
      d.te = te;
      d.gw = gw;
      if (gw == 0) {
        d.a0 = w0;
        d.a1 = w1;
      } else {
        d.b0 = w0;
        d.b1 = w1;
      }
      d.flags = ((kUse0 | kMask0) << gw) | kGather;
      // Union: A uses the tile iff A's list has a column in [col[ts], col[te - 1]] (a
      // superset test: such a column is in this tile or in B's ranges).
      if (union_gather) {
        const int64_t q = lower_bound(p.col, ga, ga_end, MPREFILL_LDG(p.col + ts));
        if (q < ga_end && MPREFILL_LDG(p.col + q) <= MPREFILL_LDG(p.col + te - 1))
          d.flags |= kUse0 | kMask0;
      }
      return;
    }
    d.end = true;
  }

  // Global key position of key row t of tile d (INT32_MAX past the tile's end).
  template <class P>
  MPREFILL_HD static int key(P const& p, TileDesc const& d, int t) {
    const int pos = d.ts + t;
    if (pos >= d.te) return INT32_MAX;
    return d.gw >= 0 ? MPREFILL_LDG(p.col + pos) : pos;
  }

  // Consumer 0's membership of key row t (key = key(p, d, t)): its intervals, and under
  // union gathers its gathered columns (binary search in A's list) when it uses the tile.
  template <class P>
  MPREFILL_HD bool member_a(P const& p, TileDesc const& d, int t, int key) const {
    const uint64_t w = t < 64 ? d.a0 : d.a1;
    if ((w >> (t & 63)) & 1ull) return true;
    if (!union_gather || !(d.flags & kUse0) || d.ts + t >= d.te) return false;
    const int64_t q = lower_bound(p.col, ga, ga_end, key);
    return q < ga_end && MPREFILL_LDG(p.col + q) == key;
  }
  MPREFILL_HD static bool member_b(TileDesc const& d, int t) {
    return ((t < 64 ? d.b0 : d.b1) >> (t & 63)) & 1ull;
  }
};

}  // namespace mprefill::cuda::walk
