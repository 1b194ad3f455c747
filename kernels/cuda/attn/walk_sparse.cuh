// Key-tile walker of the skeleton for the MInference patterns (vertical-slash,
// block-sparse, A-shape; kernels/sparse.h), kind chosen per launch. The tile stream
// (which keys, in what order, who uses and who masks each tile) is walk::SparseWalk
// (sparse_walk.h, shared with the CPU replay test); this file loads it: CTA = global
// query blocks A = block_first + 2 i and B = A + 1 (consumer 0 = A, 1 = B), K/V by TMA
// at any key row for union pieces and by cp.async for gathered columns.
#pragma once

#include <cub/device/device_scan.cuh>

#include "kernels/cuda/attn/skeleton.cuh"
#include "kernels/cuda/attn/sparse_walk.h"
#include "kernels/cuda/sparse/sparse_fwd_v2_kernel.cuh"
#include "kernels/cuda/sparse/sparse_launch.h"

namespace mprefill::cuda::skel {

using walk::Kind;

#ifndef MPREFILL_SKEL_UNION_GATHER
#define MPREFILL_SKEL_UNION_GATHER 1
#endif
// Gathered tiles shared by both consumers (1) or A's and B's lists alternating, each
// used by its owner only (0).
constexpr bool kUnionGather = MPREFILL_SKEL_UNION_GATHER != 0;

// ScalarSpan's contract (sparse_walk.h) for the producer's warps: each warp finds the span
// on its own (same loads, same answer), 32 entries per coalesced load; a tile usually needs
// one load where a binary search over A's list took ~log2(list) dependent ones.
struct WarpSpan {
  const int* col;
  CUTE_DEVICE void operator()(int64_t& c, int64_t end, int lo, int hi, int64_t& c0,
                              int64_t& c1) const {
    const int lane = int(threadIdx.x) & 31;
    auto skip_to_above = [&](int x) {  // moves c past the entries <= x
      for (;;) {
        const int64_t i = c + lane;
        const int v = i < end ? __ldg(col + i) : INT_MAX;
        const uint32_t below = __ballot_sync(0xffffffffu, v <= x);  // a prefix: ascending
        c += __popc(below);
        if (below != 0xffffffffu) return;
      }
    };
    skip_to_above(lo - 1);
    c0 = c;
    skip_to_above(hi);
    c1 = c;
  }
};

struct SparseWalker {
  static constexpr int kProducerRegs = 0;  // SkelTraits' split (the walk needs 120)

  template <class T>
  struct Params {
    typename T::TmaQ tma_q;
    typename T::TmaKV tma_k;
    typename T::TmaKV tma_v;
    typename T::TmaKVHalf tma_k_half;  // 64-row boxes (owner tiles)
    typename T::TmaKVHalf tma_v_half;
    using TmaKV = typename T::TmaKV;
    const typename T::Element* k;  // gather sources (token-major, strides in elements)
    const typename T::Element* v;
    int64_t k_row_stride, k_head_stride, v_row_stride, v_head_stride;
    typename T::Element* o;
    float* lse;
    int64_t o_row_stride, o_head_stride, lse_head_stride;
    int32_t n_q, n_k, num_heads, num_kv_heads, head_ratio, head_dim;
    int64_t q_pos0, k_pos0;
    int64_t block_first;   // first global 64-row query block of the call
    int32_t num_m_blocks;  // 64-row blocks of the call (CTAs: ceil(num_m_blocks / 2))
    float scale, scale_log2;
    Kind kind;
    int64_t nblocks;  // vertical-slash / block-sparse index rows per head
    const int64_t* range_ptr;
    const int* range_lo;
    const int* range_hi;
    const int64_t* col_ptr;
    const int* col;
    int head_offset;
    const int* blocks;
    int bs_k;
    int64_t n_init, n_local;
    int owner_max;  // owner tiles for union intervals up to this many keys (0: off)
    // Tile plan (kernel 5): CTA (head, pair) streams plan[plan_off[c], plan_off[c + 1])
    // with c = head * num_pairs + pair; null: the producer walks in the kernel.
    const walk::TileRec* plan;
    const int64_t* plan_off;
  };

  struct Cta {
    int head;
    int64_t row0;  // global position of the CTA's first query row (block A's m0)
    bool valid_b;
  };

