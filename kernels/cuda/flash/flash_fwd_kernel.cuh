// Hopper flash-attention forward: traits, kernel and launcher template.
//
// One CTA = one 128-row query tile of one head. Warpgroup 0 is the producer (one
// thread issues TMA loads of Q once and of K/V tiles into kStages-deep smem ring
// buffers guarded by PipelineTmaAsync, in consumption order K[last], then K[n-1]
// before V[n]); warpgroups 1..kNumMmaWG are consumers, each owning 64 query rows.
// Consumer loop per key tile n (visited last -> first, so the tiles crossing the
// causal diagonal come first and are the only ones masked besides the n_k edge):
//   issue S = Q K[n]^T (SS-WGMMA) and O += P V[n+1] (RS-WGMMA, P in registers)
//   back to back; wait for S; mask; online softmax (exp2, scale*log2(e)) while
//   P V[n+1] still runs; wait; rescale O; round P to the element type.
// With kPingpong the two consumer warpgroups take turns issuing (named barriers),
// so one warpgroup's softmax overlaps the other's GEMMs.
#pragma once

// The 64x176 WGMMA shapes (key tile 176 for non-causal head_dim 128) are in CuTe's
// "extended" GMMA set; it must be enabled before the first CuTe include.
#ifndef CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED 1
#endif

#include <cutlass/pipeline/pipeline.hpp>

#include "kernels/cuda/common/attention_common.cuh"

namespace mprefill::cuda::flash {

using namespace cute;
using namespace attn;

// ---------------------------------------------------------------- traits
#ifndef MPREFILL_FLASH_BLOCK_N_NONCAUSAL
#define MPREFILL_FLASH_BLOCK_N_NONCAUSAL 176
#endif
// Non-causal head_dim 128 uses a wider key tile (fewer softmax rounds per FLOP; +5%
// measured, bench/NOTES.md v3). Causal keeps 128 so at most two tiles cross the diagonal.
constexpr int flash_block_n(int head_dim, bool causal) {
  return (head_dim == 128 && !causal) ? MPREFILL_FLASH_BLOCK_N_NONCAUSAL : 128;
}

// 128 query rows (two consumer warpgroups) x flash_block_n keys, 2 K/V stages.
template <typename Element_, int kHeadDim_, bool kCausal_>
struct FwdTraits
    : attn::TileTypes<Element_, 128, flash_block_n(kHeadDim_, kCausal_), kHeadDim_, 2, 2> {
  using Base = attn::TileTypes<Element_, 128, flash_block_n(kHeadDim_, kCausal_), kHeadDim_, 2, 2>;
  using Element = Element_;
  static constexpr bool kCausal = kCausal_;
  static constexpr int kNumMmaThreads = Base::kNumMmaWG * cutlass::NumThreadsPerWarpGroup;
  static constexpr int kNumThreads = kNumMmaThreads + cutlass::NumThreadsPerWarpGroup;
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
#ifndef MPREFILL_FLASH_PINGPONG
#define MPREFILL_FLASH_PINGPONG 1
#endif
  static constexpr bool kPingpong = MPREFILL_FLASH_PINGPONG != 0 && Base::kNumMmaWG == 2;

  static_assert(Base::kBlockN % 16 == 0 && Base::kBlockN <= 256, "bad tile");
  static_assert(Base::kStages >= 2, "need at least double buffering");
  static_assert(kProducerRegs * 128 + kConsumerRegs * kNumMmaThreads <= 65536,
                "register reallocation exceeds the register file");

  using Pipeline = cutlass::PipelineTmaAsync<Base::kStages>;
  using PipelineState = typename Pipeline::PipelineState;

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<typename Base::SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<typename Base::SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cosize_v<typename Base::SmemLayoutV>, 1024> v;
    typename Pipeline::SharedStorage pipe_k;
    typename Pipeline::SharedStorage pipe_v;
    cutlass::arch::ClusterTransactionBarrier bar_q;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "shared memory over the sm90 opt-in limit");

