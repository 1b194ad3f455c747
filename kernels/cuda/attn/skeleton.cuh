// One Hopper attention forward skeleton (sm_90a) with pluggable key-tile walkers.
//
// CTA = 128 query rows of one head (two 64-row consumer warpgroups, 1 and 2) and one
// producer warpgroup (0). Key tiles of kBlockN = 128 keys flow through two rings of
// kStages = 2 slots, one for K and one for V, in the consumption order of the dense
// flash kernel: K[0], then K[n + 1] before V[n], so that a consumer can issue S[n + 1] =
// Q K[n + 1]^T while P V[n] still holds V[n]. The WALKER decides which keys a tile holds
// (a TMA box of 128 rows at any key offset, or 128 listed rows gathered by cp.async), in
// what order, and which of them each consumer must mask; the skeleton owns everything
// else: barriers, pingpong between the two consumers (one's softmax overlaps the other's
// GEMMs), S[n] overlapped with P V[n - 1] inside a consumer, online softmax in exp2,
// rescale, O / LSE epilogue.
//
// Walker contract (walk_sparse.cuh is the first walker):
//   Walker::cta(p, blockIdx.x, blockIdx.y) -> the CTA's head and first query row (global
//   position row0). Walker::produce<T>(p, ss, cta, tid) runs on all 128 producer threads:
//   per tile, after K slot (stage, phase) is free, it writes the slot's key positions,
//   membership words and flags, then loads K (load_tile: every producer thread arrives
//   on full_k, count 128); after the NEXT tile's K it loads this tile's V; it ends the
//   stream with a K slot whose flags are kEnd (then the last tile's V). It also writes the
//   slot's largest key position (kmax), and Walker::causal_only(p) says whether
//   visibility is key <= row alone.
//   Consumer side: the flags say, per consumer w, whether it uses the tile (kUse0 << w)
//   and must mask it (kMask0 << w); a masked cell (row, key row c) stays iff c's
//   membership bit is set and Walker::visible(p, key[c], row). A consumer that does not
//   use a tile skips its GEMMs but still takes its pingpong turn and releases the slots
//   in order.
//
// Deadlock freedom (2 stages, separate rings): the producer issues K[n + 1] before V[n];
// a consumer holds at most the V slot of its pending tile (n - 1) while waiting for K[n]:
// K[n] needs K slot n - 2 released (released right after S[n - 2] was masked) and V[n -
// 1] needs V slot n - 3 released (released at tile n - 2 at the latest). A consumer that
// skips tile n first flushes its pending P V (releases V[n - 1]) and then waits for and
// releases V[n] itself, so V slots are always released in tile order.
#pragma once

#include "kernels/cuda/attn/sparse_walk.h"
#include "kernels/cuda/common/attention_common.cuh"

namespace mprefill::cuda::skel {

using namespace cute;
using namespace attn;

// Flags of a K slot (sparse_walk.h): kUse0 << w / kMask0 << w, kGather, kEnd.
using walk::kEnd;
using walk::kGather;
using walk::kHalves;
using walk::kMask0;
using walk::kUse0;

#ifndef MPREFILL_SKEL_STAGES
#define MPREFILL_SKEL_STAGES 2
#endif
// 128 query rows (two consumer warpgroups of 64) x 128 keys, MPREFILL_SKEL_STAGES K/V
// stages (2: 160 KB of smem with Q at head_dim 128; 3 fits, 224 KB).
template <typename Element_, int kHeadDim_>
struct SkelTraits : attn::TileTypes<Element_, 128, 128, kHeadDim_, MPREFILL_SKEL_STAGES, 2> {
  using Base = attn::TileTypes<Element_, 128, 128, kHeadDim_, MPREFILL_SKEL_STAGES, 2>;
  using Element = Element_;
  static constexpr int kStages = Base::kStages;
  static constexpr int kNumMmaThreads = 256;
  static constexpr int kNumThreads = 384;
  // setmaxnreg moves registers within the CTA's launch pool, 384 x 168 = 3 x 168 per
  // thread slot: the producer's walkers need more than the dense kernel's 24. ptxas
  // (nvcc 13.0, bf16 / 128, sparse walker): producer 72 / consumers 216 spill 200 bytes
  // (stores) and 380 (loads) per thread, 88: 120 / 244, 104: 36 / 96, 120 / 192: none,
  // 136 / 184: 64 / 64.
#ifndef MPREFILL_SKEL_PRODUCER_REGS
#define MPREFILL_SKEL_PRODUCER_REGS 120
#endif
  static constexpr int kProducerRegs = MPREFILL_SKEL_PRODUCER_REGS;
  static constexpr int kConsumerRegs = (3 * 168 - kProducerRegs) / 2 / 8 * 8;
  static_assert(kProducerRegs + 2 * kConsumerRegs <= 3 * 168, "register pool of the CTA");