  template <class P>
  CUTE_DEVICE static Cta cta(P const& p, int bx, int by) {
    const int num_pairs = (p.num_m_blocks + 1) / 2;
    const int64_t block_a = p.block_first + 2 * int64_t(num_pairs - 1 - bx);  // last first
    Cta c;
    c.head = by;
    c.row0 = block_a * 64;
    c.valid_b = block_a + 1 <= p.block_first + p.num_m_blocks - 1;
    return c;
  }

  // Visibility is key <= row alone (not A-shape's window).
  template <class P>
  CUTE_DEVICE static bool causal_only(P const& p) {
    return p.kind != Kind::kAShape;
  }

  template <class P>
  CUTE_DEVICE static bool visible(P const& p, int64_t key, int64_t row) {
    bool vis = key <= row;
    if (p.kind == Kind::kAShape) vis = vis && (key < p.n_init || row - key < p.n_local);
    return vis;
  }

  // The producer of a planned launch: the same K / V order as produce(), tiles read from
  // the plan (one 64-byte record per tile, the next one loaded while this one is issued),
  // no walker state.
  template <class T, class P>
  CUTE_DEVICE static void produce_planned(P const& p, typename T::SharedStorage& ss, Cta const& cta,
                                          int tid) {
    constexpr int kHeadDim = T::kHeadDim, kStages = T::kStages;
    const int head = cta.head, kv_head = head / p.head_ratio;
    const int num_pairs = (p.num_m_blocks + 1) / 2;
    const int64_t c = int64_t(head) * num_pairs + (cta.row0 / 64 - p.block_first) / 2;
    int64_t i = p.plan_off[c];
    const int64_t i_end = p.plan_off[c + 1];
    Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename T::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename T::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename T::SmemLayoutV{});
    Tensor mQ = p.tma_q.get_tma_tensor(make_shape(p.n_q, int32_t(kHeadDim), p.num_heads));
    Tensor mK = p.tma_k.get_tma_tensor(make_shape(p.n_k, int32_t(kHeadDim), p.num_kv_heads));
    Tensor mV = p.tma_v.get_tma_tensor(make_shape(p.n_k, int32_t(kHeadDim), p.num_kv_heads));
    const typename T::Element* k_base = p.k + int64_t(kv_head) * p.k_head_stride;
    const typename T::Element* v_base = p.v + int64_t(kv_head) * p.v_head_stride;
    int sk = 0, sv = 0;
    uint32_t pk = 0, pv = 0;
    bool q_issued = false, have_prev = false;
    walk::TileRec prev{}, next{};
    if (i < i_end) next = p.plan[i];
    for (;;) {
      const bool end = i >= i_end;
      const walk::TileRec r = next;
      if (!end && ++i < i_end) next = p.plan[i];
      ss.empty_k[sk].wait(pk ^ 1);
      if (end) {
        if (tid == 0) ss.flags[sk] = kEnd;
        ss.full_k[sk].arrive();
      } else {
        if (!q_issued) {
          q_issued = true;
          if (tid == 0) {
            ss.bar_q.arrive_and_expect_tx(T::kTmaBytesQ);
            tma_load_rows<T::kBlockM, kHeadDim>(p.tma_q, reinterpret_cast<uint64_t&>(ss.bar_q), mQ,
                                                head, int32_t(cta.row0 - p.q_pos0), sQ);
          }
        }
        ss.key[sk][tid] = walk::rec_key(p, r, tid);
        const uint32_t qa = __ballot_sync(0xffffffffu, walk::rec_member(r, 0, tid));
        const uint32_t qb = __ballot_sync(0xffffffffu, walk::rec_member(r, 1, tid));
        if ((tid & 31) == 0) {
          reinterpret_cast<uint32_t*>(&ss.member[sk][0][0])[tid / 32] = qa;
          reinterpret_cast<uint32_t*>(&ss.member[sk][1][0])[tid / 32] = qb;
        }
        if (tid == 0) ss.flags[sk] = r.flags;
        if (tid < 4) ss.kmax[sk][tid] = tid == 0 ? r.kmax : INT32_MIN;  // the record has it
        if (r.flags & kHalves)
          load_halves<T>(p, tid, kv_head, r.ts, r.ts2, p.tma_k_half, mK, ss.k.data(), sk,
                         ss.full_k[sk]);
        else
          load_tile<T>(p, tid, kv_head, r.gw >= 0, p.col, r.ts, r.te, k_base, p.k_row_stride,
                       p.tma_k, mK, sK, sk, ss.full_k[sk]);
        if (++sk == kStages) sk = 0, pk ^= 1;
      }
      if (have_prev) {
        ss.empty_v[sv].wait(pv ^ 1);
        if (prev.flags & kHalves)
          load_halves<T>(p, tid, kv_head, prev.ts, prev.ts2, p.tma_v_half, mV, ss.v.data(), sv,
                         ss.full_v[sv]);
        else
          load_tile<T>(p, tid, kv_head, prev.gw >= 0, p.col, prev.ts, prev.te, v_base,
                       p.v_row_stride, p.tma_v, mV, sV, sv, ss.full_v[sv]);
        if (++sv == kStages) sv = 0, pv ^= 1;
      }
      if (end) return;
      have_prev = true;
      prev = r;
    }
  }