  struct Params {
    typename Base::TmaQ tma_q;
    typename Base::TmaKV tma_k;
    typename Base::TmaKV tma_v;
    Element* o;
    float* lse;  // may be null
    int64_t o_row_stride, o_head_stride, lse_head_stride;
    int32_t n_q, n_k, num_heads, num_kv_heads, head_ratio;
    int32_t num_m_blocks;
    int32_t head_dim;    // real head_dim <= kHeadDim; columns >= head_dim are TMA zero-fill
    int64_t pos_offset;  // q_pos0 - k_pos0: row i sees key j iff j <= i + pos_offset
    float scale, scale_log2;
  };
};

// Number of key tiles that hold a key visible to some row of query tile m_block.
template <class T>
CUTE_HOST_DEVICE int visible_key_blocks(typename T::Params const& p, int m_block) {
  int64_t kv_end = p.n_k;
  if constexpr (T::kCausal) {
    const int64_t row_end = cute::min<int64_t>(int64_t(m_block + 1) * T::kBlockM, p.n_q);
    kv_end = cute::min<int64_t>(kv_end, row_end + p.pos_offset);  // keys < row_end - 1 + off + 1
  }
  if (kv_end <= 0) return 0;
  return int((kv_end + T::kBlockN - 1) / T::kBlockN);
}