  // Rows [0, 64) of one K / V slot (rows [64, 128) are the same layout kHalfElems further:
  // 8 whole 8-row atoms), the smem side of a 64-row TMA box (owner tiles' halves).
  using SmemLayoutKHalf =
      decltype(composition(take<0, 2>(typename Base::SmemLayoutK{}),
                           Layout<Shape<_64, Int<kHeadDim_>>, Stride<_1, Int<Base::kBlockN>>>{}));
  using TmaKVHalf =
      decltype(make_tma_copy(SM90_TMA_LOAD{},
                             make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)),
                                         typename Base::GmemLayoutQKV{}),
                             SmemLayoutKHalf{}, Shape<_64, Int<kHeadDim_>>{}, _1{}));
  static constexpr int kHalfElems = 64 * 64;
  static constexpr int kSlotElems = Base::kBlockN * kHeadDim_;

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<typename Base::SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<typename Base::SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cosize_v<typename Base::SmemLayoutV>, 1024> v;
    int32_t key[kStages][Base::kBlockN];  // global key position per K slot row (INT32_MAX: none)
    uint64_t member[kStages][2][2];       // [slot][consumer][word]: bit c = key row c is a member
    uint32_t flags[kStages];
    // Per slot and producer warp, the warp's largest key position (INT32_MIN: none): the
    // slot's largest key is their max (causal masking is needed only past it).
    int32_t kmax[kStages][4];
    cutlass::arch::ClusterTransactionBarrier full_k[kStages], full_v[kStages];
    cutlass::arch::ClusterBarrier empty_k[kStages], empty_v[kStages];
    cutlass::arch::ClusterTransactionBarrier bar_q;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "shared memory over the sm90 opt-in limit");
};

// ---------------------------------------------------------------- producer helpers
// Writes rows [ts, te) (global key positions; a gather reads them from list[ts, te)) of K
// or V into slot `stage` of sX: TMA box at key row ts - k_pos0 (rows past te belong to
// the box but not to the tile: masked by membership), or 16-byte cp.async gathers by the
// 128 producer threads. Arrives on `full` (count 128) once per thread; thread 0 expects
// the TMA bytes, a gathering thread first registers its copies (cp.async.mbarrier.arrive:
// the phase cannot complete before they land).
template <class T, class P, class TensorM, class TensorS>
CUTE_DEVICE void load_tile(P const& p, int tid, int kv_head, bool gather, const int* list, int ts,
                           int te, typename T::Element const* base, int64_t row_stride,
                           typename P::TmaKV const& tma, TensorM const& mX, TensorS& sX, int stage,
                           cutlass::arch::ClusterTransactionBarrier& full) {
  constexpr int kBlockN = T::kBlockN, kHeadDim = T::kHeadDim;
  if (!gather) {
    if (tid == 0) {
      full.arrive_and_expect_tx(T::kTmaBytesKV);
      tma_load_rows<kBlockN, kHeadDim>(tma, reinterpret_cast<uint64_t&>(full), mX, kv_head,
                                       int32_t(ts - p.k_pos0), sX, stage);
    } else {
      full.arrive();
    }
    return;
  }
  const RowGather<kBlockN, kHeadDim> g(tid, list, ts, te);
  g.issue(sX, stage, base, row_stride, p.k_pos0);
  cutlass::arch::cpasync_barrier_arrive(reinterpret_cast<uint64_t const*>(&full));
  full.arrive();
}

