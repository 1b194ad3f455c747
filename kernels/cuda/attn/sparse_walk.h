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
//   Owner tiles (owner_max > 0; VS and block-sparse): a union interval of at most
//      owner_max keys is not cut into pieces; each consumer takes its own keys in it as
//      64-key halves (each from its next member key), two halves per tile (two TMA boxes
//      of 64 rows), used by that consumer alone, owners alternating. A lone slash (A
//      [x, x + 64), B [x + 64, x + 128)) or two unrelated block lists then cost each
//      consumer its own 64-key pieces instead of a 128-key piece half its own. A half left
//      over waits for its owner's next short interval; the last ones go before the
//      gathers. Under union gathers an interval holding A's gathered columns stays pieces.
// A consumer masks a tile (key <= row && member && A-shape predicate) unless every key of
// the tile is a member and visible to each of its 64 rows.
//
// Positions are 32-bit: the launcher runs the walk only when every global query and key
// position is below 2^31 - 256 (sparse::sparse_v2_positions_ok).
#pragma once
#include <climits>
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

// Flags of a K slot: consumer w uses the tile (kUse0 << w) / masks it (kMask0 << w);
// kHalves: an owner tile of two 64-key halves (TileDesc).
constexpr uint32_t kUse0 = 1, kMask0 = 4, kGather = 16, kEnd = 32, kHalves = 64;

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
// Owner tile (kHalves): keys [ts, te) in key rows 0..63 and [ts2, te2) in rows 64..127
// (te2 == ts2: no second half), a0/a1 (or b0/b1) the owner's membership of each half.
struct TileDesc {
  int ts, te, ts2, te2, gw;
  uint32_t flags;
  uint64_t a0, a1, b0, b1;
  int64_t sa0, sa1;  // union gathers: A's gathered columns inside the tile, list positions
  bool end;
};

// The positions [c0, c1) of an ascending list's entries in [lo, hi] (hi inclusive), from
// cursor c on (entries before c are below lo); moves c to c1. Tiles ask in ascending key
// order within each phase, so the cursor only advances. One thread alone (the CPU
// replay); the producer's warps use WarpSpan (walk_sparse.cuh), which gives the same span
// with one coalesced load per 32 entries instead of a binary search per tile.
struct ScalarSpan {
  const int* col;
  MPREFILL_HD void operator()(int64_t& c, int64_t end, int lo, int hi, int64_t& c0,
                              int64_t& c1) const {
    c0 = lower_bound(col, c, end, lo);
    c1 = lower_bound(col, c0, end, int64_t(hi) + 1);
    c = c1;
  }
};

template <int kBlockN>
struct SparseWalk {
  static_assert(kBlockN == 128, "membership is two 64-bit words per consumer");
  KeyIntervals ua, ub, ma, mb;  // union walk, membership walk (A, B)
  int64_t ga, ga_end, gb, gb_end;
  int64_t cur_p, cur_g;  // union gathers: cursors into A's list (pieces, gathered tiles)
  int64_t m0a;
  int ulo, uhi, s;  // current union interval, next piece start
  int turn;         // alternating gathers: whose list goes next
  Kind kind;
  bool union_gather;
  // Owner tiles: the short interval's next half start per owner (h >= uhi: none left), the
  // pending half per owner, which owner goes first.
  int owner_max;
  bool short_iv;
  int oha, ohb, oturn;
  bool pa, pb;
  int pa_lo, pa_hi, pb_lo, pb_hi;
  uint64_t pa_bits, pb_bits;

  template <class P>
  MPREFILL_HD void init(P const& p, int head, int64_t m0a_, bool valid_b, bool union_allowed,
                        int owner_max_ = 0) {
    m0a = m0a_;
    kind = p.kind;
    init_intervals(ua, p, head, m0a, true, &ga, &ga_end);
    init_intervals(ub, p, head, m0a + 64, valid_b, &gb, &gb_end);
    ma = ua;
    mb = ub;
    cur_p = cur_g = ga;
    ulo = uhi = s = turn = 0;
    owner_max = kind == Kind::kAShape ? 0 : owner_max_;
    short_iv = pa = pb = false;
    oha = ohb = oturn = 0;
    pa_lo = pa_hi = pb_lo = pb_hi = 0;
    pa_bits = pb_bits = 0;
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
    next(p, d, ScalarSpan{p.col});
  }

  // The owner's next 64-key half in the short interval (from its next member key, ending
  // at uhi at the latest); false when the owner has no key left in it.
  MPREFILL_HD bool take_half(KeyIntervals& m, int& h, int& lo, int& hi, uint64_t& bits) {
    while (m.has && m.hi <= h) m.advance(kind);
    if (m.has && m.lo > h) h = m.lo;
    if (!m.has || h >= uhi) {
      h = uhi;
      return false;
    }
    lo = h;
    hi = imin(h + 64, uhi);
    h = hi;
    bits = member_bits(m, kind, lo, hi);
    return true;
  }