// ---------------------------------------------------------------- kernel
template <class T>
__global__ void __launch_bounds__(T::kNumThreads, 1)
    flash_fwd_kernel(CUTE_GRID_CONSTANT typename T::Params const p) {
  using Element = typename T::Element;
  using Pipeline = typename T::Pipeline;
  using PipelineState = typename T::PipelineState;
  constexpr int kBlockM = T::kBlockM, kBlockN = T::kBlockN, kHeadDim = T::kHeadDim;

  extern __shared__ char smem_raw[];
  auto& ss = *reinterpret_cast<typename T::SharedStorage*>(smem_raw);

  const int m_block = p.num_m_blocks - 1 - int(blockIdx.x);  // longest causal tiles first
  const int head = blockIdx.y;
  const int kv_head = head / p.head_ratio;
  const int warp_idx = cutlass::canonical_warp_idx_sync();
  const int warp_group = cutlass::canonical_warp_group_idx();
  const int n_blocks = visible_key_blocks<T>(p, m_block);

  if (warp_idx == 0 && cute::elect_one_sync()) {
    prefetch_qkv_descriptors(p);
    ss.bar_q.init(1);
  }

  typename Pipeline::Params pipe_params;
  pipe_params.role =
      warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == 0;
  pipe_params.num_consumers = T::kNumMmaThreads;
  pipe_params.transaction_bytes = T::kTmaBytesKV;
  Pipeline pipe_k(ss.pipe_k, pipe_params, Shape<_1, _1, _1>{});
  Pipeline pipe_v(ss.pipe_v, pipe_params, Shape<_1, _1, _1>{});
  __syncthreads();  // barrier inits visible to every thread

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename T::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename T::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename T::SmemLayoutV{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename T::SmemLayoutVt{});

  if (warp_group == 0) {
    // ------------------------------------------------------------ producer
    cutlass::arch::warpgroup_reg_dealloc<T::kProducerRegs>();
    if (threadIdx.x != 0 || n_blocks == 0) return;
    Tensor mQ = p.tma_q.get_tma_tensor(make_shape(p.n_q, int32_t(kHeadDim), p.num_heads));
    Tensor mK = p.tma_k.get_tma_tensor(make_shape(p.n_k, int32_t(kHeadDim), p.num_kv_heads));
    Tensor mV = p.tma_v.get_tma_tensor(make_shape(p.n_k, int32_t(kHeadDim), p.num_kv_heads));
    Tensor gQ = local_tile(mQ(_, _, head), Shape<Int<kBlockM>, Int<kHeadDim>>{},
                           make_coord(m_block, _0{}));  // (M, D)
    Tensor gK = local_tile(mK(_, _, kv_head), Shape<Int<kBlockN>, Int<kHeadDim>>{},
                           make_coord(_, _0{}));  // (N, D, n)
    Tensor gV = local_tile(mV(_, _, kv_head), Shape<Int<kBlockN>, Int<kHeadDim>>{},
                           make_coord(_, _0{}));  // (N, D, n)
    auto [tQg, tQs] =
        tma_partition(p.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
    auto [tKg, tKs] =
        tma_partition(p.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
    auto [tVg, tVs] =
        tma_partition(p.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));

    ss.bar_q.arrive_and_expect_tx(T::kTmaBytesQ);
    copy(p.tma_q.with(reinterpret_cast<uint64_t&>(ss.bar_q), 0), tQg, tQs);
    PipelineState st = cutlass::make_producer_start_state<Pipeline>();
    // Consumption order: K[last], then K[n - 1] before V[n].
    PipelineState st_v = st;
    pipe_k.producer_acquire(st);
    copy(p.tma_k.with(*pipe_k.producer_get_barrier(st), 0), tKg(_, n_blocks - 1),
         tKs(_, st.index()));
    ++st;
    for (int n = n_blocks - 1; n >= 0; --n) {
      if (n > 0) {
        pipe_k.producer_acquire(st);
        copy(p.tma_k.with(*pipe_k.producer_get_barrier(st), 0), tKg(_, n - 1), tKs(_, st.index()));
        ++st;
      }
      pipe_v.producer_acquire(st_v);
      copy(p.tma_v.with(*pipe_v.producer_get_barrier(st_v), 0), tVg(_, n), tVs(_, st_v.index()));
      ++st_v;
    }
    return;
  }

  // -------------------------------------------------------------- consumers
  cutlass::arch::warpgroup_reg_alloc<T::kConsumerRegs>();
  const int tidx = int(threadIdx.x) - cutlass::NumThreadsPerWarpGroup;  // [0, kNumMmaThreads)
  typename T::TiledMmaS mma_s;
  typename T::TiledMmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tidx);
  auto thr_o = mma_o.get_thread_slice(tidx);

  Tensor tOrO = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor O_rc = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
  Tensor cO_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
  constexpr int kRows = decltype(size<0>(O_rc))::value;  // query rows held by this thread
  OnlineSoftmax<kRows> softmax;
  clear(tOrO);

  if (n_blocks > 0) {
    Tensor tSrQ = thr_s.partition_fragment_A(sQ);   // (MMA, MMA_M, MMA_K)
    Tensor tSrK = thr_s.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, stages)
    Tensor tOrV = thr_o.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, stages)
    Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
    Tensor cS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));

    // Visible-key limit of each held row: key j is visible iff j < limit (clamped to n_k).
    int row_limit[kRows];
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = int64_t(m_block) * kBlockM + get<0>(cS_rc(r, 0));
      int64_t lim = p.n_k;
      if constexpr (T::kCausal) lim = cute::min<int64_t>(lim, row + p.pos_offset + 1);
      row_limit[r] = int(cute::max<int64_t>(lim, 0));
    }
    // Tiles with n * kBlockN + kBlockN <= min_limit need no mask.
    int min_limit = p.n_k;
    if constexpr (T::kCausal) {
      const int64_t lim = int64_t(m_block) * kBlockM + p.pos_offset + 1;
      min_limit = int(cute::max<int64_t>(cute::min<int64_t>(lim, p.n_k), 0));
    }
    const float scale_log2 = p.scale_log2;

    // Masks S of key tile n (keys past each row's limit) when it crosses the causal
    // diagonal or the n_k edge, then the online softmax.
    auto mask_softmax = [&](auto& tSrS, int n) {
      if ((n + 1) * kBlockN > min_limit) {
        Tensor S = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < kRows; ++r) {
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < size<1>(S); ++c) {
            if (n * kBlockN + get<1>(cS_rc(r, c)) >= row_limit[r]) S(r, c) = -INFINITY;
          }
        }
      }
      softmax.update(tSrS, scale_log2);
    };
    Tensor rP =
        make_tensor_like<Element>(partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{}));
    Tensor tOrP = make_tensor(rP.data(), acc_to_a_operand(rP.layout()));

    // Pingpong: the consumer warpgroups take turns issuing their GEMMs, so that one
    // warpgroup's softmax overlaps the other's tensor-core work.
    const int wg = warp_group - 1;
    auto turn_begin = [&]() {
      if constexpr (T::kPingpong) cutlass::arch::NamedBarrier::sync(2 * 128, wg);
    };
    auto turn_end = [&]() {
      if constexpr (T::kPingpong) cutlass::arch::NamedBarrier::arrive(2 * 128, 1 - wg);
    };
    if constexpr (T::kPingpong) {
      if (wg == 1) cutlass::arch::NamedBarrier::arrive(2 * 128, 0);  // warpgroup 0 goes first
    }

    ss.bar_q.wait(0);
    PipelineState st_k, st_v;
    {
      Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
      pipe_k.consumer_wait(st_k);
      turn_begin();
      wg_gemm_issue<true>(mma_s, tSrQ, tSrK(_, _, _, st_k.index()), tSrS);
      turn_end();
      warpgroup_wait<0>();
      warpgroup_fence_operand(tSrS);
      pipe_k.consumer_release(st_k);
      ++st_k;
      mask_softmax(tSrS, n_blocks - 1);
      convert_p(rP, tSrS);
    }
    for (int n = n_blocks - 2; n >= 0; --n) {
      Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
      pipe_k.consumer_wait(st_k);
      pipe_v.consumer_wait(st_v);
      turn_begin();
      wg_gemm_issue<true>(mma_s, tSrQ, tSrK(_, _, _, st_k.index()), tSrS);
      wg_gemm_issue<false>(mma_o, tOrP, tOrV(_, _, _, st_v.index()), tOrO);
      turn_end();
      warpgroup_wait<1>();  // S done, P V still running
      warpgroup_fence_operand(tSrS);
      pipe_k.consumer_release(st_k);
      ++st_k;
      mask_softmax(tSrS, n);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
      warpgroup_fence_operand(rP);
      pipe_v.consumer_release(st_v);
      ++st_v;
      softmax.rescale(O_rc);
      convert_p(rP, tSrS);
    }
    pipe_v.consumer_wait(st_v);
    turn_begin();
    wg_gemm_issue<false>(mma_o, tOrP, tOrV(_, _, _, st_v.index()), tOrO);
    turn_end();
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    pipe_v.consumer_release(st_v);
    if constexpr (T::kPingpong) {
      if (wg == 0) cutlass::arch::NamedBarrier::sync(2 * 128, 0);  // consume the last arrival
    }
  }

  // -------------------------------------------------------------- epilogue
  store_o_lse<true>(
      p, head, tidx, O_rc, cO_rc, softmax,
      [&](int r) { return m_block * kBlockM + get<0>(cO_rc(r, 0)); },
      [&](int row) { return row < p.n_q; });
}

