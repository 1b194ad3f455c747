// Explicit instance: bf16, head_dim 128 (all sparse patterns).
#include "kernels/cuda/attn/walk_sparse.cuh"
#include "kernels/cuda/sparse/sparse_launch.h"

MPREFILL_SPARSE_FWD_INSTANCE(Bf16, cutlass::bfloat16_t, 128)