  template <class T, class P>
  CUTE_DEVICE static void produce(P const& p, typename T::SharedStorage& ss, Cta const& cta,
                                  int tid) {
    using Element = typename T::Element;
    constexpr int kBlockN = T::kBlockN, kHeadDim = T::kHeadDim, kStages = T::kStages;
    static_assert(kBlockN == 128, "one producer thread per key row");
    const int head = cta.head, kv_head = head / p.head_ratio;
    walk::SparseWalk<kBlockN> wk;
    wk.init(p, head, cta.row0, cta.valid_b, kUnionGather, p.owner_max);

    Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename T::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename T::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename T::SmemLayoutV{});
    Tensor mQ = p.tma_q.get_tma_tensor(make_shape(p.n_q, int32_t(kHeadDim), p.num_heads));
    Tensor mK = p.tma_k.get_tma_tensor(make_shape(p.n_k, int32_t(kHeadDim), p.num_kv_heads));
    Tensor mV = p.tma_v.get_tma_tensor(make_shape(p.n_k, int32_t(kHeadDim), p.num_kv_heads));
    const Element* k_base = p.k + int64_t(kv_head) * p.k_head_stride;
    const Element* v_base = p.v + int64_t(kv_head) * p.v_head_stride;

    int sk = 0, sv = 0;
    uint32_t pk = 0, pv = 0;
    bool q_issued = false, have_prev = false;
    // previous tile (its V goes after this K)
    int prev_s = 0, prev_e = 0, prev_s2 = 0, prev_gw = -1;
    bool prev_halves = false;
    for (;;) {
      walk::TileDesc d;
      wk.next(p, d, WarpSpan{p.col});
      // ---- K of this tile (or the end marker)
      ss.empty_k[sk].wait(pk ^ 1);
      if (d.end) {
        if (tid == 0) ss.flags[sk] = kEnd;
        ss.full_k[sk].arrive();
      } else {
        if (!q_issued) {
          q_issued = true;
          if (tid == 0) {
            ss.bar_q.arrive_and_expect_tx(T::kTmaBytesQ);
            tma_load_rows<T::kBlockM, kHeadDim>(p.tma_q, reinterpret_cast<uint64_t&>(ss.bar_q), mQ,
                                                head, int32_t(cta.row0 - p.q_pos0), sQ);
          }
        }
        // Thread tid writes key row tid's position; warp w the 32-bit quarter w of each
        // consumer's membership bits.
        const int key = wk.key(p, d, tid);
        ss.key[sk][tid] = key;
        const uint32_t qa = __ballot_sync(0xffffffffu, wk.member_a(p, d, tid, key));
        const uint32_t qb = __ballot_sync(0xffffffffu, wk.member_b(d, tid));
        if ((tid & 31) == 0) {
          reinterpret_cast<uint32_t*>(&ss.member[sk][0][0])[tid / 32] = qa;
          reinterpret_cast<uint32_t*>(&ss.member[sk][1][0])[tid / 32] = qb;
        }
        if (tid == 0) ss.flags[sk] = d.flags;
        // Keys ascend with the key row (pieces, halves, gathered lists): the warp's largest
        // is its highest row holding a key.
        const uint32_t has = __ballot_sync(0xffffffffu, key != INT32_MAX);
        if ((tid & 31) == (has ? 31 - __clz(has) : 0))
          ss.kmax[sk][tid / 32] = has ? key : INT32_MIN;
        if (d.flags & kHalves)
          load_halves<T>(p, tid, kv_head, d.ts, d.ts2, p.tma_k_half, mK, ss.k.data(), sk,
                         ss.full_k[sk]);
        else
          load_tile<T>(p, tid, kv_head, d.gw >= 0, p.col, d.ts, d.te, k_base, p.k_row_stride,
                       p.tma_k, mK, sK, sk, ss.full_k[sk]);
        if (++sk == kStages) sk = 0, pk ^= 1;
      }
      // ---- V of the previous tile
      if (have_prev) {
        ss.empty_v[sv].wait(pv ^ 1);
        if (prev_halves)
          load_halves<T>(p, tid, kv_head, prev_s, prev_s2, p.tma_v_half, mV, ss.v.data(), sv,
                         ss.full_v[sv]);
        else
          load_tile<T>(p, tid, kv_head, prev_gw >= 0, p.col, prev_s, prev_e, v_base, p.v_row_stride,
                       p.tma_v, mV, sV, sv, ss.full_v[sv]);
        if (++sv == kStages) sv = 0, pv ^= 1;
      }
      if (d.end) return;
      have_prev = true;
      prev_s = d.ts;
      prev_e = d.te;
      prev_s2 = d.ts2;
      prev_gw = d.gw;
      prev_halves = (d.flags & kHalves) != 0;
    }
  }
};

