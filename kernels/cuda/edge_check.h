// The edge check (kernels/edge_check.h) for a CUDA runtime call made at the edge (kv/,
// decode/, bench/): a failing cudaError_t becomes StatusError(kCudaError) whose backend
// text is the call and cudaGetErrorString, with rank, device and file:line.
#pragma once
#include <cuda_runtime_api.h>

#include <string>

#include "kernels/edge_check.h"

#define MPREFILL_EDGE_CHECK_CUDA(call, what)                                                \
  do {                                                                                      \
    const cudaError_t mprefill_edge_e_ = (call);                                            \
    MPREFILL_EDGE_CHECK(mprefill_edge_e_ == cudaSuccess ? ::mprefill::Status::kOk           \
                                                        : ::mprefill::Status::kCudaError,   \
                        (what),                                                             \
                        std::string(#call).substr(0, std::string(#call).find('(')) + ": " + \
                            cudaGetErrorString(mprefill_edge_e_));                          \
  } while (0)
