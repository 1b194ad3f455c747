// Dense flash-attention forward on Hopper (sm_90a: WGMMA + TMA), behind the shared
// host API of kernels/attention.h. No CUDA/CuTe types beyond cudaStream_t.
//
// Supported: dtype kBF16 / kF16, head_dim 48 / 64 / 128 (48 runs the 64 kernel,
// zero-padded in shared memory), causal or not, GQA (num_heads a
// multiple of num_kv_heads, K/V never expanded), q_pos0 / k_pos0 offsets (causal:
// key k_pos0 + j visible to row q_pos0 + i iff k_pos0 + j <= q_pos0 + i). A row with
// no visible key gets o = 0 and lse = -inf. lse (natural log, fp32) is optional.
// Layout requirements (TMA): q/k/v 16-byte aligned, row and head strides multiples
// of 8 elements; o 4-byte aligned with even strides. Anything else: kUnsupported.
// Needs no workspace; enqueues on `stream` and does not synchronise.
#pragma once
#include <cuda_runtime_api.h>

#include "kernels/attention.h"
#include "kernels/status.h"

namespace mprefill::cuda {

Status flash_attention_fwd(const AttentionParams& p, cudaStream_t stream);

// True when flash_attention_fwd supports this (dtype, head_dim) in this build.
bool flash_attention_supported(DType dtype, int head_dim);

}  // namespace mprefill::cuda
