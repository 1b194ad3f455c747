// Hopper sparse attention forward (vertical-slash, block-sparse, A-shape): traits,
// kernel and launcher template. Built from the machinery it shares with the dense kernel
// (kernels/cuda/common/attention_common.cuh): CuTe WGMMA (SS for S = Q K^T, RS for
// O += P V), TMA loads, online softmax in exp2, S[n] overlapped with P V[n-1].
//
// One CTA = one 64-row query block b (global rows [m0, m0 + 64), m0 = 64 b) of one head,
// because the mask is defined per 64-row block: the block's own key list is walked, so
// every computed tile belongs to the block's mask. Warpgroup 0 = producer (all 128
// threads), warpgroup 1 = consumer (64 rows). Two CTAs per SM (81 KB smem, 256 threads,
// setmaxnreg 64 / 192) so one CTA's softmax overlaps the other's tensor-core work
// (measured: +36% over one CTA per SM, bench/NOTES.md).
//
// Key tiles (64 keys each), in this order:
//   1. every column range [lo, hi) of the block, clipped to the shard [k_pos0, k_pos0 +
//      n_k) and to keys < m0 + 64, in 64-key pieces [s, min(s + 64, hi)) loaded by TMA at
//      the arbitrary row s - k_pos0 (rows past n_k are zero-filled by TMA);
//   2. the block's gathered vertical columns inside the shard, 64 at a time, loaded by the
//      128 producer threads with 16-byte cp.async (zero fill past the list's end) into the
//      same swizzled smem layout (TMA gather is Blackwell-only).
// Q is loaded by TMA at row m0 - q_pos0 (may be negative: rows outside [0, n_q) are
// zero-filled and never stored).
// The producer also stores each tile's 64 global key positions in smem (INT64_MAX for a
// slot past the tile's end), so the consumer's mask is one predicate for every kind:
// key <= row (causal) && (A-shape: key < n_init || row - key < n_local).
// Ranges: VS = the index's canonical ranges; block-sparse = [64 j, 64 j + 64) per listed
// j; A-shape = [0, n_init) and [m0 - n_local + 1, m0 + 64) (merged when they touch).
//
// Pipelines: separate K and V rings of kStages slots; full barriers count the 128
// producer threads (one also expects the TMA bytes), empty barriers the 128 consumer
// threads. A cp.async tile is signalled one step late (cp.async.wait_group 1, then
// fence.proxy.async, then arrive), so two gathers are in flight; with 2 stages this
// cannot deadlock (the slot waited for is freed by a consumer step that only needs
// tiles loaded before the pending one).
#pragma once

#include <climits>

#include "kernels/cuda/common/attention_common.cuh"

namespace mprefill::cuda::sparse {

using namespace cute;
using namespace attn;

using Kind = walk::Kind;  // kVs, kBlockSparse, kAShape (kernels/cuda/attn/sparse_walk.h)

// ---------------------------------------------------------------- traits
#ifndef MPREFILL_SPARSE_STAGES
#define MPREFILL_SPARSE_STAGES 2
#endif
// 64 query rows (one consumer warpgroup) x 64 keys.
template <typename Element_, int kHeadDim_>
struct SparseTraits : attn::TileTypes<Element_, 64, 64, kHeadDim_, MPREFILL_SPARSE_STAGES, 1> {
  using Base = attn::TileTypes<Element_, 64, 64, kHeadDim_, MPREFILL_SPARSE_STAGES, 1>;
  using Element = Element_;
  static constexpr int kStages = Base::kStages;
  static constexpr int kNumThreads = 256;
#ifndef MPREFILL_SPARSE_CTAS_PER_SM
#define MPREFILL_SPARSE_CTAS_PER_SM 2
#endif
  static constexpr int kCtasPerSm = MPREFILL_SPARSE_CTAS_PER_SM;
#ifndef MPREFILL_SPARSE_PRODUCER_REGS
#define MPREFILL_SPARSE_PRODUCER_REGS 64
#endif
  static constexpr int kProducerRegs = MPREFILL_SPARSE_PRODUCER_REGS;
  static constexpr int kConsumerRegs = kCtasPerSm == 2 ? 256 - kProducerRegs : 240;
  static_assert(kStages == 2, "the one-step-late cp.async signalling is proven for 2 stages");
  static_assert((kProducerRegs + kConsumerRegs) * 128 * kCtasPerSm <= 65536, "register file");

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<typename Base::SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<typename Base::SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cosize_v<typename Base::SmemLayoutV>, 1024> v;
    int64_t key[kStages][Base::kBlockN];  // global key position of each K slot column
    cutlass::arch::ClusterTransactionBarrier full_k[kStages], full_v[kStages];
    cutlass::arch::ClusterBarrier empty_k[kStages], empty_v[kStages];
    cutlass::arch::ClusterTransactionBarrier bar_q;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes * kCtasPerSm <= 227 * 1024, "two CTAs per SM must fit");

