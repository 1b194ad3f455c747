// The backends behind make_executor() (engine/executor.h); only the factory calls these.
#pragma once
#include <memory>

#include "engine/executor.h"

namespace mprefill {

std::unique_ptr<Executor> make_cpu_executor(const ExecutorSpec& spec, comm::Communicator* world);

namespace gpu {
// CUDA builds only (engine/cuda/cuda_executor.cc): CudaBackend, on one rank without a
// communicator, on a group over an NCCL communicator bootstrapped on MPI_COMM_WORLD.
std::unique_ptr<Executor> make_cuda_executor(const ExecutorSpec& spec, comm::Communicator* world);
// What CudaBackend runs (the executor's caps; nccl_kv for one GPU): the single-process paths
// that drive CudaBackend directly check their requests against it (check_policy).
ExecutorCaps cuda_caps(bool nccl_kv);
}  // namespace gpu

}  // namespace mprefill
