// Host entry of the sparse attention forward: argument checks and dispatch over
// dtype x head_dim onto the explicit instances in inst/ (pattern kind is a kernel
// parameter, so one instance serves vertical-slash, block-sparse and A-shape).
#include <cstdint>
#include <cstdio>

#include "kernels/cuda/check.h"
#include "kernels/cuda/common/launch_common.h"
#include "kernels/cuda/sparse/sparse_attention.h"
#include "kernels/cuda/sparse/sparse_launch.h"

namespace mprefill::cuda {
namespace {

using sparse::Bf16;
using sparse::Fp16;
using sparse::PatternArgs;
using sparse::run_fwd;

#ifdef MPREFILL_CUDA_SUBSET
constexpr const char* kBuilt = "bf16 / head_dim 128 (MPREFILL_CUDA_SUBSET build)";
#else
constexpr const char* kBuilt = "bf16, fp16 x head_dim 64, 128";
#endif

Status unsupported(const char* fn, const AttentionParams& p) {
  char msg[200];
  std::snprintf(msg, sizeof(msg), "%s: unsupported dtype %s / head_dim %d (built: %s)", fn,
                to_string(p.dtype), p.head_dim, kBuilt);
  return detail::record_error(Status::kUnsupported, msg, __FILE__, __LINE__);
}

// Checks shared by the three patterns; kOk means `run` may launch.
Status check_common(const char* fn, const AttentionParams& p) {
  const Status v = validate(p);
  if (v != Status::kOk) return detail::record_error(v, fn, __FILE__, __LINE__);
  MPREFILL_CHECK_ARG(p.causal, Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(p.q_pos0 >= 0, Status::kInvalidArgument);
  if (!sparse_attention_supported(p.dtype, p.head_dim)) return unsupported(fn, p);
  return check_tma_layout(p);
}

// kAuto: v2 for vertical-slash and A-shape, v1 for block-sparse (measured on the H100,
// bench/NOTES.md section 3: v2 +7% on the clustered Llama-3-8B mix at 32K, +9% on the
// dense mask; v1 +25% on random top-100 block lists, whose adjacent blocks share few key
// tiles).
Status run(const AttentionParams& p, PatternArgs pat, SparseKernelGen gen, cudaStream_t s) {
  MPREFILL_CHECK_ARG(gen == SparseKernelGen::kAuto || gen == SparseKernelGen::kV1 ||
                         gen == SparseKernelGen::kV2 || gen == SparseKernelGen::kSkel ||
                         gen == SparseKernelGen::kSkelOwner || gen == SparseKernelGen::kSkelPlan,
                     Status::kInvalidArgument);
  if (p.n_q == 0) return Status::kOk;
  switch (gen) {
    case SparseKernelGen::kV1:
      pat.version = 1;
      break;
    case SparseKernelGen::kV2:
      pat.version = 2;
      break;
    case SparseKernelGen::kSkel:
      pat.version = 3;
      break;
    case SparseKernelGen::kSkelOwner:
      pat.version = 4;
      break;
    case SparseKernelGen::kSkelPlan:
      pat.version = 5;
      break;
    default:
      pat.version = pat.kind == 1 ? 1 : 2;
  }
  switch (p.dtype) {
    case DType::kBF16:
      if (p.head_dim == 128) return run_fwd<Bf16, 128>(p, pat, s);
#ifndef MPREFILL_CUDA_SUBSET
      if (p.head_dim == 64) return run_fwd<Bf16, 64>(p, pat, s);
#endif
      break;
#ifndef MPREFILL_CUDA_SUBSET
    case DType::kF16:
      if (p.head_dim == 128) return run_fwd<Fp16, 128>(p, pat, s);
      if (p.head_dim == 64) return run_fwd<Fp16, 64>(p, pat, s);
      break;
#endif
    default:
      break;
  }
  return unsupported("sparse attention", p);
}

}  // namespace

bool sparse_attention_supported(DType dtype, int head_dim) {
#ifdef MPREFILL_CUDA_SUBSET
  return dtype == DType::kBF16 && head_dim == 128;
#else
  return (dtype == DType::kBF16 || dtype == DType::kF16) && (head_dim == 64 || head_dim == 128);
#endif
}

Status vs_attention_fwd(const AttentionParams& p, const VsIndexView& ix, int head_offset,
                        cudaStream_t stream, SparseKernelGen gen) {
  if (const Status s = check_common("vs_attention_fwd", p); s != Status::kOk) return s;
  MPREFILL_CHECK_ARG(ix.seq_len > 0 && ix.nblocks == num_blocks(ix.seq_len),
                     Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(ix.range_ptr && ix.col_ptr && ix.range_lo && ix.range_hi && ix.col,
                     Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(head_offset >= 0 && p.q_pos0 + p.n_q <= ix.seq_len, Status::kInvalidArgument);
  PatternArgs pat;
  pat.kind = 0;
  pat.nblocks = ix.nblocks;
  pat.range_ptr = ix.range_ptr;
  pat.range_lo = ix.range_lo;
  pat.range_hi = ix.range_hi;
  pat.col_ptr = ix.col_ptr;
  pat.col = ix.col;
  pat.head_offset = head_offset;
  return run(p, pat, gen, stream);
}

Status block_sparse_attention_fwd(const AttentionParams& p, const BlockSparseView& ix,
                                  int head_offset, cudaStream_t stream, SparseKernelGen gen) {
  if (const Status s = check_common("block_sparse_attention_fwd", p); s != Status::kOk) return s;
  MPREFILL_CHECK_ARG(ix.seq_len > 0 && ix.nblocks == num_blocks(ix.seq_len) && ix.k >= 0,
                     Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(ix.k == 0 || ix.blocks != nullptr, Status::kInvalidArgument);
  MPREFILL_CHECK_ARG(head_offset >= 0 && p.q_pos0 + p.n_q <= ix.seq_len, Status::kInvalidArgument);
  PatternArgs pat;
  pat.kind = 1;
  pat.nblocks = ix.nblocks;
  pat.head_offset = head_offset;
  pat.blocks = ix.blocks;
  pat.bs_k = ix.k;
  return run(p, pat, gen, stream);
}

Status ashape_attention_fwd(const AttentionParams& p, int n_init, int n_local, cudaStream_t stream,
                            SparseKernelGen gen) {
  if (const Status s = check_common("ashape_attention_fwd", p); s != Status::kOk) return s;
  MPREFILL_CHECK_ARG(n_init >= 0 && n_local >= 0, Status::kInvalidArgument);
  PatternArgs pat;
  pat.kind = 2;
  pat.n_init = n_init;
  pat.n_local = n_local;
  return run(p, pat, gen, stream);
}

}  // namespace mprefill::cuda