// The skeleton's producer for a planned launch (kernel 5): records instead of the walk, so
// the walker's state is not in this kernel at all.
struct PlannedSparseWalker : SparseWalker {
  // ptxas (nvcc 13.0, with the keep-word masks): 104 / 200 spills nothing, 120 / 192 spills
  // 60 bytes in the consumers; the walking producer needs 120.
  static constexpr int kProducerRegs = 104;
  template <class T, class P>
  CUTE_DEVICE static void produce(P const& p, typename T::SharedStorage& ss, Cta const& cta,
                                  int tid) {
    produce_planned<T>(p, ss, cta, tid);
  }
};

}  // namespace mprefill::cuda::skel

namespace mprefill::cuda::skel {

// ---------------------------------------------------------------- tile plan
// walk::make_tile_rec built by the whole warp: lane l takes key rows l, l + 32, l + 64,
// l + 96 (key and consumer 0's membership), the membership words are the four ballots and
// kmax a warp max. (NOTES §3 v3 run 6: lane 0 alone looping over the 128 rows made the
// write pass cost 5-20x the count pass.) Call with the whole warp; every lane gets the
// record.
template <class P>
CUTE_DEVICE walk::TileRec make_tile_rec_warp(P const& p, walk::SparseWalk<128> const& wk,
                                             walk::TileDesc const& d) {
  const int lane = int(threadIdx.x) & 31;
  int kmax = INT32_MIN;
  uint64_t w0 = 0, w1 = 0;  // consumer 0's extra membership, rows 0-63 and 64-127
  // Not unrolled: one inlined member_a search instead of four.
#pragma unroll 1
  for (int i = 0; i < 4; ++i) {
    const int t = lane + 32 * i;
    const int key = walk::SparseWalk<128>::key(p, d, t);
    bool m = false;
    if (key != INT32_MAX) {
      kmax = key > kmax ? key : kmax;
      m = d.sa1 > d.sa0 && wk.member_a(p, d, t, key);
    }
    const uint64_t b = uint64_t(__ballot_sync(0xffffffffu, m)) << (32 * (i & 1));
    if (i < 2)
      w0 |= b;
    else
      w1 |= b;
  }
  walk::TileRec r = walk::tile_rec_of(d);
  r.a0 |= w0;
  r.a1 |= w1;
  r.kmax = __reduce_max_sync(0xffffffffu, kmax);
  return r;
}

// One warp per CTA (head, pair) runs the walk its producer would run (walk::plan_cta's
// loop with WarpSpan): counts[c] = the CTA's tile count (counts non-null), or the warp
// builds each record (make_tile_rec_warp) and lane 0 writes it at p.plan + offsets[c].
// Launched with 128 threads. __maxnreg__(128), not __launch_bounds__(128): under the latter
// ptxas kept this kernel to 96 registers and spilled 80 B (ptxas -v, CUDA 13.0); now 113
// registers, no spill (the lane-0 version: 114, no spill).
template <class P>
__global__ void __maxnreg__(128)
    skel_plan_kernel(P const p, int64_t* counts, const int64_t* offsets) {
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int num_pairs = (p.num_m_blocks + 1) / 2;
  if (c >= int64_t(num_pairs) * p.num_heads) return;  // whole warps
  const int head = int(c / num_pairs), pair = int(c % num_pairs);
  const int64_t block_a = p.block_first + 2 * int64_t(pair);
  const bool valid_b = block_a + 1 <= p.block_first + p.num_m_blocks - 1;
  const bool lead = (threadIdx.x & 31) == 0;
  walk::TileRec* out = offsets ? const_cast<walk::TileRec*>(p.plan) + offsets[c] : nullptr;
  walk::SparseWalk<128> wk;
  wk.init(p, head, block_a * 64, valid_b, kUnionGather, p.owner_max);
  const WarpSpan span{p.col};
  int64_t n = 0;
  for (;;) {  // d.end is warp-uniform: every lane runs the same walk
    walk::TileDesc d;
    wk.next(p, d, span);
    if (d.end) break;
    if (out) {
      const walk::TileRec r = make_tile_rec_warp(p, wk, d);
      if (lead) out[n] = r;
    }
    ++n;
  }
  if (counts && lead) counts[c] = n;
}

// Stream-ordered scratch of one launch, freed on the stream whatever the outcome.
struct StreamScratch {
  cudaStream_t stream;
  void* ptr[4] = {};
  int n = 0;
  template <class X>
  cudaError_t take(X** out, size_t bytes) {
    const cudaError_t e =
        cudaMallocAsync(reinterpret_cast<void**>(out), bytes > 0 ? bytes : 1, stream);
    if (e == cudaSuccess) ptr[n++] = *out;
    return e;
  }
  ~StreamScratch() {
    for (int i = 0; i < n; ++i) cudaFreeAsync(ptr[i], stream);
  }
};

// ---------------------------------------------------------------- launcher
// `sp` carries the pattern fields (kind, index views, A-shape windows); the caller has
// checked the arguments and sparse::sparse_v2_positions_ok(a). planned (kernel 5): the
// tile plan is computed first (count, scan, a stream sync to size it, write); it holds 64
// bytes per tile of the launch (a 128K dense mask over 32 heads: ~1 GB), so this is a
// measurement path, not yet the engine's.
template <class T>
Status run_skel_sparse(const AttentionParams& a, typename SparseWalker::Params<T> sp,
                       cudaStream_t stream, bool planned = false) {
  using Element = typename T::Element;
  using P = typename SparseWalker::Params<T>;
  P p = sp;
  const int32_t n_k_desc = a.n_k > 0 ? a.n_k : 1;  // no tile is read when n_k = 0
  set_qkv_tma<T>(a, int32_t(T::kHeadDim), n_k_desc, p);
  auto gmem_kv = [&](const void* ptr, int64_t row_stride, int64_t head_stride) {
    return make_tensor(make_gmem_ptr(static_cast<Element const*>(ptr)),
                       make_layout(make_shape(n_k_desc, int32_t(T::kHeadDim), a.num_kv_heads),
                                   make_stride(row_stride, _1{}, head_stride)));
  };
  p.tma_k_half = make_tma_copy(SM90_TMA_LOAD{}, gmem_kv(a.k, a.k_row_stride, a.k_head_stride),
                               typename T::SmemLayoutKHalf{}, Shape<_64, Int<T::kHeadDim>>{}, _1{});
  p.tma_v_half = make_tma_copy(SM90_TMA_LOAD{}, gmem_kv(a.v, a.v_row_stride, a.v_head_stride),
                               typename T::SmemLayoutKHalf{}, Shape<_64, Int<T::kHeadDim>>{}, _1{});
  set_attention_params(a, p);
  p.k = static_cast<const Element*>(a.k);
  p.v = static_cast<const Element*>(a.v);
  p.k_row_stride = a.k_row_stride;
  p.k_head_stride = a.k_head_stride;
  p.v_row_stride = a.v_row_stride;
  p.v_head_stride = a.v_head_stride;
  p.head_dim = a.head_dim;
  p.q_pos0 = a.q_pos0;
  p.k_pos0 = a.k_pos0;
  p.block_first = a.q_pos0 / 64;
  p.num_m_blocks = int32_t((a.q_pos0 + a.n_q - 1) / 64 - p.block_first + 1);
  p.plan = nullptr;
  p.plan_off = nullptr;
  StreamScratch scratch{stream};
  if (planned) {
    const int64_t nc = int64_t((p.num_m_blocks + 1) / 2) * a.num_heads;
    int64_t *counts = nullptr, *off = nullptr;
    void* tmp = nullptr;
    size_t tmp_bytes = 0;
    MPREFILL_CUDA_TRY(scratch.take(&counts, size_t(nc + 1) * 8));
    MPREFILL_CUDA_TRY(scratch.take(&off, size_t(nc + 1) * 8));
    MPREFILL_CUDA_TRY(cudaMemsetAsync(counts + nc, 0, 8, stream));
    const unsigned blocks = unsigned((nc * 32 + 127) / 128);
    skel_plan_kernel<<<blocks, 128, 0, stream>>>(p, counts, nullptr);
    MPREFILL_CUDA_LAUNCH_CHECK("skel_plan_kernel (count)");
    MPREFILL_CUDA_TRY(
        cub::DeviceScan::ExclusiveSum(nullptr, tmp_bytes, counts, off, nc + 1, stream));
    MPREFILL_CUDA_TRY(scratch.take(&tmp, tmp_bytes));
    MPREFILL_CUDA_TRY(cub::DeviceScan::ExclusiveSum(tmp, tmp_bytes, counts, off, nc + 1, stream));
    int64_t tiles = 0;
    MPREFILL_CUDA_TRY(cudaMemcpyAsync(&tiles, off + nc, 8, cudaMemcpyDeviceToHost, stream));
    MPREFILL_CUDA_TRY(cudaStreamSynchronize(stream));
    walk::TileRec* recs = nullptr;
    MPREFILL_CUDA_TRY(scratch.take(&recs, size_t(tiles) * sizeof(walk::TileRec)));
    p.plan = recs;
    p.plan_off = off;
    skel_plan_kernel<<<blocks, 128, 0, stream>>>(p, nullptr, off);
    MPREFILL_CUDA_LAUNCH_CHECK("skel_plan_kernel (write)");
  }
  const dim3 grid((p.num_m_blocks + 1) / 2, a.num_heads);
  if (planned)
    return launch_attention(skel_fwd_kernel<T, PlannedSparseWalker>, grid, T::kNumThreads,
                            T::kSmemBytes, stream, p,
                            "launch skel_fwd_kernel<PlannedSparseWalker>");
  return launch_attention(skel_fwd_kernel<T, SparseWalker>, grid, T::kNumThreads, T::kSmemBytes,
                          stream, p, "launch skel_fwd_kernel<SparseWalker>");
}

}  // namespace mprefill::cuda::skel

namespace mprefill::cuda::sparse {

// The sparse instances' entry into the skeleton (PatternArgs -> walker Params).
template <class Element, int D>
Status run_skel_fwd(const AttentionParams& a, const PatternArgs& pat, cudaStream_t stream) {
  using T = skel::SkelTraits<Element, D>;
  typename skel::SparseWalker::Params<T> sp{};
  sp.kind = static_cast<Kind>(pat.kind);
  sp.nblocks = pat.nblocks;
  sp.range_ptr = pat.range_ptr;
  sp.range_lo = pat.range_lo;
  sp.range_hi = pat.range_hi;
  sp.col_ptr = pat.col_ptr;
  sp.col = pat.col;
  sp.head_offset = pat.head_offset;
  sp.blocks = pat.blocks;
  sp.bs_k = pat.bs_k;
  sp.n_init = pat.n_init;
  sp.n_local = pat.n_local;
  sp.owner_max = pat.version >= 4 ? 256 : 0;
  return skel::run_skel_sparse<T>(a, sp, stream, pat.version == 5);
}

}  // namespace mprefill::cuda::sparse