  // An owner tile for consumer w (m, h, pending: its walker, half cursor and leftover
  // half): the leftover or its next half, then its next half; with one half only, it is
  // kept as the leftover (or, when `flush`, sent alone). True when d holds a tile.
  MPREFILL_HD bool owner_tile(int w, KeyIntervals& m, int& h, bool& pend, int& plo, int& phi,
                              uint64_t& pbits, bool flush, TileDesc& d) {
    int lo0, hi0, lo1 = 0, hi1 = 0;
    uint64_t b0, b1 = 0;
    if (pend) {
      lo0 = plo;
      hi0 = phi;
      b0 = pbits;
    } else if (flush || !take_half(m, h, lo0, hi0, b0)) {
      return false;
    }
    if (flush || !take_half(m, h, lo1, hi1, b1)) {
      if (!flush) {
        pend = true;
        plo = lo0;
        phi = hi0;
        pbits = b0;
        return false;
      }
      lo1 = hi1 = lo0;  // no second half (its rows load a copy of the first: finite data)
      b1 = 0;
    }
    pend = false;
    d.ts = lo0;
    d.te = hi0;
    d.ts2 = lo1;
    d.te2 = hi1;
    const int64_t m0w = m0a + 64 * w;
    const bool mask = hi0 - lo0 < 64 || hi1 - lo1 < 64 || b0 != ~0ull || b1 != ~0ull ||
                      int64_t(hi0) - 1 > m0w || int64_t(hi1) - 1 > m0w;
    if (w == 0) {
      d.a0 = b0;
      d.a1 = b1;
    } else {
      d.b0 = b0;
      d.b1 = b1;
    }
    d.flags = ((kUse0 | (mask ? kMask0 : 0u)) << w) | kHalves;
    return true;
  }

  // `span` finds A's gathered columns in a key range (ScalarSpan's contract).
  template <class P, class Span>
  MPREFILL_HD void next(P const& p, TileDesc& d, Span const& span) {
    d.ts = d.te = d.ts2 = d.te2 = 0;
    d.sa0 = d.sa1 = 0;
    d.gw = -1;
    d.flags = 0;
    d.a0 = d.a1 = d.b0 = d.b1 = 0;
    d.end = false;
    for (;;) {
      if (short_iv) {
        // (Explicit branches: a reference chosen at run time would put the walkers in
        // local memory.)
        if (oturn == 0) {
          if (owner_tile(0, ma, oha, pa, pa_lo, pa_hi, pa_bits, false, d)) return (void)(oturn = 1);
          if (owner_tile(1, mb, ohb, pb, pb_lo, pb_hi, pb_bits, false, d)) return (void)(oturn = 0);
        } else {
          if (owner_tile(1, mb, ohb, pb, pb_lo, pb_hi, pb_bits, false, d)) return (void)(oturn = 0);
          if (owner_tile(0, ma, oha, pa, pa_lo, pa_hi, pa_bits, false, d)) return (void)(oturn = 1);
        }
        short_iv = false;
      }
      if (s < uhi || !(ua.has || ub.has)) break;
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
      if (uhi - ulo <= owner_max) {
        bool a_cols = false;
        if (union_gather) {  // A's gathered columns in B's ranges need pieces
          const int64_t keep = cur_p;
          int64_t c0, c1;
          span(cur_p, ga_end, ulo, uhi - 1, c0, c1);
          a_cols = c1 > c0;
          cur_p = keep;
        }
        if (!a_cols) {
          short_iv = true;
          oha = ohb = ulo;
          s = uhi;
        }
      }
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
        span(cur_p, ga_end, ts, te - 1, d.sa0, d.sa1);
        a_extra = d.sa1 > d.sa0;
      }
      if (d.a0 | d.a1 || a_extra)
        d.flags |= kUse0 | (need_mask(p, m0a, ts, te, d.a0, d.a1) ? kMask0 : 0u);
      if (d.b0 | d.b1)
        d.flags |= (kUse0 << 1) | (need_mask(p, m0a + 64, ts, te, d.b0, d.b1) ? kMask0 << 1 : 0u);
      return;
    }
    if (pa && owner_tile(0, ma, oha, pa, pa_lo, pa_hi, pa_bits, true, d)) return;
    if (pb && owner_tile(1, mb, ohb, pb, pb_lo, pb_hi, pb_bits, true, d)) return;
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
        span(cur_g, ga_end, MPREFILL_LDG(p.col + ts), MPREFILL_LDG(p.col + te - 1), d.sa0, d.sa1);
        if (d.sa1 > d.sa0) d.flags |= kUse0 | kMask0;
      }
      return;
    }
    d.end = true;
  }

  // Global key position of key row t of tile d (INT32_MAX past the tile's end).
  template <class P>
  MPREFILL_HD static int key(P const& p, TileDesc const& d, int t) {
    if (d.flags & kHalves) {
      const int pos = t < 64 ? d.ts + t : d.ts2 + (t - 64);
      return pos < (t < 64 ? d.te : d.te2) ? pos : INT32_MAX;
    }
    const int pos = d.ts + t;
    if (pos >= d.te) return INT32_MAX;
    return d.gw >= 0 ? MPREFILL_LDG(p.col + pos) : pos;
  }

  // Consumer 0's membership of key row t (key = key(p, d, t)): its intervals, and under
  // union gathers its gathered columns (a search of the tile's span [sa0, sa1) of A's
  // list: a few entries, just loaded by the span) when it uses the tile.
  template <class P>
  MPREFILL_HD bool member_a(P const& p, TileDesc const& d, int t, int key) const {
    const uint64_t w = t < 64 ? d.a0 : d.a1;
    if ((w >> (t & 63)) & 1ull) return true;
    if (!union_gather || d.sa1 <= d.sa0 || d.ts + t >= d.te) return false;
    const int64_t q = lower_bound(p.col, d.sa0, d.sa1, key);
    return q < d.sa1 && MPREFILL_LDG(p.col + q) == key;
  }
  MPREFILL_HD static bool member_b(TileDesc const& d, int t) {
    return ((t < 64 ? d.b0 : d.b1) >> (t & 63)) & 1ull;
  }
};

