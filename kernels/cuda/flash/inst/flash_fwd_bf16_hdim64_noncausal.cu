// Explicit instance: bf16, head_dim 64, noncausal.
#include "kernels/cuda/flash/flash_fwd_kernel.cuh"
#include "kernels/cuda/flash/flash_launch.h"

MPREFILL_FLASH_FWD_INSTANCE(Bf16, cutlass::bfloat16_t, 64, false)