// ---------------------------------------------------------------- launcher
template <class T>
Status run_flash_fwd(const AttentionParams& a, cudaStream_t stream) {
  constexpr int D = T::kHeadDim;
  // A smaller head_dim (multiple of 8, e.g. 48 on the 64 instance) runs padded: the tensor
  // maps' dim extent is the real head_dim while the box stays D, so TMA zero-fills columns
  // head_dim..D-1 of every Q/K/V tile (adding 0 to Q K^T and to the unused O columns), and the
  // epilogue stores only columns < head_dim.
  if (a.head_dim <= 0 || a.head_dim > D || a.head_dim % 8 != 0) return Status::kUnsupported;
  typename T::Params p;
  set_qkv_tma<typename T::Base>(a, a.head_dim, a.n_k, p);
  set_attention_params(a, p);
  p.num_m_blocks = (a.n_q + T::kBlockM - 1) / T::kBlockM;
  p.head_dim = a.head_dim;
  // Clamped so that row + offset cannot overflow; with n_q, n_k < 2^30 the mask is unchanged.
  p.pos_offset = cute::max<int64_t>(cute::min<int64_t>(a.q_pos0 - a.k_pos0, int64_t(1) << 40),
                                    -(int64_t(1) << 40));
  return launch_attention(flash_fwd_kernel<T>, dim3(p.num_m_blocks, a.num_heads), T::kNumThreads,
                          T::kSmemBytes, stream, p, "launch flash_fwd_kernel");
}

}  // namespace mprefill::cuda::flash
