#include "engine/cuda/cuda_generate.h"

#include <algorithm>

#include "engine/backends.h"
#include "engine/cuda/cuda_backend.h"
#include "kv/cuda/kv_sinks.h"

namespace mprefill::gpu {

GenerateResult generate_cuda(const ModelWeights& w, const std::vector<int>& ids,
                             const GenerateOptions& opt) {
  Engine cpu(w);                 // the decoder, and the same checks as the CPU path
  cpu.check_generate(ids, opt);  // before the GPU engine is set up
  check_policy(cuda_caps(/*nccl_kv=*/true), opt.policy, static_cast<int64_t>(ids.size()), nullptr,
               "cuda executor (one GPU): ");
  CudaBackend gpu(nullptr, w);  // one GPU: tp 1 x sp 1
  return cpu.generate_with(ids, opt, [&](KvCache* cache, PrefillStats* ps) {
    HostKvCacheSink sink(cache);
    CudaPrefillStats st;
    std::vector<float> logits = gpu.prefill(ids, opt.policy, &sink, nullptr, &st);
    ps->tokens = st.tokens;
    ps->all_dense = st.all_dense;
    ps->plan_reused = st.plan_reused;
    std::copy(st.heads_by_kind, st.heads_by_kind + 4, ps->heads_by_kind);
    ps->total_ms = st.total_ms;
    return logits;
  });
}

}  // namespace mprefill::gpu