  struct Params {
    typename Base::TmaQ tma_q;
    typename Base::TmaKV tma_k;
    typename Base::TmaKV tma_v;
    const Element* k;  // gather sources (token-major, strides in elements)
    const Element* v;
    int64_t k_row_stride, k_head_stride, v_row_stride, v_head_stride;
    Element* o;
    float* lse;
    int64_t o_row_stride, o_head_stride, lse_head_stride;
    int32_t n_q, n_k, num_heads, num_kv_heads, head_ratio;
    int64_t q_pos0, k_pos0;
    int64_t block_first;  // first global query block of the call
    int32_t num_m_blocks;
    float scale, scale_log2;
    Kind kind;
    // vertical-slash
    int64_t nblocks;
    const int64_t* range_ptr;
    const int* range_lo;
    const int* range_hi;
    const int64_t* col_ptr;
    const int* col;
    int head_offset;
    // block-sparse
    const int* blocks;
    int bs_k;
    // A-shape
    int64_t n_init, n_local;
  };
};

// One key tile: global keys [s, e) of a range, or list positions [s, e) of ix.col.
struct Tile {
  int64_t s, e;
  bool gather;
};

// Walks a query block's key tiles (ranges, then gathered columns) in a fixed order; the
// producer and the consumer each run one and see the same sequence.
struct TileCursor {
  Kind kind;
  int64_t klo, khi;  // visible keys of the block: [klo, khi) (shard and causal bound)
  int64_t r_base, nr, ri, s;
  const int* lo_arr;
  const int* hi_arr;
  const int* list;
  int64_t a_lo0, a_hi0, a_lo1, a_hi1;  // A-shape ranges (scalars: no local memory)
  int64_t g, g_end;

  template <class P>
  CUTE_DEVICE TileCursor(P const& p, int head, int64_t m0) {
    kind = p.kind;
    klo = cute::max<int64_t>(p.k_pos0, 0);
    khi = cute::min<int64_t>(p.k_pos0 + p.n_k, m0 + 64);
    ri = 0;
    s = INT64_MIN;
    g = g_end = 0;
    nr = 0;
    if (khi <= klo) return;
    const int64_t b = m0 / 64;
    if (kind == Kind::kVs) {
      const int64_t hb = int64_t(p.head_offset + head) * p.nblocks + b;
      r_base = p.range_ptr[hb];
      nr = p.range_ptr[hb + 1] - r_base;
      lo_arr = p.range_lo;
      hi_arr = p.range_hi;
      vs_column_span(p, hb, klo, khi, g, g_end);
    } else if (kind == Kind::kBlockSparse) {
      list = p.blocks + (int64_t(p.head_offset + head) * p.nblocks + b) * p.bs_k;
      nr = p.bs_k;
    } else {
      nr = ashape_ranges(p, m0, a_lo0, a_hi0, a_lo1, a_hi1);
    }
  }

