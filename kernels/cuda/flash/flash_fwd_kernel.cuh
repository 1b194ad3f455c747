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

#include <cuda_runtime_api.h>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>

#include <cmath>
#include <cstdint>
#include <cute/arch/cluster_sm90.hpp>
#include <cute/tensor.hpp>
#include <cutlass/pipeline/pipeline.hpp>

#include "kernels/attention.h"
#include "kernels/cuda/check.h"

namespace mprefill::cuda::flash {

using namespace cute;

// ---------------------------------------------------------------- traits
template <typename Element_, int kHeadDim_, bool kCausal_>
struct FwdTraits {
  using Element = Element_;
  using ElementAccum = float;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kCausal = kCausal_;
  static constexpr int kBlockM = 128;
#ifndef MPREFILL_FLASH_BLOCK_N_NONCAUSAL
#define MPREFILL_FLASH_BLOCK_N_NONCAUSAL 176
#endif
  // Non-causal head_dim 128 uses a wider key tile (fewer softmax rounds per FLOP; +5%
  // measured, bench/NOTES.md v3). Causal keeps 128 so at most two tiles cross the diagonal.
  static constexpr int kBlockN =
      (kHeadDim == 128 && !kCausal_) ? MPREFILL_FLASH_BLOCK_N_NONCAUSAL : 128;
  static constexpr int kStages = 2;
  static constexpr int kNumMmaWG = kBlockM / 64;
  static constexpr int kNumMmaThreads = kNumMmaWG * cutlass::NumThreadsPerWarpGroup;
  static constexpr int kNumThreads = kNumMmaThreads + cutlass::NumThreadsPerWarpGroup;
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
#ifndef MPREFILL_FLASH_PINGPONG
#define MPREFILL_FLASH_PINGPONG 1
#endif
  static constexpr bool kPingpong = MPREFILL_FLASH_PINGPONG != 0 && kNumMmaWG == 2;

  static_assert(kHeadDim == 64 || kHeadDim == 128, "head_dim must be 64 or 128");
  static_assert(kBlockM % 64 == 0 && kBlockN % 16 == 0 && kBlockN <= 256, "bad tile");
  static_assert(kStages >= 2, "need at least double buffering");
  static_assert(kProducerRegs * 128 + kConsumerRegs * kNumMmaThreads <= 65536,
                "register reallocation exceeds the register file");
  static_assert(sizeof(Element) == 2, "16-bit elements only");

  using TileShapeMNK = Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDim>>;
  using TileShapePV = Shape<Int<kBlockM>, Int<kHeadDim>, Int<kBlockN>>;
  using AtomLayoutMNK = Layout<Shape<Int<kNumMmaWG>, _1, _1>>;
  using TiledMmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, ElementAccum, TileShapeMNK>(), AtomLayoutMNK{}));
  using TiledMmaO =
      decltype(make_tiled_mma(GMMA::rs_op_selector<Element, Element, ElementAccum, TileShapePV,
                                                   GMMA::Major::K, GMMA::Major::MN>(),
                              AtomLayoutMNK{}));

  // 128-byte swizzled K-major rows (64 elements) for Q, K and V.
  using SmemAtom = GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutK =
      decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutV = SmemLayoutK;
  // V viewed as (head_dim, kBlockN, stages): the MN-major B operand of O += P V.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutV{},
      make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  // Global tensors as (token, dim, head) with unit stride along dim.
  using ShapeQKV = Shape<int32_t, int32_t, int32_t>;
  using StrideQKV = Stride<int64_t, _1, int64_t>;
  using GmemLayoutQKV = Layout<ShapeQKV, StrideQKV>;
  using TmaQ = decltype(make_tma_copy(
      SM90_TMA_LOAD{},
      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemLayoutQKV{}),
      SmemLayoutQ{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}, _1{}));
  using TmaKV = decltype(make_tma_copy(
      SM90_TMA_LOAD{},
      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemLayoutQKV{}),
      take<0, 2>(SmemLayoutK{}), Shape<Int<kBlockN>, Int<kHeadDim>>{}, _1{}));

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;
  // Whole boxes: TMA counts zero-filled out-of-bounds elements (row tail, padded head_dim) too.
  static constexpr uint32_t kTmaBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTmaBytesKV = kBlockN * kHeadDim * sizeof(Element);

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutV>, 1024> v;
    typename Pipeline::SharedStorage pipe_k;
    typename Pipeline::SharedStorage pipe_v;
    cutlass::arch::ClusterTransactionBarrier bar_q;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "shared memory over the sm90 opt-in limit");

  struct Params {
    TmaQ tma_q;
    TmaKV tma_k;
    TmaKV tma_v;
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

// ---------------------------------------------------------------- register layouts
// Accumulator ((2, 2, N/8), MMA_M, MMA_N) -> (rows = (2, MMA_M), cols = (2, N/8, MMA_N)).
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_rowcol(Layout l) {
  static_assert(decltype(rank<0>(l))::value == 3, "expect an sm90 accumulator layout");
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)),
                     make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// Accumulator of S = Q K^T reinterpreted as the register A operand of O += P V:
