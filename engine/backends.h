// The backends behind make_executor() (engine/executor.h); only the factory calls these.
#pragma once
#include <memory>

#include "engine/executor.h"

namespace mprefill {

std::unique_ptr<Executor> make_cpu_executor(const ExecutorSpec& spec, comm::Communicator* world);

namespace gpu {
// CUDA builds only (engine/cuda/cuda_executor.cc): one rank runs CudaEngine, a group of
// several ranks CudaDistEngine over an NCCL communicator bootstrapped on MPI_COMM_WORLD.
std::unique_ptr<Executor> make_cuda_executor(const ExecutorSpec& spec, comm::Communicator* world);
}  // namespace gpu

}  // namespace mprefill
