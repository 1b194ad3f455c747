// Explicit instances of the flash forward launcher (one per inst/*.cu file), declared
// without CuTe so that the dispatcher compiles cheaply.
#pragma once
#include <cuda_runtime_api.h>

#include "kernels/attention.h"
#include "kernels/cuda/common/launch_common.h"
#include "kernels/status.h"

namespace mprefill::cuda::flash {

using cuda::Bf16;
using cuda::Fp16;

// Runs the kernel for element tag E (Bf16 / Fp16), head_dim D, causal flag C.
template <class E, int D, bool C>
Status run_fwd(const AttentionParams& p, cudaStream_t stream);

}  // namespace mprefill::cuda::flash

// Instance file body: MPREFILL_FLASH_FWD_INSTANCE(Bf16, cutlass::bfloat16_t, 128, true)
#define MPREFILL_FLASH_FWD_INSTANCE(TAG, ELEMENT, HDIM, CAUSAL)                      \
  namespace mprefill::cuda::flash {                                                  \
  template <>                                                                        \
  Status run_fwd<TAG, HDIM, CAUSAL>(const AttentionParams& p, cudaStream_t stream) { \
    return run_flash_fwd<FwdTraits<ELEMENT, HDIM, CAUSAL>>(p, stream);               \
  }                                                                                  \
  }
