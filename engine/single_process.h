// The single-process paths of the front ends on either backend: `mprefill generate` and the
// search's retrieval evaluation. Like make_executor() they are defined in engine/factory.cc,
// the one place that knows whether this build has the CUDA backend; callers name a Backend
// and never test a feature macro.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/executor.h"

namespace mprefill {

// Why backend b cannot run in this process ("" when it can): kCuda without the CUDA
// backend in this build, or with no visible device.
std::string backend_unavailable(Backend b);

// Engine::generate's contract and result on backend b. kCuda: the prompt prefilled on GPU
// 0 (CudaBackend, tp 1 x sp 1), its KV exported into a host cache, sampling and decoding
// on the CPU engine `cpu`.
GenerateResult generate_on(Backend b, const Engine& cpu, const std::vector<int>& ids,
                           const GenerateOptions& opt);

// One prefill of a whole prompt: the logits of the last position; the KV into cache (may
// be null: not kept) and the indices the backend estimated into plan (may be null).
using CachePrefill = std::function<std::vector<float>(const std::vector<int>&, const SparsePolicy&,
                                                      KvCache*, PrefillPlan*)>;
// kCpu: cpu.prefill (cpu must outlive the result). kCuda: a CudaBackend on GPU `device`
// holding cpu's weights, owned by the result.
CachePrefill make_cache_prefill(Backend b, int device, const Engine& cpu);

}  // namespace mprefill
