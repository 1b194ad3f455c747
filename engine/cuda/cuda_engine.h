// Single-process prefill on one CUDA GPU (sm90): bf16 weights resident on the device,
// cuBLASLt GEMMs, the WGMMA flash / sparse attention kernels and the GPU index
// estimation, with the same per-head policy and PrefillPlan as the CPU Engine
// (engine/engine.h). Decoding is not done here: each layer's KV goes to a KvSink
// (kv/kv_sink.h; device pointers, bf16) and a decoder (e.g. the CPU Engine on a
// KvCache filled by HostKvCacheSink) continues from it.
//
// Numerics: residual stream fp32; normed activations, Q/K/V, attention output and MLP
// intermediates bf16 (GEMMs accumulate in fp32). Logits of the last position only, fp32.
//
// Memory: weights are uploaded once. A prefill of N tokens allocates ONE workspace up
// front (MemoryPlan; refused with the numbers before any work when it does not fit) and
// nothing afterwards: x [N][hidden] fp32, xb [N][max(hidden, q_dim)] bf16 (normed input,
// then the attention output), q [N][q_dim], k / v [N][kv_dim] bf16 (the current layer
// only), the MLP chunk buffers [chunk][2 ffn] + [chunk][ffn] + [chunk][hidden] bf16, the
// estimation scratch and the sparse-index capacity. Never [N][ffn] or [N][vocab].
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kv/kv_sink.h"
#include "model/model_config.h"
#include "model/sparse_policy.h"
#include "model/weights.h"
#include "engine/engine.h"

namespace mprefill::gpu {

struct CudaEngineOptions {
  int device = 0;
  int64_t mlp_chunk = 16384;  // tokens per MLP chunk
  // Device memory the engine may use for one prefill's workspace; 0: what the device
  // reports free at the start of the prefill, less `reserve_bytes`.
  size_t memory_limit = 0;
  size_t reserve_bytes = size_t{512} << 20;  // left free for cuBLAS / the CUDA context
  // Capacity of the vertical-slash CSR value arrays (ranges and gathered columns of all
  // heads of one attention call): at most this many bytes, less when the policy's
  // worst case is smaller. A layer whose index is larger is refused with the numbers.
  size_t vs_index_max_bytes = size_t{8} << 30;
};

// What a prefill of n tokens needs on the device, in bytes.
struct MemoryPlan {
  int64_t tokens = 0;
  size_t weights = 0;      // resident, already allocated
  size_t activations = 0;  // x, xb, q, k, v, ids
  size_t mlp = 0;          // chunk buffers
  size_t estimation = 0;   // scores, selections, workspaces, plan uploads
  size_t index = 0;        // CSR / block lists
  size_t gemm_workspace = 0;
  size_t workspace = 0;  // sum of the above except weights (the one allocation)
  size_t available = 0;  // what the engine may allocate (see CudaEngineOptions)
  bool fits = false;
  std::string describe() const;  // one line with the numbers in GiB
};

// Per-layer time by category (ms, CUDA-event timed on the engine's stream).
struct LayerTimes {
  double gemm_ms = 0, attention_ms = 0, estimate_ms = 0, kv_export_ms = 0, rest_ms = 0;
  double total() const { return gemm_ms + attention_ms + estimate_ms + kv_export_ms + rest_ms; }
};

struct CudaPrefillStats {
  int64_t tokens = 0;
  bool all_dense = true;
  bool plan_reused = false;
  int heads_by_kind[4] = {};
  int attention_calls = 0;
  double total_ms = 0;  // host wall time of prefill(), logits on the host
  LayerTimes sum;       // over layers (only with PrefillOptions::timing)
  std::vector<LayerTimes> layers;
  double head_ms = 0;                // embedding + final norm + lm_head (timing only)
  int64_t vs_index_entries_max = 0;  // largest CSR value count of one call
  size_t peak_device_bytes = 0;      // device memory in use after the workspace allocation
  MemoryPlan memory;
};

struct PrefillOptions {
  // CUDA-event timing per category and layer (a few hundred events per layer; off for
  // production paths).
  bool timing = false;
  // With a filled plan: still run the estimation of the planned sparse heads (timed),
  // then use the plan's indices. For benchmarks with synthetic index sets.
  bool estimate_with_plan = false;
};

class CudaEngine {
 public:
  // Uploads host fp32 weights as bf16 (fused [q;k;v] and [gate;up] matrices).
  explicit CudaEngine(const ModelWeights& w, CudaEngineOptions opt = {});
  // Random weights of cfg generated on the device (normal * 0.02, norm weights 1 +- 0.05,
  // deterministic in seed), no host copy: an 8B shape never passes through host memory.
  CudaEngine(const ModelConfig& cfg, uint64_t seed, CudaEngineOptions opt = {});
  ~CudaEngine();
  CudaEngine(const CudaEngine&) = delete;
  CudaEngine& operator=(const CudaEngine&) = delete;

  const ModelConfig& config() const { return cfg_; }
  size_t weight_bytes() const { return weight_bytes_; }

  // The device memory a prefill of n tokens under policy needs, against what is free now.
  MemoryPlan plan_memory(int64_t n, const SparsePolicy& policy) const;

  // Prefill of ids (positions 0..N-1). Throws std::runtime_error before any GPU work when
  // the prompt is invalid, the policy does not fit the model or the kernels, a given plan
  // does not match, or the memory plan does not fit. Each layer's K (after RoPE) and V go
  // to sink->put (device bf16, on this engine's stream), then sink->finish(). sink may be
  // null (nothing exported). plan_inout as in Engine::prefill: an empty one is filled with
  // the estimated indices (downloaded: slow, for tests), a filled one is used as given
  // (heads of a sparse kind with no index in it are estimated). Returns the logits of
  // position N-1 ([vocab] fp32).
  std::vector<float> prefill(const std::vector<int>& ids, const SparsePolicy& policy, KvSink* sink,
                             PrefillPlan* plan_inout = nullptr, CudaPrefillStats* stats = nullptr,
                             const PrefillOptions& popt = {});

  cudaStream_t stream() const { return stream_; }

  struct Impl;  // device state (public name for the .cc helpers)

 private:
  void init_common();
  ModelConfig cfg_;
  CudaEngineOptions opt_;
  size_t weight_bytes_ = 0;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<Impl> impl_;
};

// True when this process sees a CUDA device (no exception, false without a driver).
bool cuda_available();

}  // namespace mprefill::gpu
