// Explicit instance: fp16, head_dim 128, causal.
#include "kernels/cuda/flash/flash_fwd_kernel.cuh"
#include "kernels/cuda/flash/flash_launch.h"

MPREFILL_FLASH_FWD_INSTANCE(Fp16, cutlass::half_t, 128, true)