// ((2, 2, N/8), MMA_M, MMA_N) -> ((2, 2, 2), MMA_M, (N/16, MMA_N)).
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_to_a_operand(Layout l) {
  auto v = logical_divide(get<0>(l), Shape<Underscore, Underscore, _2>{});  // (2,2,(2,N/16))
  return make_layout(make_layout(get<0>(v), get<1>(v), get<2, 0>(v)), get<1>(l),
                     make_layout(get<2, 1>(v), get<2>(l)));
}

// Issues C (+)= A B over all k blocks as one committed wgmma group; the caller waits
// (warpgroup_wait) and fences C before reading it.
template <bool kZeroInit, class TiledMma, class TA, class TB, class TC>
CUTE_DEVICE void wg_gemm_issue(TiledMma& mma, TA const& a, TB const& b, TC& c) {
  constexpr bool kRegA = !is_base_of<GMMA::DescriptorIterator, typename TiledMma::FrgTypeA>::value;
  warpgroup_fence_operand(c);
  if constexpr (kRegA) warpgroup_fence_operand(const_cast<TA&>(a));
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTLASS_PRAGMA_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

template <int kWidth>
CUTE_DEVICE float quad_allreduce_max(float x) {
  CUTLASS_PRAGMA_UNROLL
  for (int o = 1; o < kWidth; o *= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
template <int kWidth>
CUTE_DEVICE float quad_allreduce_sum(float x) {
  CUTLASS_PRAGMA_UNROLL
  for (int o = 1; o < kWidth; o *= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

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
    cute::prefetch_tma_descriptor(p.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_v.get_tma_descriptor());
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
  float row_max[kRows], row_sum[kRows];
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
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
    float corr[kRows];

    // S <- exp2(S * scale_log2 - running max) in place; row statistics updated and the
    // rescale factor of the previous O kept in corr.
    auto online_softmax = [&](auto& tSrS, int n) {
      Tensor S = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
      if ((n + 1) * kBlockN > min_limit) {
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < kRows; ++r) {
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < size<1>(S); ++c) {
            if (n * kBlockN + get<1>(cS_rc(r, c)) >= row_limit[r]) S(r, c) = -INFINITY;
          }
        }
      }
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < kRows; ++r) {
        float mx = row_max[r];
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < size<1>(S); ++c) mx = fmaxf(mx, S(r, c));
        mx = quad_allreduce_max<4>(mx);
        const float base = mx == -INFINITY ? 0.f : mx * scale_log2;
        corr[r] = exp2f(row_max[r] * scale_log2 - base);  // 0 when row_max = -inf
        row_max[r] = mx;
        float sum = 0.f;
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < size<1>(S); ++c) {
          S(r, c) = exp2f(fmaf(S(r, c), scale_log2, -base));
          sum += S(r, c);
        }
        row_sum[r] = row_sum[r] * corr[r] + sum;
      }
    };
    auto rescale_o = [&]() {
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < kRows; ++r) {
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < size<1>(O_rc); ++c) O_rc(r, c) *= corr[r];
      }
    };
    Tensor rP =
        make_tensor_like<Element>(partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{}));
    Tensor tOrP = make_tensor(rP.data(), acc_to_a_operand(rP.layout()));
    auto convert_p = [&](auto const& tSrS) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(tSrS); ++i) rP(i) = Element(tSrS(i));
    };

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
      online_softmax(tSrS, n_blocks - 1);
      convert_p(tSrS);
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
      online_softmax(tSrS, n);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
      warpgroup_fence_operand(rP);
      pipe_v.consumer_release(st_v);
      ++st_v;
      rescale_o();
      convert_p(tSrS);
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
  Element* o_head = p.o + int64_t(head) * p.o_head_stride;
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const float sum = quad_allreduce_sum<4>(row_sum[r]);
    const bool empty = !(sum > 0.f);
    const float inv = empty ? 0.f : 1.f / sum;
    const int row = m_block * kBlockM + get<0>(cO_rc(r, 0));
    if (row < p.n_q) {
      Element* o_row = o_head + int64_t(row) * p.o_row_stride;
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(O_rc); c += 2) {
        // (c, c + 1) are adjacent columns (mode (0,0) of the accumulator has size 2).
        const int col = get<1>(cO_rc(r, c));
        if (col >= p.head_dim) continue;  // padded head_dim: column pairs never straddle it
        const Element lo(O_rc(r, c) * inv), hi(O_rc(r, c + 1) * inv);
        *reinterpret_cast<uint32_t*>(o_row + col) = uint32_t(lo.raw()) | (uint32_t(hi.raw()) << 16);
      }
      if (p.lse != nullptr && (tidx % 4) == 0) {
        p.lse[int64_t(head) * p.lse_head_stride + row] =
            empty ? -INFINITY : row_max[r] * p.scale + logf(sum);
      }
    }
  }
}

