// Device queries and the error record behind the check macros (kernels/cuda/check.h).
#include <cstdio>
#include <string>

#include "kernels/cuda/check.h"
#include "kernels/cuda/cuda.h"

namespace mprefill::cuda {
namespace {

thread_local std::string g_last_error;

void set_message(const char* call, const char* file, int line, const char* text) {
  char buf[512];
  std::snprintf(buf, sizeof buf, "%s at %s:%d: %s", call, file, line, text);
  g_last_error = buf;
}

}  // namespace

namespace detail {

Status record_cuda_error(cudaError_t e, const char* call, const char* file, int line) {
  set_message(call, file, line, cudaGetErrorString(e));
  if (e == cudaErrorMemoryAllocation) return Status::kOutOfMemory;
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) return Status::kNoDevice;
  return Status::kCudaError;
}

Status record_cublas_error(cublasStatus_t e, const char* call, const char* file, int line) {
  set_message(call, file, line, cublasGetStatusString(e));
  if (e == CUBLAS_STATUS_NOT_SUPPORTED || e == CUBLAS_STATUS_ARCH_MISMATCH)
    return Status::kUnsupported;
  if (e == CUBLAS_STATUS_ALLOC_FAILED) return Status::kOutOfMemory;
  if (e == CUBLAS_STATUS_INVALID_VALUE) return Status::kInvalidArgument;
  if (e == CUBLAS_STATUS_NOT_INITIALIZED) return Status::kNoDevice;
  return Status::kCudaError;
}

Status record_error(Status s, const char* what, const char* file, int line) {
  set_message(what, file, line, to_string(s));
  return s;
}

}  // namespace detail

std::string last_error() { return g_last_error; }

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error for later calls
    return 0;
  }
  return n;
}

bool has_gpu() { return device_count() > 0; }

Status device_info(int device, DeviceInfo* out) {
  MPREFILL_CHECK_ARG(out != nullptr, Status::kInvalidArgument);
  if (device < 0 || device >= device_count())
    return detail::record_error(Status::kNoDevice, "device_info: no such device", __FILE__,
                                __LINE__);
  cudaDeviceProp p{};
  MPREFILL_CUDA_TRY(cudaGetDeviceProperties(&p, device));
  out->name = p.name;
  out->sm_count = p.multiProcessorCount;
  out->cc_major = p.major;
  out->cc_minor = p.minor;
  out->total_mem = p.totalGlobalMem;
  out->l2_bytes = p.l2CacheSize;
  out->smem_optin = p.sharedMemPerBlockOptin;
  return Status::kOk;
}

std::string device_name(int device) {
  DeviceInfo info;
  return device_info(device, &info) == Status::kOk ? info.name : std::string();
}

int sm_count(int device) {
  DeviceInfo info;
  return device_info(device, &info) == Status::kOk ? info.sm_count : 0;
}

}  // namespace mprefill::cuda
