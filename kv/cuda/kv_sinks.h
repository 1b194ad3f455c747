// KvSink implementations for the GPU engine (device slices, bf16):
//   HostKvCacheSink   copies each layer into a KvCache, so the CPU Engine can decode from
//                     a GPU prefill and tests can compare: a bf16 cache takes the device
//                     bf16 as is, an fp32 one the values widened.
//   PinnedStreamSink  streams each layer to pinned host memory on a copy stream: a
//                     device-to-device copy into its own staging buffer on the engine's
//                     stream (so put() returns at once and the engine may overwrite its
//                     buffers), then device-to-host on a second stream, overlapping the
//                     next layer. keep_all: one host buffer per layer (what a handoff
//                     needs); otherwise one buffer reused (bandwidth measurement only).
//   NullKvSink        counts the layers and discards them.
//   HostStagingSink   hands a host-only sink (the TCP handoff) each device slice copied
//                     to host memory (synchronous on the slice's stream; the sink's own
//                     queue overlaps the sending with the next layer).
// All throw std::runtime_error with context on CUDA errors or mismatched slices.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "kv/kv_cache.h"
#include "kv/kv_sink.h"

namespace mprefill::gpu {

class HostKvCacheSink : public KvSink {
 public:
  // cache must have the model's layers and kv_dim and room for the slices' tokens; its
  // n_tokens is set to the end of the last token range on finish(). Layer 0 starts a new
  // prefill (the sink may be reused).
  explicit HostKvCacheSink(KvCache* cache) : cache_(cache) {}
  void put(const KvSlice& s) override;
  void finish() override;
  bool takes_device_slices() const override { return true; }
  int layers_received() const { return layers_; }

 private:
  KvCache* cache_;
  std::vector<uint16_t> k16_, v16_;
  int layers_ = 0;
  int64_t end_ = 0;
};

class PinnedStreamSink : public KvSink {
 public:
  // Buffers for slices of up to max_rows rows of kv_dim bf16 values per tensor.
  PinnedStreamSink(int n_layers, int64_t max_rows, int kv_dim, bool keep_all);
  ~PinnedStreamSink() override;
  PinnedStreamSink(const PinnedStreamSink&) = delete;
  PinnedStreamSink& operator=(const PinnedStreamSink&) = delete;
  void put(const KvSlice& s) override;
  void finish() override;  // waits for the last copy
  bool takes_device_slices() const override { return true; }

  size_t device_bytes() const { return 2 * tensor_bytes_; }
  size_t host_bytes() const;
  int64_t bytes_copied() const { return copied_; }
  double copy_wait_ms() const { return wait_ms_; }  // host time finish() waited
  // Layer l's K / V in pinned host memory (keep_all), bf16 [rows][kv_dim].
  const uint16_t* host_k(int layer) const;
  const uint16_t* host_v(int layer) const;

 private:
  int n_layers_;
  int64_t max_rows_;
  int kv_dim_;
  bool keep_all_;
  size_t tensor_bytes_ = 0;
  void* stage_ = nullptr;    // device [2][tensor_bytes_]
  std::vector<void*> host_;  // pinned: [layers or 1][2][tensor_bytes_]
  cudaStream_t copy_ = nullptr;
  cudaEvent_t staged_ = nullptr, copied_ev_ = nullptr;
  bool pending_ = false;
  int64_t copied_ = 0;
  double wait_ms_ = 0;
};

class NullKvSink : public KvSink {
 public:
  void put(const KvSlice& s) override {
    ++layers_;
    bytes_ += 2 * s.bytes_per_tensor();
  }
  bool takes_device_slices() const override { return true; }
  int layers() const { return layers_; }
  int64_t bytes() const { return bytes_; }

 private:
  int layers_ = 0;
  int64_t bytes_ = 0;
};

// The copies land in pinned host memory (cudaHostAlloc, grown to the largest slice and
// reused for every layer): the D2H copy runs at DMA speed and the host sink (the TCP
// sender) frames its pages from there.
class HostStagingSink : public KvSink {
 public:
  explicit HostStagingSink(KvSink* next) : next_(next) {}
  ~HostStagingSink() override;
  HostStagingSink(const HostStagingSink&) = delete;
  HostStagingSink& operator=(const HostStagingSink&) = delete;
  void put(const KvSlice& s) override;
  void finish() override { next_->finish(); }
  double copy_ms() const { return copy_ms_; }  // host time spent in the copies

 private:
  KvSink* next_;
  void* k_ = nullptr;  // pinned, cap_ bytes each
  void* v_ = nullptr;
  size_t cap_ = 0;
  double copy_ms_ = 0;
};

}  // namespace mprefill::gpu
