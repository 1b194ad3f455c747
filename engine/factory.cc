// make_executor(): the one place that knows which backends this build has (the feature
// macros MPREFILL_HAVE_CUDA and, inside the CUDA backend, MPREFILL_HAVE_NCCL).
#include <stdexcept>
#include <string>

#include "engine/backends.h"
#include "engine/executor.h"
#include "kernels/edge_check.h"

namespace mprefill {

std::unique_ptr<Executor> make_executor(const ExecutorSpec& spec, comm::Communicator* world) {
  const int group = spec.topo.tp * spec.topo.sp;
  if (spec.topo.tp < 1 || spec.topo.sp < 1)
    throw std::runtime_error("executor: tp and sp must be >= 1, got tp " +
                             std::to_string(spec.topo.tp) + " x sp " +
                             std::to_string(spec.topo.sp));
  if (world && world->size() != group)
    throw std::runtime_error("executor: tp " + std::to_string(spec.topo.tp) + " x sp " +
                             std::to_string(spec.topo.sp) + " needs " + std::to_string(group) +
                             " ranks, the group has " + std::to_string(world->size()));
  // Once per process (every executor of a process has the same rank and device): every
  // edge error names them.
  set_edge_context(world ? world->rank() : -1, spec.backend == Backend::kCuda ? spec.device : -1);
  switch (spec.backend) {
    case Backend::kCpu:
      return make_cpu_executor(spec, world);
    case Backend::kCuda:
#ifdef MPREFILL_HAVE_CUDA
      return gpu::make_cuda_executor(spec, world);
#else
      throw std::runtime_error(
          "--device cuda: this build has no CUDA backend (configure with -DMPREFILL_CUDA=ON); "
          "use --device cpu");
#endif
  }
  throw std::runtime_error("executor: unknown backend");
}

}  // namespace mprefill
