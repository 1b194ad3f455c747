// Pieces shared by the Hopper attention kernels (flash/ and sparse/, CuTe): the smem, MMA
// and TMA types of a tile, WGMMA issue, accumulator views, the online softmax in exp2, the
// O / LSE epilogue, TMA and cp.async tile loads, the sparse patterns' key-set set-up, and
// the host-side Params / TMA descriptor / launch set-up.
//
// A file that needs CuTe's extended 64xN WGMMA shapes (flash: key tile 176) defines
// CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED before including this header.
#pragma once

#include <cuda_runtime_api.h>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>

#include <cmath>
#include <cstdint>
#include <cute/arch/cluster_sm90.hpp>
#include <cute/tensor.hpp>
#include <type_traits>

#include "kernels/attention.h"
#include "kernels/cuda/attn/sparse_walk.h"
#include "kernels/cuda/check.h"

namespace mprefill::cuda::attn {

using namespace cute;

// ---------------------------------------------------------------- tile types
// Types of one attention tile: S = Q K^T is (kBlockM x kBlockN) over kHeadDim, O += P V is
// (kBlockM x kHeadDim) over kBlockN; kNumMmaWG consumer warpgroups split kBlockM (64 rows
// each). K and V live in kStages-deep smem rings. A kernel's traits derive from this.
template <typename Element_, int kBlockM_, int kBlockN_, int kHeadDim_, int kStages_,
          int kNumMmaWG_>
struct TileTypes {
  using Element = Element_;
  using ElementAccum = float;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kStages = kStages_;
  static constexpr int kNumMmaWG = kNumMmaWG_;

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

  // Whole boxes: TMA counts zero-filled out-of-bounds elements (row tail, padded head_dim) too.
  static constexpr uint32_t kTmaBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTmaBytesKV = kBlockN * kHeadDim * sizeof(Element);

  static_assert(kHeadDim == 64 || kHeadDim == 128, "head_dim must be 64 or 128");
  static_assert(sizeof(Element) == 2, "16-bit elements only");
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

// ---------------------------------------------------------------- softmax
// Online softmax state of the kRows query rows one consumer thread holds (the row mode of
// acc_rowcol; a row's 64-or-more columns are spread over the 4 threads of a quad).
template <int kRows>
struct OnlineSoftmax {
  float row_max[kRows], row_sum[kRows];
  float corr[kRows];  // factor the O of the previous tiles is rescaled by

  CUTE_DEVICE OnlineSoftmax() {
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.f;
    }
  }

  // S <- exp2(S * scale_log2 - running max) in place for the accumulator tSrS of one key
  // tile (masked entries -inf); row statistics updated, corr = exp2 of the max's change
  // (0 while the running max was -inf).
  template <class TensorS>
  CUTE_DEVICE void update(TensorS& tSrS, float scale_log2) {
    Tensor S = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float mx = row_max[r];
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(S); ++c) mx = fmaxf(mx, S(r, c));
      mx = quad_allreduce_max<4>(mx);
      const float base = mx == -INFINITY ? 0.f : mx * scale_log2;
      corr[r] = exp2f(row_max[r] * scale_log2 - base);
      row_max[r] = mx;
      float sum = 0.f;
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(S); ++c) {
        S(r, c) = exp2f(fmaf(S(r, c), scale_log2, -base));
        sum += S(r, c);
      }
      row_sum[r] = row_sum[r] * corr[r] + sum;
    }
  }

  // O (row/col view) *= corr of its row.
  template <class TensorO>
  CUTE_DEVICE void rescale(TensorO& O_rc) const {
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(O_rc); ++c) O_rc(r, c) *= corr[r];
    }
  }
};

// P (element type, the register A operand's storage) <- S (fp32 accumulator).
template <class TensorP, class TensorS>
CUTE_DEVICE void convert_p(TensorP& rP, TensorS const& tSrS) {
  using Element = typename TensorP::value_type;
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < size(tSrS); ++i) rP(i) = Element(tSrS(i));
}

// ---------------------------------------------------------------- epilogue
// Stores O / row_sum (element type, adjacent column pairs as one 32-bit store) and the LSE
// (natural log, when p.lse is set; -inf and O = 0 for a row without visible keys) of the
// rows this thread holds: held row r is local query row local_row(r) (int or int64_t),
// stored iff stored(row). kColLimit: columns >= p.head_dim (a head_dim zero-padded in
// smem) are not stored; column pairs never straddle it.
template <bool kColLimit, int kRows, class P, class TensorO, class TensorC, class RowFn,
          class StoredFn>