// Writes keys [r0, r0 + 64) and [r1, r1 + 64) (global key positions) of K or V into rows
// [0, 64) and [64, 128) of slot `stage` of sX (base: the ring's first element): two TMA
// boxes of 64 rows, one expect of a whole slot's bytes.
template <class T, class P, class TensorM>
CUTE_DEVICE void load_halves(P const& p, int tid, int kv_head, int r0, int r1,
                             typename T::TmaKVHalf const& tma, TensorM const& mX,
                             typename T::Element* base, int stage,
                             cutlass::arch::ClusterTransactionBarrier& full) {
  if (tid == 0) {
    full.arrive_and_expect_tx(T::kTmaBytesKV);
    typename T::Element* slot = base + stage * T::kSlotElems;
    Tensor s0 = make_tensor(make_smem_ptr(slot), typename T::SmemLayoutKHalf{});
    Tensor s1 = make_tensor(make_smem_ptr(slot + T::kHalfElems), typename T::SmemLayoutKHalf{});
    tma_load_rows<64, T::kHeadDim>(tma, reinterpret_cast<uint64_t&>(full), mX, kv_head,
                                   int32_t(r0 - p.k_pos0), s0);
    tma_load_rows<64, T::kHeadDim>(tma, reinterpret_cast<uint64_t&>(full), mX, kv_head,
                                   int32_t(r1 - p.k_pos0), s1);
  } else {
    full.arrive();
  }
}

