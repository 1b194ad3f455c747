// Host-side CUDA helpers of the KV transports' CUDA ends (kv/cuda/ipc_*): a failing call
// throws naming what was attempted; a device is named with its PCI bus id.
#pragma once
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace mprefill::kv::cuda_util {

inline void check(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess) throw std::runtime_error(what + ": " + cudaGetErrorString(e));
}

inline std::string device_name(int device) {
  char bus[64] = "?";
  cudaDeviceGetPCIBusId(bus, sizeof bus, device);
  return "cuda:" + std::to_string(device) + " " + bus;
}

}  // namespace mprefill::kv::cuda_util