  CUTE_DEVICE bool next(Tile& t) {
    while (ri < nr) {
      int64_t lo, hi;
      if (kind == Kind::kVs) {
        lo = lo_arr[r_base + ri];
        hi = hi_arr[r_base + ri];
      } else if (kind == Kind::kBlockSparse) {
        const int j = list[ri];
        if (j < 0) {  // -1 padding ends the list
          nr = ri;
          break;
        }
        lo = int64_t(j) * 64;
        hi = lo + 64;
      } else {
        lo = ri == 0 ? a_lo0 : a_lo1;
        hi = ri == 0 ? a_hi0 : a_hi1;
      }
      lo = cute::max(lo, klo);
      hi = cute::min(hi, khi);
      if (s < lo) s = lo;
      if (s < hi) {
        t.s = s;
        t.e = cute::min<int64_t>(s + 64, hi);
        t.gather = false;
        s += 64;
        return true;
      }
      ++ri;
      s = INT64_MIN;
    }
    if (g < g_end) {
      t.s = g;
      t.e = cute::min<int64_t>(g + 64, g_end);
      t.gather = true;
      g += 64;
      return true;
    }
    return false;
  }
};

// ---------------------------------------------------------------- kernel
template <class T>
__global__ void __launch_bounds__(T::kNumThreads, T::kCtasPerSm)
    sparse_fwd_kernel(CUTE_GRID_CONSTANT typename T::Params const p) {
  using Element = typename T::Element;
  constexpr int kBlockM = T::kBlockM, kBlockN = T::kBlockN, kHeadDim = T::kHeadDim;
  constexpr int kStages = T::kStages;

  extern __shared__ char smem_raw[];
  auto& ss = *reinterpret_cast<typename T::SharedStorage*>(smem_raw);

  const int64_t block = p.block_first + (p.num_m_blocks - 1 - int(blockIdx.x));  // last first
  const int64_t m0 = block * kBlockM;
  const int head = blockIdx.y;
  const int kv_head = head / p.head_ratio;
  const int warp_group = cutlass::canonical_warp_group_idx();

  init_ring_barriers<kStages>(p, ss, [&](int i) {
    ss.full_k[i].init(128);
    ss.full_v[i].init(128);
    ss.empty_k[i].init(128);
    ss.empty_v[i].init(128);
  });

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename T::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename T::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename T::SmemLayoutV{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename T::SmemLayoutVt{});

  if (warp_group == 0) {
    // ------------------------------------------------------------ producer
    cutlass::arch::warpgroup_reg_dealloc<T::kProducerRegs>();
    const int tid = threadIdx.x;
    TileCursor cur(p, head, m0);
    Tile tk;
    if (!cur.next(tk)) return;
    Tensor mQ = p.tma_q.get_tma_tensor(make_shape(p.n_q, int32_t(kHeadDim), p.num_heads));
    Tensor mK = p.tma_k.get_tma_tensor(make_shape(p.n_k, int32_t(kHeadDim), p.num_kv_heads));
    Tensor mV = p.tma_v.get_tma_tensor(make_shape(p.n_k, int32_t(kHeadDim), p.num_kv_heads));
    if (tid == 0) {
      ss.bar_q.arrive_and_expect_tx(T::kTmaBytesQ);
      tma_load_rows<kBlockM, kHeadDim>(p.tma_q, reinterpret_cast<uint64_t&>(ss.bar_q), mQ, head,
                                       int32_t(m0 - p.q_pos0), sQ);
    }
    const Element* k_base = p.k + int64_t(kv_head) * p.k_head_stride;
    const Element* v_base = p.v + int64_t(kv_head) * p.v_head_stride;
    const int* col = p.col;

    // Loads tile t of K (is_k) or V into slot `stage`, after that slot is free.
    // Returns true when the load is a cp.async group that still has to be signalled.
    auto load = [&](Tile const& t, bool is_k, int stage, uint32_t phase) -> bool {
      auto& empty = is_k ? ss.empty_k[stage] : ss.empty_v[stage];
      auto& full = is_k ? ss.full_k[stage] : ss.full_v[stage];
      empty.wait(phase ^ 1);
      if (is_k && tid < kBlockN) {
        const int64_t pos = t.s + tid;
        ss.key[stage][tid] = pos >= t.e ? INT64_MAX : (t.gather ? int64_t(col[pos]) : pos);
      }
      if (!t.gather) {
        if (tid == 0) {
          full.arrive_and_expect_tx(T::kTmaBytesKV);
          tma_load_rows<kBlockN, kHeadDim>(is_k ? p.tma_k : p.tma_v,
                                           reinterpret_cast<uint64_t&>(full), is_k ? mK : mV,
                                           kv_head, int32_t(t.s - p.k_pos0), is_k ? sK : sV, stage);
        } else {
          full.arrive();
        }
        return false;
      }
      const RowGather<kBlockN, kHeadDim> gather(tid, col, t.s, t.e);
      gather.issue(is_k ? sK : sV, stage, is_k ? k_base : v_base,
                   is_k ? p.k_row_stride : p.v_row_stride, p.k_pos0);
      cp_async_commit();
      return true;
    };
    // The previous cp.async load, signalled once its data has landed.
    bool pend = false;
    cutlass::arch::ClusterTransactionBarrier* pend_bar = nullptr;
    auto signal_pending = [&](bool newer_group_in_flight) {
      if (!pend) return;
      if (newer_group_in_flight)
        cp_async_wait<1>();
      else
        cp_async_wait<0>();
      cutlass::arch::fence_view_async_shared();
      pend_bar->arrive();
      pend = false;
    };
    auto step = [&](Tile const& t, bool is_k, int stage, uint32_t phase) {
      const bool g = load(t, is_k, stage, phase);
      signal_pending(g);
      if (g) {
        pend = true;
        pend_bar = is_k ? &ss.full_k[stage] : &ss.full_v[stage];
      }
    };

    int sk = 0, sv = 0;
    uint32_t phk = 0, phv = 0;
    step(tk, true, sk, phk);
    if (++sk == kStages) {
      sk = 0;
      phk ^= 1;
    }
    Tile tv = tk;
    for (;;) {
      Tile tn;
      const bool more = cur.next(tn);
      if (more) {
        step(tn, true, sk, phk);
        if (++sk == kStages) {
          sk = 0;
          phk ^= 1;
        }
      }
      step(tv, false, sv, phv);
      if (++sv == kStages) {
        sv = 0;
        phv ^= 1;
      }
      if (!more) break;
      tv = tn;
    }
    signal_pending(false);
    return;
  }

  // -------------------------------------------------------------- consumer
  cutlass::arch::warpgroup_reg_alloc<T::kConsumerRegs>();
  const int tidx = int(threadIdx.x) - 128;
  typename T::TiledMmaS mma_s;
  typename T::TiledMmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tidx);
  auto thr_o = mma_o.get_thread_slice(tidx);

  Tensor tOrO = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor O_rc = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
  Tensor cO_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
  constexpr int kRows = decltype(size<0>(O_rc))::value;
  OnlineSoftmax<kRows> softmax;
  clear(tOrO);

  TileCursor cur(p, head, m0);
  Tile t;
  if (cur.next(t)) {
    Tensor tSrQ = thr_s.partition_fragment_A(sQ);
    Tensor tSrK = thr_s.partition_fragment_B(sK);
    Tensor tOrV = thr_o.partition_fragment_B(sVt);
    Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
    Tensor cS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
    const bool ashape = p.kind == Kind::kAShape;
    const float scale_log2 = p.scale_log2;

    // Masks S of tile t (K slot `stage`) where a key is not visible to a row.
    auto mask = [&](auto& tSrS, Tile const& tt, int stage) {
      bool need = tt.gather || tt.e - tt.s < kBlockN || tt.e - 1 > m0;
      if (ashape && !need) need = !(tt.e <= p.n_init || (m0 + kBlockM - 1) - tt.s < p.n_local);
      if (!need) return;
      Tensor S = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(S); ++c) {
        const int64_t key = ss.key[stage][get<1>(cS_rc(0, c))];
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < kRows; ++r) {
          const int64_t row = m0 + get<0>(cS_rc(r, 0));
          bool vis = key <= row;
          if (ashape) vis = vis && (key < p.n_init || row - key < p.n_local);
          if (!vis) S(r, c) = -INFINITY;
        }
      }
    };
    Tensor rP =
        make_tensor_like<Element>(partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{}));
    Tensor tOrP = make_tensor(rP.data(), acc_to_a_operand(rP.layout()));

    int sk = 0, sv = 0;
    uint32_t phk = 0, phv = 0;
    ss.bar_q.wait(0);
    {
      Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
      ss.full_k[sk].wait(phk);
      wg_gemm_issue<true>(mma_s, tSrQ, tSrK(_, _, _, sk), tSrS);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tSrS);
      mask(tSrS, t, sk);
      ss.empty_k[sk].arrive();
      if (++sk == kStages) {
        sk = 0;
        phk ^= 1;
      }
      softmax.update(tSrS, scale_log2);
      convert_p(rP, tSrS);
    }
    while (cur.next(t)) {
      Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
      ss.full_k[sk].wait(phk);
      ss.full_v[sv].wait(phv);
      wg_gemm_issue<true>(mma_s, tSrQ, tSrK(_, _, _, sk), tSrS);
      wg_gemm_issue<false>(mma_o, tOrP, tOrV(_, _, _, sv), tOrO);
      warpgroup_wait<1>();
      warpgroup_fence_operand(tSrS);
      mask(tSrS, t, sk);
      ss.empty_k[sk].arrive();
      if (++sk == kStages) {
        sk = 0;
        phk ^= 1;
      }
      softmax.update(tSrS, scale_log2);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
      warpgroup_fence_operand(rP);
      ss.empty_v[sv].arrive();
      if (++sv == kStages) {
        sv = 0;
        phv ^= 1;
      }
      softmax.rescale(O_rc);
      convert_p(rP, tSrS);
    }
    ss.full_v[sv].wait(phv);
    wg_gemm_issue<false>(mma_o, tOrP, tOrV(_, _, _, sv), tOrO);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    ss.empty_v[sv].arrive();
  }

  // -------------------------------------------------------------- epilogue
  store_o_lse<false>(
      p, head, tidx, O_rc, cO_rc, softmax,
      [&](int r) { return m0 + get<0>(cO_rc(r, 0)) - p.q_pos0; },  // int64_t local query row
      [&](int64_t row) { return row >= 0 && row < p.n_q; });
}

