// Hopper sparse attention forward (sm_90a: WGMMA + TMA) for the MInference patterns of
// kernels/sparse.h, behind the shared host API (kernels/attention.h). Plain header: no
// CUDA/CuTe types beyond cudaStream_t.
//
// Each launcher computes exactly the mask of its pattern on global positions: query row
// i is at q_pos0 + i, key j at k_pos0 + j; keys outside the shard [k_pos0, k_pos0 + n_k)
// are skipped, so a ring step gets exactly its part of the global mask. A row with no
// visible key gets o = 0 and lse = -inf. causal must be true.
//
// Supported: dtype kBF16 / kF16, head_dim 64 / 128 (MPREFILL_CUDA_SUBSET builds: bf16 /
// 128 only), GQA (K/V never expanded). Layout requirements as flash_attention_fwd: q/k/v
// 16-byte aligned with row/head strides multiples of 8 elements, o 4-byte aligned with
// even strides; anything else kUnsupported. No workspace; enqueues on `stream` and does
// not synchronise.
//
// Index arguments are device pointers. Query head h of the call uses index head
// head_offset + h. The index must be structurally valid (as produced by
// cpu::vs_build_index / the GPU index build, or the block-sparse rules of sparse.h):
// the kernels do not re-check it (block lists ascending, as sparse.h specifies: kernel v2
// walks them merged). Requires q_pos0 >= 0 and q_pos0 + n_q <= ix.seq_len.
#pragma once
#include <cuda_runtime_api.h>

#include "kernels/attention.h"
#include "kernels/sparse.h"
#include "kernels/status.h"

namespace mprefill::cuda {

// Kernel generation of one launch (bench/NOTES.md section 3 has both): kV1 = one 64-row
// query block per CTA; kV2 = two adjacent blocks per CTA over the union of their key tiles
// (bf16 / head_dim 128 only, and global positions < 2^31 - 256; else v1 runs); kAuto (the
// default): v2 for vertical-slash and A-shape, v1 for block-sparse. Same mask and results.
// Any other value: kInvalidArgument.
// kSkel = the one attention skeleton (kernels/cuda/attn/skeleton.cuh) with the sparse
// walker: 128-row CTAs over the union of two blocks' key tiles in 128-key tiles, pingpong
// consumers (bf16 / head_dim 128, positions < 2^31 - 256; else v1 runs). kSkelOwner = the
// skeleton with owner tiles (kernels/cuda/attn/sparse_walk.h): union intervals of up to 256
// keys go to the consumers as their own 64-key halves, two per tile. kSkelPlan = kSkelOwner
// with the tile plan computed before the launch (one warp per CTA runs the walk; the
// producer streams 64-byte records): a measurement path, it synchronises the stream once
// to size the plan and holds 64 bytes per tile.
enum class SparseKernelGen : int {
  kAuto = 0,
  kV1 = 1,
  kV2 = 2,
  kSkel = 3,
  kSkelOwner = 4,
  kSkelPlan = 5
};

// Vertical-slash: per 64-row query block, its ranges [lo, hi) and gathered columns.
Status vs_attention_fwd(const AttentionParams& p, const VsIndexView& ix, int head_offset,
                        cudaStream_t stream, SparseKernelGen gen = SparseKernelGen::kAuto);

// Block-sparse: per 64-row query block, the listed 64-key blocks (-1 padded).
Status block_sparse_attention_fwd(const AttentionParams& p, const BlockSparseView& ix,
                                  int head_offset, cudaStream_t stream,
                                  SparseKernelGen gen = SparseKernelGen::kAuto);

// A-shape: key c visible to row r iff c <= r && (c < n_init || r - c < n_local), one
// (n_init, n_local) for all heads of the call.
Status ashape_attention_fwd(const AttentionParams& p, int n_init, int n_local, cudaStream_t stream,
                            SparseKernelGen gen = SparseKernelGen::kAuto);

// True when the launchers above support this (dtype, head_dim) in this build.
bool sparse_attention_supported(DType dtype, int head_dim);

}  // namespace mprefill::cuda
