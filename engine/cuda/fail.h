// Where a CUDA / kernel / communicator status of the CUDA backend becomes an exception:
// the edge check (kernels/edge_check.h: StatusError with rank, device, the backend's last
// error text and the caller's file:line), prefixed by `who`, naming the backend and, in a
// group, the rank ("cuda backend (rank 2 of tp 2 x sp 2): "). layer >= 0 adds
// " at layer L". Validation errors: raise().
#pragma once
#include <cuda_runtime_api.h>

#include <source_location>
#include <stdexcept>
#include <string>

#include "comm/communicator.h"
#include "kernels/cuda/cuda.h"
#include "kernels/edge_check.h"

namespace mprefill::gpu {

struct Fail {
  std::string who;
  void ck(cudaError_t e, const std::string& what, int layer = -1,
          std::source_location at = std::source_location::current()) const {
    if (e != cudaSuccess) edge(Status::kCudaError, what, layer, cudaGetErrorString(e), at);
  }
  void ok(Status s, const std::string& what, int layer = -1,
          std::source_location at = std::source_location::current()) const {
    if (s != Status::kOk) edge(s, what, layer, cuda::last_error(), at);
  }
  void cok(Status s, const comm::Communicator& c, const std::string& what, int layer = -1,
           std::source_location at = std::source_location::current()) const {
    if (s != Status::kOk) edge(s, what, layer, c.last_error(), at);
  }
  [[noreturn]] void raise(const std::string& what) const { throw std::runtime_error(who + what); }

 private:
  [[noreturn]] void edge(Status s, const std::string& what, int layer, const std::string& backend,
                         const std::source_location& at) const {
    const std::string where = layer >= 0 ? " at layer " + std::to_string(layer) : "";
    throw_status(s, who + what + where, backend, at.file_name(), static_cast<int>(at.line()));
  }
};

}  // namespace mprefill::gpu
