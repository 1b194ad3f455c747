// Explicit instance: fp16, head_dim 128 (all sparse patterns).
#include "kernels/cuda/attn/walk_sparse.cuh"
#include "kernels/cuda/sparse/sparse_launch.h"

MPREFILL_SPARSE_FWD_INSTANCE(Fp16, cutlass::half_t, 128)