// ---------------------------------------------------------------- tile plan
// A tile of a CTA's stream as the producer needs it, computable before the launch (NOTES
// §3 run 4: the walk's four interval walkers do not fit the producer's registers and take
// half of a sparse tile's time): the walk's TileDesc with consumer 0's gathered-column
// membership folded into a0 / a1 (so member_a needs no search) and the tile's largest key.
// Keys of row t follow SparseWalk::key; membership of consumer w is bit t of its words.
struct TileRec {
  int32_t ts, te, ts2, te2;
  uint32_t flags;
  int32_t gw;
  int32_t kmax;  // largest key position of the tile (INT32_MIN: none)
  int32_t pad;
  uint64_t a0, a1, b0, b1;
};
static_assert(sizeof(TileRec) == 64, "one 64-byte record per tile");

// The record's fields as the walk gave them (no gathered membership yet, kmax INT32_MIN).
MPREFILL_HD TileRec tile_rec_of(TileDesc const& d) {
  TileRec r;
  r.ts = d.ts;
  r.te = d.te;
  r.ts2 = d.ts2;
  r.te2 = d.te2;
  r.flags = d.flags;
  r.gw = d.gw;
  r.pad = 0;
  r.a0 = d.a0;
  r.a1 = d.a1;
  r.b0 = d.b0;
  r.b1 = d.b1;
  r.kmax = INT32_MIN;
  return r;
}

template <int kBlockN, class P>
MPREFILL_HD TileRec make_tile_rec(P const& p, SparseWalk<kBlockN> const& wk, TileDesc const& d) {
  TileRec r = tile_rec_of(d);
  for (int t = 0; t < kBlockN; ++t) {
    const int key = SparseWalk<kBlockN>::key(p, d, t);
    if (key == INT32_MAX) continue;
    r.kmax = key > r.kmax ? key : r.kmax;
    if (d.sa1 > d.sa0 && wk.member_a(p, d, t, key)) (t < 64 ? r.a0 : r.a1) |= 1ull << (t & 63);
  }
  return r;
}

// The whole tile stream of one CTA (as SparseWalk::init's arguments) into out[0, count),
// out null: count only. Returns the tile count.
template <int kBlockN, class P, class Span>
MPREFILL_HD int64_t plan_cta(P const& p, int head, int64_t m0a, bool valid_b, bool union_allowed,
                             int owner_max, Span const& span, TileRec* out) {
  SparseWalk<kBlockN> wk;
  wk.init(p, head, m0a, valid_b, union_allowed, owner_max);
  int64_t n = 0;
  for (;;) {
    TileDesc d;
    wk.next(p, d, span);
    if (d.end) return n;
    if (out) out[n] = make_tile_rec(p, wk, d);
    ++n;
  }
}

// Key position of key row t of a planned tile (SparseWalk::key's rule).
template <class P>
MPREFILL_HD int rec_key(P const& p, TileRec const& r, int t) {
  if (r.flags & kHalves) {
    const int pos = t < 64 ? r.ts + t : r.ts2 + (t - 64);
    return pos < (t < 64 ? r.te : r.te2) ? pos : INT32_MAX;
  }
  const int pos = r.ts + t;
  if (pos >= r.te) return INT32_MAX;
  return r.gw >= 0 ? MPREFILL_LDG(p.col + pos) : pos;
}
MPREFILL_HD bool rec_member(TileRec const& r, int w, int t) {
  const uint64_t word = w == 0 ? (t < 64 ? r.a0 : r.a1) : (t < 64 ? r.b0 : r.b1);
  return (word >> (t & 63)) & 1ull;
}

}  // namespace mprefill::cuda::walk