CUTE_DEVICE void store_o_lse(P const& p, int head, int tidx, TensorO const& O_rc,
                             TensorC const& cO_rc, OnlineSoftmax<kRows> const& sm,
                             RowFn&& local_row, StoredFn&& stored) {
  using Element = std::remove_pointer_t<decltype(p.o)>;
  Element* o_head = p.o + int64_t(head) * p.o_head_stride;
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const float sum = quad_allreduce_sum<4>(sm.row_sum[r]);
    const bool empty = !(sum > 0.f);
    const float inv = empty ? 0.f : 1.f / sum;
    const auto row = local_row(r);
    if (stored(row)) {
      Element* o_row = o_head + int64_t(row) * p.o_row_stride;
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(O_rc); c += 2) {
        // (c, c + 1) are adjacent columns (mode (0,0) of the accumulator has size 2).
        const int col = get<1>(cO_rc(r, c));
        if constexpr (kColLimit) {
          if (col >= p.head_dim) continue;
        }
        const Element lo(O_rc(r, c) * inv), hi(O_rc(r, c + 1) * inv);
        *reinterpret_cast<uint32_t*>(o_row + col) = uint32_t(lo.raw()) | (uint32_t(hi.raw()) << 16);
      }
      if (p.lse != nullptr && (tidx % 4) == 0) {
        p.lse[int64_t(head) * p.lse_head_stride + row] =
            empty ? -INFINITY : sm.row_max[r] * p.scale + logf(sum);
      }
    }
  }
}

// ---------------------------------------------------------------- tile loads
// Prefetches the Q, K and V TMA descriptors of p (one thread).
template <class P>
CUTE_DEVICE void prefetch_qkv_descriptors(P const& p) {
  cute::prefetch_tma_descriptor(p.tma_q.get_tma_descriptor());
  cute::prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
  cute::prefetch_tma_descriptor(p.tma_v.get_tma_descriptor());
}

// Start of a kernel with its own ring barriers: thread 0 prefetches the TMA descriptors and
// initialises ss.bar_q (one arrival: the Q load) and, through init_slot(i), the barriers of
// ring slot i < kStages; then the CTA syncs, so every thread sees them initialised.
template <int kStages, class P, class SharedStorage, class InitSlot>
CUTE_DEVICE void init_ring_barriers(P const& p, SharedStorage& ss, InitSlot&& init_slot) {
  if (threadIdx.x == 0) {
    prefetch_qkv_descriptors(p);
    ss.bar_q.init(1);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kStages; ++i) init_slot(i);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
}

// TMA load of the (kRows x kHeadDim) box at row `row` (any offset; rows outside the tensor
// are zero-filled) of head `head` of mX (token, dim, head) into sX (slot `stage` of its
// third mode when sX has one), completing on the transaction barrier `bar`.
template <int kRows, int kHeadDim, class Tma, class TensorM, class TensorS>
CUTE_DEVICE void tma_load_rows(Tma const& tma, uint64_t& bar, TensorM const& mX, int head,
                               int32_t row, TensorS const& sX, int stage = 0) {
  Tensor gX = local_tile(domain_offset(make_coord(row, _0{}), mX(_, _, head)),
                         Shape<Int<kRows>, Int<kHeadDim>>{}, make_coord(_0{}, _0{}));
  auto [tXg, tXs] =
      tma_partition(tma, _0{}, Layout<_1>{}, group_modes<0, 2>(sX), group_modes<0, 2>(gX));
  if constexpr (decltype(rank(sX))::value == 3) {
    copy(tma.with(bar, 0), tXg, tXs(_, stage));
  } else {
    copy(tma.with(bar, 0), tXg, tXs);
  }
}

// 16-byte cp.async, zero-filling the destination when !valid.
CUTE_DEVICE void cp_async_16(uint32_t smem_addr, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem),
               "r"(valid ? 16 : 0)
               : "memory");
}
CUTE_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
CUTE_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Gather of up to kBlockN listed key rows (TMA gather is Blackwell-only) by the 128 threads
// of a producer warpgroup: thread tid copies 16-byte chunk ch of tile rows row0 + i *
// kRowStep with cp.async. The column indices are loaded first (independent loads, -1 past
// the list's end: the row is zero-filled), then the copies are issued.
template <int kBlockN, int kHeadDim>
struct RowGather {
  static constexpr int kChunksPerRow = kHeadDim / 8;
  static constexpr int kRowStep = 128 / kChunksPerRow;
  static constexpr int kIters = kBlockN / kRowStep;
  int ch, row0;
  int cols[kIters];

