// Check macros for CUDA runtime and cuBLAS calls inside kernels/cuda. Every failing
// call records "<call> at file:line: <error>" in a thread-local slot (read with
// mprefill::cuda::last_error()) and makes the enclosing function return a Status.
// Only for functions returning mprefill::Status.
#pragma once
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "kernels/status.h"

namespace mprefill::cuda::detail {

// Stores the message for last_error(); returns the Status the failure maps to.
Status record_cuda_error(cudaError_t e, const char* call, const char* file, int line);
Status record_cublas_error(cublasStatus_t e, const char* call, const char* file, int line);
// A failure that is not a CUDA/cuBLAS return code (bad argument, missing algorithm).
Status record_error(Status s, const char* what, const char* file, int line);

}  // namespace mprefill::cuda::detail

// Return the mapped Status when a CUDA runtime call fails.
#define MPREFILL_CUDA_TRY(call)                                                                   \
  do {                                                                                            \
    const cudaError_t mprefill_e_ = (call);                                                       \
    if (mprefill_e_ != cudaSuccess)                                                               \
      return ::mprefill::cuda::detail::record_cuda_error(mprefill_e_, #call, __FILE__, __LINE__); \
  } while (0)

// After a <<<...>>> launch: a launch-configuration error is reported here; errors of the
// kernel's execution surface at the next synchronising call.
#define MPREFILL_CUDA_LAUNCH_CHECK(kernel_name)                                              \
  do {                                                                                       \
    const cudaError_t mprefill_e_ = cudaGetLastError();                                      \
    if (mprefill_e_ != cudaSuccess)                                                          \
      return ::mprefill::cuda::detail::record_cuda_error(mprefill_e_, "launch " kernel_name, \
                                                         __FILE__, __LINE__);                \
  } while (0)

#define MPREFILL_CUBLAS_TRY(call)                                                        \
  do {                                                                                   \
    const cublasStatus_t mprefill_s_ = (call);                                           \
    if (mprefill_s_ != CUBLAS_STATUS_SUCCESS)                                            \
      return ::mprefill::cuda::detail::record_cublas_error(mprefill_s_, #call, __FILE__, \
                                                           __LINE__);                    \
  } while (0)

// Return `status` (with a message) when `cond` is false.
#define MPREFILL_CHECK_ARG(cond, status)                                                        \
  do {                                                                                          \
    if (!(cond))                                                                                \
      return ::mprefill::cuda::detail::record_error((status), "check failed: " #cond, __FILE__, \
                                                    __LINE__);                                  \
  } while (0)