// ---------------------------------------------------------------- consumer mainloop
// Runs the consumer side of the skeleton for consumer warpgroup w (rows [64 w, 64 w + 64)
// of the CTA's query tile, whose first row is the global position row0). Returns with O
// and the softmax state in the caller's registers.
template <class T, class Walker, class P, class TensorO, class Softmax>
CUTE_DEVICE void consume(P const& p, typename T::SharedStorage& ss, int w, int tidx, int64_t row0,
                         TensorO& tOrO, Softmax& softmax) {
  using Element = typename T::Element;
  constexpr int kBlockM = T::kBlockM, kBlockN = T::kBlockN, kStages = T::kStages;
  typename T::TiledMmaS mma_s;
  typename T::TiledMmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tidx);
  auto thr_o = mma_o.get_thread_slice(tidx);
  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename T::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename T::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename T::SmemLayoutVt{});
  Tensor O_rc = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);
  Tensor tSrK = thr_s.partition_fragment_B(sK);
  Tensor tOrV = thr_o.partition_fragment_B(sVt);
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor cS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
  constexpr int kRows = decltype(size<0>(cS_rc))::value;
  const float scale_log2 = p.scale_log2;
  const uint32_t use_bit = kUse0 << w, mask_bit = kMask0 << w;

  // A masked cell (key row c) stays iff c is a member and the key is visible to the row.
  // Per tile, one 32-bit keep mask per accumulator row (bit c = the thread's column c),
  // then one select per cell. Measured (H200, 64K, 2026-12-07): a visibility test per cell
  // was 47% of the (1000, 6096) class's time; tiles whose keys all lie at or below the
  // consumer's first row (all but ~1 per row block) need only the membership bits.
  static_assert(decltype(size<1>(cS_rc))::value == 32, "one 32-bit mask per row");
  const int64_t first_row = row0 + 64 * w;
  auto mask = [&](auto& tSrS, int slot) {
    Tensor S = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
    const uint64_t mem0 = ss.member[slot][w][0], mem1 = ss.member[slot][w][1];
    uint32_t in = 0;
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < 32; ++c) {
      const int cc = get<1>(cS_rc(0, c));
      in |= uint32_t(((cc < 64 ? mem0 : mem1) >> (cc & 63)) & 1ull) << c;
    }
    uint32_t keep[kRows];
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) keep[r] = in;
    const int32_t kmax =
        max(max(ss.kmax[slot][0], ss.kmax[slot][1]), max(ss.kmax[slot][2], ss.kmax[slot][3]));
    if (!(Walker::causal_only(p) && int64_t(kmax) <= first_row)) {
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < 32; ++c) {
        const int64_t key = ss.key[slot][get<1>(cS_rc(0, c))];
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < kRows; ++r)
          if (!Walker::visible(p, key, row0 + get<0>(cS_rc(r, 0)))) keep[r] &= ~(1u << c);
      }
    }
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < 32; ++c) {
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < kRows; ++r)
        if (!((keep[r] >> c) & 1u)) S(r, c) = -INFINITY;
    }
  };

  Tensor rP =
      make_tensor_like<Element>(partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tOrP = make_tensor(rP.data(), acc_to_a_operand(rP.layout()));

  // Pingpong: the consumers take turns issuing GEMMs; a consumer that skips a tile still
  // takes its turn, so the turn sequence stays A, B, A, B, ...
  auto turn_begin = [&]() { cutlass::arch::NamedBarrier::sync(2 * 128, w); };
  auto turn_end = [&]() { cutlass::arch::NamedBarrier::arrive(2 * 128, 1 - w); };
  if (w == 1) cutlass::arch::NamedBarrier::arrive(2 * 128, 0);  // consumer 0 goes first

  int sk = 0, sv = 0;
  uint32_t pk = 0, pv = 0;
  auto next_k = [&]() {
    if (++sk == kStages) sk = 0, pk ^= 1;
  };
  auto next_v = [&]() {
    if (++sv == kStages) sv = 0, pv ^= 1;
  };
  bool pending = false, pend_gather = false, q_ready = false;
  // Issues the pending P V alone (inside the caller's turn) and releases its V slot.
  auto flush = [&]() {
    ss.full_v[sv].wait(pv);
    if (pend_gather) cutlass::arch::fence_view_async_shared();
    wg_gemm_issue<false>(mma_o, tOrP, tOrV(_, _, _, sv), tOrO);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    ss.empty_v[sv].arrive();
    next_v();
    pending = false;
  };

  for (;;) {
    ss.full_k[sk].wait(pk);
    const uint32_t f = ss.flags[sk];
    if (f & kEnd) break;
    if (!(f & use_bit)) {
      // The pending P V goes out in this turn and is waited for after it, so that the
      // other consumer's GEMMs queue behind it. (Each branch ends with every wgmma
      // retired: see below.)
      if (pending) {
        turn_begin();
        ss.full_v[sv].wait(pv);
        if (pend_gather) cutlass::arch::fence_view_async_shared();
        wg_gemm_issue<false>(mma_o, tOrP, tOrV(_, _, _, sv), tOrO);
        turn_end();
        warpgroup_wait<0>();
        warpgroup_fence_operand(tOrO);
        ss.empty_v[sv].arrive();
        next_v();
        pending = false;
      } else {
        turn_begin();
        turn_end();
      }
      ss.empty_k[sk].arrive();
      next_k();
      ss.full_v[sv].wait(pv);  // this tile's V: released unread, in order
      ss.empty_v[sv].arrive();
      next_v();
      continue;
    }
    if (f & kGather) cutlass::arch::fence_view_async_shared();  // cp.async data -> wgmma
    if (!q_ready) {
      ss.bar_q.wait(0);
      q_ready = true;
    }
    Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
    // Two straight-line branches, each ending with every wgmma retired, so that ptxas
    // can prove no accumulator is read while a wgmma writes it (else it serialises).
    if (pending) {
      ss.full_v[sv].wait(pv);
      if (pend_gather) cutlass::arch::fence_view_async_shared();
      turn_begin();
      wg_gemm_issue<true>(mma_s, tSrQ, tSrK(_, _, _, sk), tSrS);
      wg_gemm_issue<false>(mma_o, tOrP, tOrV(_, _, _, sv), tOrO);
      turn_end();
      warpgroup_wait<1>();  // S done, P V still running
      warpgroup_fence_operand(tSrS);
      if (f & mask_bit) mask(tSrS, sk);
      ss.empty_k[sk].arrive();
      softmax.update(tSrS, scale_log2);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
      warpgroup_fence_operand(rP);
      ss.empty_v[sv].arrive();
      next_v();
    } else {
      turn_begin();
      wg_gemm_issue<true>(mma_s, tSrQ, tSrK(_, _, _, sk), tSrS);
      turn_end();
      warpgroup_wait<0>();
      warpgroup_fence_operand(tSrS);
      if (f & mask_bit) mask(tSrS, sk);
      ss.empty_k[sk].arrive();
      softmax.update(tSrS, scale_log2);
    }
    next_k();
    softmax.rescale(O_rc);
    convert_p(rP, tSrS);
    pending = true;
    pend_gather = (f & kGather) != 0;
  }
  // The last turn (both consumers take it, so the turn counts match).
  turn_begin();
  if (pending) flush();
  turn_end();
  if (w == 0) cutlass::arch::NamedBarrier::sync(2 * 128, 0);  // consume the last arrival
}

