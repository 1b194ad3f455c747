// `mprefill generate --device cuda`: prefill on the GPU (CudaBackend, one GPU), KV exported into a
// host KvCache, then sampling and decoding on the CPU Engine from that cache.
#pragma once
#include <vector>

#include "engine/engine.h"
#include "model/weights.h"

namespace mprefill::gpu {

// Same contract and result as Engine::generate (prompt checks, sampler, stop ids);
// ttft_ms covers the GPU prefill, the KV download and the first sample.
GenerateResult generate_cuda(const ModelWeights& w, const std::vector<int>& ids,
                             const GenerateOptions& opt);

}  // namespace mprefill::gpu