// ---------------------------------------------------------------- launcher
template <class T>
Status run_flash_fwd(const AttentionParams& a, cudaStream_t stream) {
  using Element = typename T::Element;
  constexpr int D = T::kHeadDim;
  // A smaller head_dim (multiple of 8, e.g. 48 on the 64 instance) runs padded: the tensor
  // maps' dim extent is the real head_dim while the box stays D, so TMA zero-fills columns
  // head_dim..D-1 of every Q/K/V tile (adding 0 to Q K^T and to the unused O columns), and the
  // epilogue stores only columns < head_dim.
  if (a.head_dim <= 0 || a.head_dim > D || a.head_dim % 8 != 0) return Status::kUnsupported;
  auto gmem = [&](const void* ptr, int32_t n, int32_t heads, int64_t row_stride,
                  int64_t head_stride) {
    return make_tensor(make_gmem_ptr(static_cast<Element const*>(ptr)),
                       make_layout(make_shape(n, int32_t(a.head_dim), heads),
                                   make_stride(row_stride, _1{}, head_stride)));
  };
  typename T::Params p;
  p.tma_q =
      make_tma_copy(SM90_TMA_LOAD{}, gmem(a.q, a.n_q, a.num_heads, a.q_row_stride, a.q_head_stride),
                    typename T::SmemLayoutQ{}, Shape<Int<T::kBlockM>, Int<D>>{}, _1{});
  p.tma_k = make_tma_copy(
      SM90_TMA_LOAD{}, gmem(a.k, a.n_k, a.num_kv_heads, a.k_row_stride, a.k_head_stride),
      take<0, 2>(typename T::SmemLayoutK{}), Shape<Int<T::kBlockN>, Int<D>>{}, _1{});
  p.tma_v = make_tma_copy(
      SM90_TMA_LOAD{}, gmem(a.v, a.n_k, a.num_kv_heads, a.v_row_stride, a.v_head_stride),
      take<0, 2>(typename T::SmemLayoutK{}), Shape<Int<T::kBlockN>, Int<D>>{}, _1{});
  p.o = static_cast<Element*>(a.o);
  p.lse = a.lse;
  p.o_row_stride = a.o_row_stride;
  p.o_head_stride = a.o_head_stride;
  p.lse_head_stride = a.lse_head_stride;
  p.n_q = a.n_q;
  p.n_k = a.n_k;
  p.num_heads = a.num_heads;
  p.num_kv_heads = a.num_kv_heads;
  p.head_ratio = a.num_heads / a.num_kv_heads;
  p.num_m_blocks = (a.n_q + T::kBlockM - 1) / T::kBlockM;
  p.head_dim = a.head_dim;
  // Clamped so that row + offset cannot overflow; with n_q, n_k < 2^30 the mask is unchanged.
  p.pos_offset = cute::max<int64_t>(cute::min<int64_t>(a.q_pos0 - a.k_pos0, int64_t(1) << 40),
                                    -(int64_t(1) << 40));
  p.scale = a.scale;
  p.scale_log2 = a.scale * 1.4426950408889634f;

  auto kernel = flash_fwd_kernel<T>;
  MPREFILL_CUDA_TRY(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes));
  const dim3 grid(p.num_m_blocks, a.num_heads);
  kernel<<<grid, T::kNumThreads, T::kSmemBytes, stream>>>(p);
  MPREFILL_CUDA_LAUNCH_CHECK("flash_fwd_kernel");
  return Status::kOk;
}

}  // namespace mprefill::cuda::flash
