// Sparse attention forward v2 (sm_90a): one CTA = TWO adjacent 64-row query blocks of one
// head, walking the UNION of their key tiles once, so that every K/V tile both blocks need
// is loaded once for 128 rows (v1 loads it per 64-row block: bench/NOTES.md measured 1.9x
// the L2 bytes per FLOP of the dense kernel). Same mask, same results as v1
// (sparse_fwd_kernel.cuh, whose Params and launch set-up this file uses; the device pieces
// shared with v1 and the dense kernel are in kernels/cuda/common/attention_common.cuh).
//
// Roles: warpgroup 0 = producer (all 128 threads walk the same tiles; one issues the TMA
// loads, all share the gathers); warpgroup 1 = consumer of block A (rows [m0, m0 + 64)),
// warpgroup 2 = consumer of block B (rows [m0 + 64, m0 + 128)); B is empty when A is the
// call's last block. One CTA per SM (Q 2 x 16 KB + kStages = 6 x 32 KB of K/V), setmaxnreg
// 88 / 208 (the CTA's pool is 3 x 168 per thread slot; the producer spills ~100 bytes).
//
// Key tiles (64 keys), in this order:
//   1. pieces of the union of A's and B's key intervals (VS: the canonical ranges of the
//      index; block-sparse: [64 j, 64 j + 64) per listed j, lists ascending as sparse.h
//      specifies; A-shape: [0, n_init) and the local window), each clipped to the shard and
//      to the block's causal bound; a union interval [lo, hi) is cut into [s, s + 64)
//      pieces from lo, loaded by TMA at the arbitrary row s - k_pos0;
//   2. gathered vertical columns (VS), 64 at a time, A's and B's lists separately and
//      alternating A, B, A, ... (so that both consumers work), loaded by 16-byte cp.async
//      and signalled with cp.async.mbarrier.arrive (no wait in the producer: up to kStages
//      gathers in flight, v1 had 2).
// Per slot the producer writes the 64 key positions (INT32_MAX past the tile's end), one
// 64-bit membership mask per consumer (bit j: key slot j belongs to that block's key set)
// and flags (which consumer uses the tile, which must mask it, end of stream). A consumer
// skips a tile it does not use; it masks a tile it uses with key <= row && member bit
// (&& the A-shape predicate) when the producer flagged it.
//
// Pipeline: one ring of kStages slots holding K and V of a tile; full[s] counts the 128
// producer threads (thread 0 also expects the TMA bytes; for a gather each thread adds a
// cp.async arrive before its own), empty[s] the 256 consumer threads. Each consumer
// overlaps S[n] with P.V of its previous own tile (as v1) and so holds that tile's slot
// until it issues the next one. Deadlock freedom: a consumer waiting for tile n holds at
// most its previous own tile p, with p > n - kStages (it finishes P.V and releases p before
// waiting for a tile kStages or more past p), so the producer, which fills tiles in order
// and needs tile n - kStages released by both consumers to fill n, can always fill the
// lowest tile a consumer waits for.
//
// Positions are 32-bit in the producer: the launcher uses v2 only when every global query
// and key position is below 2^31 - 256 (else v1).
#pragma once

#include "kernels/cuda/sparse/sparse_fwd_kernel.cuh"

namespace mprefill::cuda::sparse {

#ifndef MPREFILL_SPARSE_V2_STAGES
#define MPREFILL_SPARSE_V2_STAGES 6
#endif
// 2 x 64 query rows (one consumer warpgroup per query block) x 64 keys, one K/V ring.
template <typename Element_, int kHeadDim_>
struct SparseTraitsV2 : attn::TileTypes<Element_, 64, 64, kHeadDim_, MPREFILL_SPARSE_V2_STAGES, 1> {
  using Base = attn::TileTypes<Element_, 64, 64, kHeadDim_, MPREFILL_SPARSE_V2_STAGES, 1>;
  using V1 = SparseTraits<Element_, kHeadDim_>;  // Params and TMA boxes of v1
  using Element = Element_;
  static constexpr int kStages = Base::kStages;
  static constexpr int kNumThreads = 384;
  static constexpr int kProducerRegs = 88;
  static constexpr int kConsumerRegs = 208;
  static_assert(kStages >= 2, "the deadlock argument needs two slots");
  // setmaxnreg moves registers only within what the CTA got at launch: 384 threads x 168
  // (the __launch_bounds__(384, 1) cap) = 3 x 168 per thread slot. 96 / 208 (512) hung the
  // consumers' setmaxnreg.inc on the H100 (run 2 of v2, bench/NOTES.md).
  static_assert(kProducerRegs + 2 * kConsumerRegs <= 3 * 168, "register pool of the CTA");