// ---------------------------------------------------------------- kernel
template <class T, class Walker>
__global__ void __launch_bounds__(T::kNumThreads, 1)
    skel_fwd_kernel(CUTE_GRID_CONSTANT typename Walker::template Params<T> const p) {
  // A walker may ask for its own register split (Walker::kProducerRegs > 0).
  constexpr int kProducerRegs =
      Walker::kProducerRegs > 0 ? Walker::kProducerRegs : T::kProducerRegs;
  constexpr int kConsumerRegs = (3 * 168 - kProducerRegs) / 2 / 8 * 8;
  static_assert(kProducerRegs + 2 * kConsumerRegs <= 3 * 168, "register pool of the CTA");
  extern __shared__ char smem_raw[];
  auto& ss = *reinterpret_cast<typename T::SharedStorage*>(smem_raw);
  const int warp_group = cutlass::canonical_warp_group_idx();
  const typename Walker::Cta cta = Walker::cta(p, int(blockIdx.x), int(blockIdx.y));

  init_ring_barriers<T::kStages>(p, ss, [&](int i) {
    ss.full_k[i].init(128);
    ss.full_v[i].init(128);
    ss.empty_k[i].init(T::kNumMmaThreads);
    ss.empty_v[i].init(T::kNumMmaThreads);
  });

  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    Walker::template produce<T>(p, ss, cta, int(threadIdx.x));
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  const int tidx = int(threadIdx.x) - 128;  // [0, 256): both consumer warpgroups
  typename T::TiledMmaO mma_o;
  auto thr_o = mma_o.get_thread_slice(tidx);
  Tensor tOrO = partition_fragment_C(mma_o, Shape<Int<T::kBlockM>, Int<T::kHeadDim>>{});
  Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<Int<T::kBlockM>, Int<T::kHeadDim>>{}));
  Tensor O_rc = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
  Tensor cO_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
  constexpr int kRows = decltype(size<0>(O_rc))::value;
  OnlineSoftmax<kRows> softmax;
  clear(tOrO);

  consume<T, Walker>(p, ss, warp_group - 1, tidx, cta.row0, tOrO, softmax);

  store_o_lse<true>(
      p, cta.head, tidx, O_rc, cO_rc, softmax,
      [&](int r) { return cta.row0 + get<0>(cO_rc(r, 0)) - p.q_pos0; },  // local query row
      [&](int64_t row) { return row >= 0 && row < p.n_q; });
}

}  // namespace mprefill::cuda::skel
