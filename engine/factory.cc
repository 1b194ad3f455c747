// make_executor() and the single-process paths (engine/single_process.h): the one place
// that knows which backends this build has (the feature macro MPREFILL_HAVE_CUDA; NCCL is
// the CUDA backend's own business, MPREFILL_HAVE_NCCL in engine/cuda/cuda_executor.cc).
#include <memory>
#include <stdexcept>
#include <string>

#include "engine/backends.h"
#include "engine/executor.h"
#include "engine/single_process.h"
#include "kernels/edge_check.h"
#ifdef MPREFILL_HAVE_CUDA
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_generate.h"
#include "kv/cuda/kv_sinks.h"
#endif

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
      throw std::runtime_error("--device cuda: " + backend_unavailable(Backend::kCuda) +
                               "; use --device cpu");
#endif
  }
  throw std::runtime_error("executor: unknown backend");
}

std::string backend_unavailable(Backend b) {
  if (b == Backend::kCpu) return "";
#ifdef MPREFILL_HAVE_CUDA
  return gpu::cuda_available() ? "" : "no CUDA device is visible";
#else
  return "this build has no CUDA backend (configure with -DMPREFILL_CUDA=ON)";
#endif
}

namespace {
void require(Backend b) {
  const std::string why = backend_unavailable(b);
  if (!why.empty()) throw std::runtime_error("--device cuda: " + why);
}
}  // namespace

GenerateResult generate_on(Backend b, const Engine& cpu, const std::vector<int>& ids,
                           const GenerateOptions& opt) {
  if (b == Backend::kCpu) return cpu.generate(ids, opt);
  require(b);
#ifdef MPREFILL_HAVE_CUDA
  return gpu::generate_cuda(cpu.weights(), ids, opt);
#else
  throw std::logic_error("unreachable");
#endif
}

CachePrefill make_cache_prefill(Backend b, int device, const Engine& cpu) {
  if (b == Backend::kCpu)
    return [&cpu](const std::vector<int>& ids, const SparsePolicy& pol, KvCache* cache,
                  PrefillPlan* plan) { return cpu.prefill(ids, pol, cache, plan, nullptr); };
  require(b);
#ifdef MPREFILL_HAVE_CUDA
  gpu::CudaOptions o;
  o.device = device;
  auto gpu = std::make_shared<gpu::CudaBackend>(nullptr, cpu.weights(), DistTopology{}, o);
  return [gpu](const std::vector<int>& ids, const SparsePolicy& pol, KvCache* cache,
               PrefillPlan* plan) {
    check_policy(gpu::cuda_caps(/*nccl_kv=*/true), pol, static_cast<int64_t>(ids.size()), plan,
                 "cuda executor (one GPU): ");
    if (cache == nullptr) return gpu->prefill(ids, pol, nullptr, plan);
    gpu::HostKvCacheSink sink(cache);
    return gpu->prefill(ids, pol, &sink, plan);
  };
#else
  (void)device;
  throw std::logic_error("unreachable");
#endif
}

}  // namespace mprefill