  // Slot flags.
  static constexpr uint32_t kUse0 = 1, kMask0 = 4, kGather = 16, kEnd = 32;  // kUse1 = 2 ...

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<typename Base::SmemLayoutQ>, 1024> q0;
    cute::array_aligned<Element, cosize_v<typename Base::SmemLayoutQ>, 1024> q1;
    cute::array_aligned<Element, cosize_v<typename Base::SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cosize_v<typename Base::SmemLayoutV>, 1024> v;
    int32_t key[kStages][Base::kBlockN];  // positions < 2^31 - 256 (sparse_v2_positions_ok)
    uint64_t member[kStages][2];
    uint32_t flags[kStages];
    cutlass::arch::ClusterTransactionBarrier full[kStages];
    cutlass::arch::ClusterBarrier empty[kStages];
    cutlass::arch::ClusterTransactionBarrier bar_q;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");

  using Params = typename V1::Params;  // same fields; block_first/num_m_blocks count blocks
};

// Key intervals, membership bits and the blocks' interval set-up: kernels/cuda/attn/
// sparse_walk.h (shared with the skeleton's walker).
using walk::bit_span;
using walk::init_intervals;
using walk::KeyIntervals;
using walk::member_bits;

template <class T>
__global__ void __launch_bounds__(T::kNumThreads, 1)
    sparse_fwd_v2_kernel(CUTE_GRID_CONSTANT typename T::Params const p) {
  using Element = typename T::Element;
  constexpr int kBlockM = T::kBlockM, kBlockN = T::kBlockN, kHeadDim = T::kHeadDim;
  constexpr int kStages = T::kStages;

  extern __shared__ char smem_raw[];
  auto& ss = *reinterpret_cast<typename T::SharedStorage*>(smem_raw);

  const int num_pairs = (p.num_m_blocks + 1) / 2;
  const int64_t block_a =
      p.block_first + 2 * int64_t(num_pairs - 1 - int(blockIdx.x));  // last first
  const int64_t block_last = p.block_first + p.num_m_blocks - 1;
  const int64_t m0a = block_a * kBlockM;
  const bool valid_b = block_a + 1 <= block_last;
  const int head = blockIdx.y;
  const int kv_head = head / p.head_ratio;
  const int warp_group = cutlass::canonical_warp_group_idx();

  init_ring_barriers<kStages>(p, ss, [&](int i) {
    ss.full[i].init(128);
    ss.empty[i].init(256);
  });

  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename T::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename T::SmemLayoutV{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename T::SmemLayoutVt{});

  if (warp_group == 0) {
    // ------------------------------------------------------------ producer (warp 0)
    cutlass::arch::warpgroup_reg_dealloc<T::kProducerRegs>();
    const int tid = threadIdx.x;  // 0..127, every producer thread walks the same tiles
    const Kind kind = p.kind;
    KeyIntervals ua, ub, ma, mb;  // union walk, membership walk (A, B)
    int64_t ga, ga_end, gb, gb_end;
    init_intervals(ua, p, head, m0a, true, &ga, &ga_end);
    init_intervals(ub, p, head, m0a + 64, valid_b, &gb, &gb_end);
    ma = ua;
    mb = ub;
    const bool ashape = kind == Kind::kAShape;

    Tensor sQ0 = make_tensor(make_smem_ptr(ss.q0.data()), typename T::SmemLayoutQ{});
    Tensor sQ1 = make_tensor(make_smem_ptr(ss.q1.data()), typename T::SmemLayoutQ{});
    Tensor mQ = p.tma_q.get_tma_tensor(make_shape(p.n_q, int32_t(kHeadDim), p.num_heads));
    Tensor mK = p.tma_k.get_tma_tensor(make_shape(p.n_k, int32_t(kHeadDim), p.num_kv_heads));
    Tensor mV = p.tma_v.get_tma_tensor(make_shape(p.n_k, int32_t(kHeadDim), p.num_kv_heads));
    const Element* k_base = p.k + int64_t(kv_head) * p.k_head_stride;
    const Element* v_base = p.v + int64_t(kv_head) * p.v_head_stride;

    // Whether consumer w (rows [m0w, m0w + 64)) must mask tile [s, e) with membership mw.
    auto need_mask = [&](int64_t m0w, int s, int e, uint64_t mw) {
      if (e - s < kBlockN || mw != ~0ull || int64_t(e) - 1 > m0w) return true;
      return ashape && !(e <= p.n_init || (m0w + kBlockM - 1) - s < p.n_local);
    };

    int stage = 0;
    uint32_t phase = 0;
    bool q_issued = false;
    int ulo = 0, uhi = 0, s = 0;  // current union interval, next piece start
    int turn = 0;                 // gathers: whose list goes next
    for (;;) {
      // ---- next tile
      int ts = 0, te = 0;
      uint32_t flags = 0;
      uint64_t mem_a = 0, mem_b = 0;
      bool gather = false;
      int gw = 0;
      if (s >= uhi) {
        if (ua.has || ub.has) {
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
              uhi = cute::max(uhi, ua.hi);
              ua.advance(kind);
            } else if (ub.has && ub.lo <= uhi) {
              uhi = cute::max(uhi, ub.hi);
              ub.advance(kind);
            } else {
              break;
            }
          }
          s = ulo;
        }
      }
      if (s < uhi) {
        ts = s;
        te = cute::min(s + kBlockN, uhi);
        s = te;
        mem_a = member_bits(ma, kind, ts, te);
        mem_b = member_bits(mb, kind, ts, te);
        if (mem_a) flags |= T::kUse0 | (need_mask(m0a, ts, te, mem_a) ? T::kMask0 : 0u);
        if (mem_b)
          flags |= (T::kUse0 << 1) | (need_mask(m0a + 64, ts, te, mem_b) ? T::kMask0 << 1 : 0u);
      } else if (ga < ga_end || gb < gb_end) {
        gw = (turn == 0 && ga < ga_end) || gb >= gb_end ? 0 : 1;
        turn = gw ^ 1;
        ts = int(gw == 0 ? ga : gb);
        te = int(cute::min<int64_t>(int64_t(ts) + kBlockN, gw == 0 ? ga_end : gb_end));
        if (gw == 0) {
          ga = te;
          mem_a = bit_span(0, te - ts);
        } else {
          gb = te;
          mem_b = bit_span(0, te - ts);
        }
        gather = true;
        flags = ((T::kUse0 | T::kMask0) << gw) | T::kGather;
      } else {
        // ---- end of stream
        ss.empty[stage].wait(phase ^ 1);
        if (tid == 0) ss.flags[stage] = T::kEnd;
        ss.full[stage].arrive();
        return;
      }

      // The Q, K and V loads below are written out rather than taken from attention_common.cuh
      // (tma_load_rows, RowGather), as v1 does: at 88 registers this producer spills, and
      // ptxas (CUDA 13.0) spills more with the helpers inlined (-Xptxas -v).
      if (!q_issued) {
        q_issued = true;
        if (tid == 0) {
          ss.bar_q.arrive_and_expect_tx(2 * T::kTmaBytesQ);
          CUTLASS_PRAGMA_UNROLL
          for (int w = 0; w < 2; ++w) {
            Tensor gQ = local_tile(
                domain_offset(make_coord(int32_t(m0a + 64 * w - p.q_pos0), _0{}), mQ(_, _, head)),
                Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(_0{}, _0{}));
            auto [tQg, tQs] =
                tma_partition(p.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(w == 0 ? sQ0 : sQ1),
                              group_modes<0, 2>(gQ));
            copy(p.tma_q.with(reinterpret_cast<uint64_t&>(ss.bar_q), 0), tQg, tQs);
          }
        }
      }

      // ---- fill slot `stage`
      ss.empty[stage].wait(phase ^ 1);
      auto& full = ss.full[stage];
      const int* col = p.col;
      if (tid < kBlockN) {
        const int pos = ts + tid;
        ss.key[stage][tid] = pos >= te ? INT32_MAX : (gather ? __ldg(col + pos) : pos);
      }
      if (tid == 0) {
        ss.member[stage][0] = mem_a;
        ss.member[stage][1] = mem_b;
        ss.flags[stage] = flags;
      }
      if (!gather) {
        if (tid == 0) {
          full.arrive_and_expect_tx(2 * T::kTmaBytesKV);
          CUTLASS_PRAGMA_UNROLL
          for (int kv = 0; kv < 2; ++kv) {
            auto& tma = kv == 0 ? p.tma_k : p.tma_v;
            Tensor gX = local_tile(domain_offset(make_coord(int32_t(ts - p.k_pos0), _0{}),
                                                 (kv == 0 ? mK : mV)(_, _, kv_head)),
                                   Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_0{}, _0{}));
            auto [tXg, tXs] =
                tma_partition(tma, _0{}, Layout<_1>{}, group_modes<0, 2>(kv == 0 ? sK : sV),
                              group_modes<0, 2>(gX));
            copy(tma.with(reinterpret_cast<uint64_t&>(full), 0), tXg, tXs(_, stage));
          }
        } else {
          full.arrive();
        }
      } else {
        // Thread tid copies 16-byte chunk ch of rows row0 + i * kRowStep (K and V); the
        // column indices are loaded first (independent loads), then the copies issued.
        constexpr int kChunksPerRow = kHeadDim / 8;
        constexpr int kRowStep = 128 / kChunksPerRow;
        constexpr int kIters = kBlockN / kRowStep;
        const int ch = tid % kChunksPerRow, row0 = tid / kChunksPerRow;
        int cols[kIters];
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < kIters; ++i) {
          const int pos = ts + row0 + i * kRowStep;
          cols[i] = pos < te ? __ldg(col + pos) : -1;
        }
        CUTLASS_PRAGMA_UNROLL
        for (int kv = 0; kv < 2; ++kv) {
          const Element* base = kv == 0 ? k_base : v_base;
          const int64_t row_stride = kv == 0 ? p.k_row_stride : p.v_row_stride;
          auto& sX = kv == 0 ? sK : sV;  // swizzled: address through the tensor
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < kIters; ++i) {
            const bool ok = cols[i] >= 0;
            const Element* src =
                base + (ok ? (int64_t(cols[i]) - p.k_pos0) * row_stride : 0) + ch * 8;
            cp_async_16(cute::cast_smem_ptr_to_uint(&sX(row0 + i * kRowStep, ch * 8, stage)), src,
                        ok);
          }
        }
        // The phase cannot complete before these copies have landed (pending count +1 now,
        // -1 when they complete), nor before the regular arrive below.
        cutlass::arch::cpasync_barrier_arrive(reinterpret_cast<uint64_t const*>(&full));
        full.arrive();
      }
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
    }
  }

  // -------------------------------------------------------------- consumers
  cutlass::arch::warpgroup_reg_alloc<T::kConsumerRegs>();
  const int w = warp_group - 1;  // 0: block A, 1: block B
  const int tidx = int(threadIdx.x) - 128 * warp_group;
  const int64_t m0 = m0a + 64 * w;
  typename T::TiledMmaS mma_s;
  typename T::TiledMmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tidx);
  auto thr_o = mma_o.get_thread_slice(tidx);
  Tensor sQ =
      make_tensor(make_smem_ptr(w == 0 ? ss.q0.data() : ss.q1.data()), typename T::SmemLayoutQ{});

  Tensor tOrO = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor O_rc = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
  Tensor cO_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
  constexpr int kRows = decltype(size<0>(O_rc))::value;
  OnlineSoftmax<kRows> softmax;
  clear(tOrO);

  Tensor tSrQ = thr_s.partition_fragment_A(sQ);
  Tensor tSrK = thr_s.partition_fragment_B(sK);
  Tensor tOrV = thr_o.partition_fragment_B(sVt);
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor cS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
  const bool ashape = p.kind == Kind::kAShape;
  const float scale_log2 = p.scale_log2;
  const uint32_t use_bit = T::kUse0 << w, mask_bit = T::kMask0 << w;

  auto mask = [&](auto& tSrS, int st) {
    Tensor S = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
    const uint64_t mem = ss.member[st][w];
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < size<1>(S); ++c) {
      const int cc = get<1>(cS_rc(0, c));
      const int64_t key = ss.key[st][cc];
      const bool in = (mem >> cc) & 1ull;
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const int64_t row = m0 + get<0>(cS_rc(r, 0));
        bool vis = in && key <= row;
        if (ashape) vis = vis && (key < p.n_init || row - key < p.n_local);
        if (!vis) S(r, c) = -INFINITY;
      }
    }
  };
  Tensor rP =
      make_tensor_like<Element>(partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tOrP = make_tensor(rP.data(), acc_to_a_operand(rP.layout()));

  int stage = 0;
  uint32_t phase = 0;
  int idx = 0;                 // tile counter (slot = idx % kStages)
  int prev = 0, prev_idx = 0;  // slot / counter of the own tile whose P.V is pending
  bool pending = false, q_ready = false;
  // Issues the pending P.V alone and releases its slot.
  auto flush = [&]() {
    wg_gemm_issue<false>(mma_o, tOrP, tOrV(_, _, _, prev), tOrO);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    ss.empty[prev].arrive();
    pending = false;
  };
  for (;; ++idx) {
    if (pending && idx - prev_idx >= kStages) flush();
    ss.full[stage].wait(phase);
    const uint32_t f = ss.flags[stage];
    if (f & T::kEnd) break;
    if (!(f & use_bit)) {
      ss.empty[stage].arrive();
    } else {
      if (f & T::kGather) cutlass::arch::fence_view_async_shared();  // cp.async data -> wgmma
      if (!q_ready) {
        ss.bar_q.wait(0);
        q_ready = true;
      }
      Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
      // Two straight-line branches, each ending with every wgmma retired, so that ptxas
      // can prove no accumulator is read while a wgmma writes it (else it serialises).
      if (pending) {
        wg_gemm_issue<true>(mma_s, tSrQ, tSrK(_, _, _, stage), tSrS);
        wg_gemm_issue<false>(mma_o, tOrP, tOrV(_, _, _, prev), tOrO);
        warpgroup_wait<1>();
        warpgroup_fence_operand(tSrS);
        if (f & mask_bit) mask(tSrS, stage);
        softmax.update(tSrS, scale_log2);
        warpgroup_wait<0>();
        warpgroup_fence_operand(tOrO);
        warpgroup_fence_operand(rP);
        ss.empty[prev].arrive();
      } else {
        wg_gemm_issue<true>(mma_s, tSrQ, tSrK(_, _, _, stage), tSrS);
        warpgroup_wait<0>();
        warpgroup_fence_operand(tSrS);
        if (f & mask_bit) mask(tSrS, stage);
        softmax.update(tSrS, scale_log2);
      }
      softmax.rescale(O_rc);
      convert_p(rP, tSrS);
      pending = true;
      prev = stage;
      prev_idx = idx;
    }
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
  if (pending) flush();

  // -------------------------------------------------------------- epilogue (as v1)
  store_o_lse<false>(
      p, head, tidx, O_rc, cO_rc, softmax,
      [&](int r) { return m0 + get<0>(cO_rc(r, 0)) - p.q_pos0; },  // int64_t local query row
      [&](int64_t row) { return row >= 0 && row < p.n_q; });
}

// True when v2 can run this call (32-bit positions in its producer).
inline bool sparse_v2_positions_ok(const AttentionParams& a) {
  constexpr int64_t kLimit = (int64_t(1) << 31) - 256;
  return a.q_pos0 + a.n_q + 128 < kLimit && a.k_pos0 + a.n_k < kLimit && a.k_pos0 > -kLimit;
}

}  // namespace mprefill::cuda::sparse

namespace mprefill::cuda::sparse {

// ---------------------------------------------------------------- launcher
// As run_sparse_fwd (v1): `sp` carries the pattern fields; checks done by the caller,
// plus sparse_v2_positions_ok(a).
template <class T>
Status run_sparse_fwd_v2(const AttentionParams& a, typename T::Params sp, cudaStream_t stream) {
  const typename T::Params p = sparse_params<typename T::V1>(a, sp);
  return launch_attention(sparse_fwd_v2_kernel<T>, dim3((p.num_m_blocks + 1) / 2, a.num_heads),
                          T::kNumThreads, T::kSmemBytes, stream, p, "launch sparse_fwd_v2_kernel");
}

}  // namespace mprefill::cuda::sparse