  // List positions [s, e) of col (I: the caller's position type).
  template <class I>
  CUTE_DEVICE RowGather(int tid, const int* col, I s, I e)
      : ch(tid % kChunksPerRow), row0(tid / kChunksPerRow) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kIters; ++i) {
      const I pos = s + row0 + i * kRowStep;
      cols[i] = pos < e ? __ldg(col + pos) : -1;
    }
  }

  // Key row c of the shard starting at global key k_pos0 is at base + (c - k_pos0) *
  // row_stride; sX is swizzled, so addresses go through the tensor, not the layout.
  template <class Element, class TensorS>
  CUTE_DEVICE void issue(TensorS& sX, int stage, const Element* base, int64_t row_stride,
                         int64_t k_pos0) const {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kIters; ++i) {
      const bool ok = cols[i] >= 0;
      const Element* src = base + (ok ? (int64_t(cols[i]) - k_pos0) * row_stride : 0) + ch * 8;
      cp_async_16(cute::cast_smem_ptr_to_uint(&sX(row0 + i * kRowStep, ch * 8, stage)), src, ok);
    }
  }
};

// ---------------------------------------------------------------- sparse key sets
// (kernels/cuda/attn/sparse_walk.h, host/device: the CPU replay test runs them too.)
using walk::ashape_ranges;
using walk::vs_column_span;

// ---------------------------------------------------------------- host set-up
// Params fields every kernel has (o / lse, shape, GQA ratio, scales).
template <class Params>
void set_attention_params(const AttentionParams& a, Params& p) {
  using Element = std::remove_pointer_t<decltype(p.o)>;
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
  p.scale = a.scale;
  p.scale_log2 = a.scale * 1.4426950408889634f;
}

// TMA descriptors of Q, K and V for the boxes of Types (a TileTypes), over tensors (token,
// dim, head) with dim extent `dim` (<= kHeadDim: TMA zero-fills the box's columns past it)
// and n_k_rows K/V rows.
template <class Types, class Params>
void set_qkv_tma(const AttentionParams& a, int32_t dim, int32_t n_k_rows, Params& p) {
  using Element = typename Types::Element;
  constexpr int D = Types::kHeadDim;
  auto gmem = [&](const void* ptr, int32_t n, int32_t heads, int64_t row_stride,
                  int64_t head_stride) {
    return make_tensor(
        make_gmem_ptr(static_cast<Element const*>(ptr)),
        make_layout(make_shape(n, dim, heads), make_stride(row_stride, _1{}, head_stride)));
  };
  p.tma_q =
      make_tma_copy(SM90_TMA_LOAD{}, gmem(a.q, a.n_q, a.num_heads, a.q_row_stride, a.q_head_stride),
                    typename Types::SmemLayoutQ{}, Shape<Int<Types::kBlockM>, Int<D>>{}, _1{});
  p.tma_k = make_tma_copy(
      SM90_TMA_LOAD{}, gmem(a.k, n_k_rows, a.num_kv_heads, a.k_row_stride, a.k_head_stride),
      take<0, 2>(typename Types::SmemLayoutK{}), Shape<Int<Types::kBlockN>, Int<D>>{}, _1{});
  p.tma_v = make_tma_copy(
      SM90_TMA_LOAD{}, gmem(a.v, n_k_rows, a.num_kv_heads, a.v_row_stride, a.v_head_stride),
      take<0, 2>(typename Types::SmemLayoutK{}), Shape<Int<Types::kBlockN>, Int<D>>{}, _1{});
}

// Opts the kernel into `smem_bytes` of dynamic shared memory and launches it on `stream`;
// `what` names it in a launch error.
template <class Params>
Status launch_attention(void (*kernel)(Params), dim3 grid, int threads, int smem_bytes,
                        cudaStream_t stream, const Params& p, const char* what) {
  MPREFILL_CUDA_TRY(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  kernel<<<grid, threads, smem_bytes, stream>>>(p);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return detail::record_cuda_error(e, what, __FILE__, __LINE__);
  return Status::kOk;
}

}  // namespace mprefill::cuda::attn