// ---------------------------------------------------------------- launcher
// Params of one launch, of v1 (T = SparseTraits) or v2 (the same Params and TMA boxes):
// `sp` carries the pattern fields (kind, index pointers, A-shape sizes); the attention
// fields are filled here from `a`. Preconditions checked by the caller (sparse_api.cu).
template <class T>
typename T::Params sparse_params(const AttentionParams& a, typename T::Params sp) {
  using Element = typename T::Element;
  typename T::Params p = sp;
  const int32_t n_k_desc = a.n_k > 0 ? a.n_k : 1;  // no tile is read when n_k = 0
  set_qkv_tma<typename T::Base>(a, int32_t(T::kHeadDim), n_k_desc, p);
  set_attention_params(a, p);
  p.k = static_cast<const Element*>(a.k);
  p.v = static_cast<const Element*>(a.v);
  p.k_row_stride = a.k_row_stride;
  p.k_head_stride = a.k_head_stride;
  p.v_row_stride = a.v_row_stride;
  p.v_head_stride = a.v_head_stride;
  p.q_pos0 = a.q_pos0;
  p.k_pos0 = a.k_pos0;
  p.block_first = a.q_pos0 / T::kBlockM;
  const int64_t block_last = (a.q_pos0 + a.n_q - 1) / T::kBlockM;
  p.num_m_blocks = int32_t(block_last - p.block_first + 1);
  return p;
}

template <class T>
Status run_sparse_fwd(const AttentionParams& a, typename T::Params sp, cudaStream_t stream) {
  const typename T::Params p = sparse_params<T>(a, sp);
  return launch_attention(sparse_fwd_kernel<T>, dim3(p.num_m_blocks, a.num_heads), T::kNumThreads,
                          T::kSmemBytes, stream, p, "launch sparse_fwd_kernel");
}

}  // namespace mprefill::cuda::sparse
