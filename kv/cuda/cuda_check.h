// Host-side CUDA helpers of the KV transports' CUDA ends (kv/cuda/ipc_*): a device named
// with its PCI bus id. Failing calls go through MPREFILL_EDGE_CHECK_CUDA
// (kernels/cuda/edge_check.h).
#pragma once
#include <cuda_runtime_api.h>

#include <string>

namespace mprefill::kv::cuda_util {

inline std::string device_name(int device) {
  char bus[64] = "?";
  cudaDeviceGetPCIBusId(bus, sizeof bus, device);
  return "cuda:" + std::to_string(device) + " " + bus;
}

}  // namespace mprefill::kv::cuda_util
