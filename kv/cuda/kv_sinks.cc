#include "kv/cuda/kv_sinks.h"

#include <cuda_runtime.h>

#include <chrono>
#include <stdexcept>
#include <string>

#include "kernels/cuda/edge_check.h"

namespace mprefill::gpu {
namespace {

// A device slice of one contiguous token range covering all KV heads.
void check_device_slice(const KvSlice& s, int kv_heads_expected, const char* who) {
  if (!s.on_device || s.dtype != DType::kBF16)
    throw std::runtime_error(std::string(who) + ": expects bf16 device slices");
  if (s.tokens.size() != 1)
    throw std::runtime_error(std::string(who) + ": expects one token range per slice, got " +
                             std::to_string(s.tokens.size()));
  if (kv_heads_expected > 0 && static_cast<int>(s.kv_heads.size()) != kv_heads_expected)
    throw std::runtime_error(std::string(who) + ": slice has " + std::to_string(s.kv_heads.size()) +
                             " KV heads, expected " + std::to_string(kv_heads_expected));
}

}  // namespace

// ---------------------------------------------------------------- HostKvCacheSink
void HostKvCacheSink::put(const KvSlice& s) {
  if (!cache_) throw std::runtime_error("host KV sink: no cache");
  check_device_slice(s, -1, "host KV sink");
  if (s.layer == 0) {  // a new prefill into the same cache
    layers_ = 0;
    end_ = 0;
  }
  const int kv_dim = static_cast<int>(s.kv_heads.size()) * s.head_dim;
  if (kv_dim != cache_->kv_dim || s.layer < 0 || s.layer >= cache_->n_layers)
    throw std::runtime_error("host KV sink: slice of layer " + std::to_string(s.layer) +
                             " with kv_dim " + std::to_string(kv_dim) +
                             " does not fit the cache (" + std::to_string(cache_->n_layers) +
                             " layers, kv_dim " + std::to_string(cache_->kv_dim) + ")");
  const auto [t0, t1] = s.tokens[0];
  if (t1 > cache_->capacity)
    throw std::runtime_error("host KV sink: tokens up to " + std::to_string(t1) +
                             " exceed the cache capacity " + std::to_string(cache_->capacity));
  const size_t n = static_cast<size_t>(t1 - t0) * kv_dim;
  auto stream = static_cast<cudaStream_t>(s.stream);
  if (cache_->dtype == DType::kBF16) {  // the device bf16 as is, straight into the cache
    MPREFILL_EDGE_CHECK_CUDA(cudaMemcpyAsync(cache_->k16[s.layer].data() + t0 * kv_dim, s.k, n * 2,
                                             cudaMemcpyDeviceToHost, stream),
                             "kv sink: copy K");
    MPREFILL_EDGE_CHECK_CUDA(cudaMemcpyAsync(cache_->v16[s.layer].data() + t0 * kv_dim, s.v, n * 2,
                                             cudaMemcpyDeviceToHost, stream),
                             "kv sink: copy V");
    MPREFILL_EDGE_CHECK_CUDA(cudaStreamSynchronize(stream), "kv sink: synchronise");
    ++layers_;
    end_ = std::max(end_, t1);
    return;
  }
  k16_.resize(n);
  v16_.resize(n);
  MPREFILL_EDGE_CHECK_CUDA(cudaMemcpyAsync(k16_.data(), s.k, n * 2, cudaMemcpyDeviceToHost, stream),
                           "kv sink: copy K");
  MPREFILL_EDGE_CHECK_CUDA(cudaMemcpyAsync(v16_.data(), s.v, n * 2, cudaMemcpyDeviceToHost, stream),
                           "kv sink: copy V");
  MPREFILL_EDGE_CHECK_CUDA(cudaStreamSynchronize(stream), "kv sink: synchronise");
  float* k = cache_->k[s.layer].data() + t0 * kv_dim;
  float* v = cache_->v[s.layer].data() + t0 * kv_dim;
  for (size_t i = 0; i < n; ++i) {
    k[i] = bf16_to_f32(k16_[i]);
    v[i] = bf16_to_f32(v16_[i]);
  }
  ++layers_;
  end_ = std::max(end_, t1);
}

void HostKvCacheSink::finish() {
  if (layers_ != cache_->n_layers)
    throw std::runtime_error("host KV sink: received " + std::to_string(layers_) + " layers of " +
                             std::to_string(cache_->n_layers));
  cache_->n_tokens = end_;
}

// ---------------------------------------------------------------- PinnedStreamSink
PinnedStreamSink::PinnedStreamSink(int n_layers, int64_t max_rows, int kv_dim, bool keep_all)
    : n_layers_(n_layers), max_rows_(max_rows), kv_dim_(kv_dim), keep_all_(keep_all) {
  if (n_layers < 1 || max_rows < 1 || kv_dim < 1)
    throw std::runtime_error("pinned KV sink: layers, rows and kv_dim must be >= 1");
  tensor_bytes_ = static_cast<size_t>(max_rows) * kv_dim * 2;
  MPREFILL_EDGE_CHECK_CUDA(cudaMalloc(&stage_, 2 * tensor_bytes_),
                           "kv sink: device staging buffer");
  const int nbuf = keep_all ? n_layers : 1;
  for (int i = 0; i < nbuf; ++i) {
    void* h = nullptr;
    const cudaError_t e = cudaMallocHost(&h, 2 * tensor_bytes_);
    if (e != cudaSuccess) {
      for (void* p : host_) cudaFreeHost(p);
      cudaFree(stage_);
      MPREFILL_EDGE_CHECK_CUDA(e, "pinned KV sink: pinning " +
                                      std::to_string(2.0 * tensor_bytes_ * nbuf / (1 << 30)) +
                                      " GiB of host memory");
    }
    host_.push_back(h);
  }
  MPREFILL_EDGE_CHECK_CUDA(cudaStreamCreateWithFlags(&copy_, cudaStreamNonBlocking),
                           "kv sink: copy stream");
  MPREFILL_EDGE_CHECK_CUDA(cudaEventCreateWithFlags(&staged_, cudaEventDisableTiming),
                           "kv sink: event");
  MPREFILL_EDGE_CHECK_CUDA(cudaEventCreateWithFlags(&copied_ev_, cudaEventDisableTiming),
                           "kv sink: event");
}

PinnedStreamSink::~PinnedStreamSink() {
  if (copy_) cudaStreamSynchronize(copy_);
  if (staged_) cudaEventDestroy(staged_);
  if (copied_ev_) cudaEventDestroy(copied_ev_);
  if (copy_) cudaStreamDestroy(copy_);
  for (void* p : host_) cudaFreeHost(p);
  if (stage_) cudaFree(stage_);
}

size_t PinnedStreamSink::host_bytes() const { return host_.size() * 2 * tensor_bytes_; }

const uint16_t* PinnedStreamSink::host_k(int layer) const {
  if (!keep_all_ || layer < 0 || layer >= n_layers_)
    throw std::runtime_error("pinned KV sink: layer " + std::to_string(layer) + " not kept");
  return static_cast<const uint16_t*>(host_[layer]);
}
const uint16_t* PinnedStreamSink::host_v(int layer) const {
  return host_k(layer) + tensor_bytes_ / 2;
}

void PinnedStreamSink::put(const KvSlice& s) {
  check_device_slice(s, -1, "pinned KV sink");
  const size_t bytes = static_cast<size_t>(s.bytes_per_tensor());
  if (bytes > tensor_bytes_ || s.layer < 0 || s.layer >= n_layers_)
    throw std::runtime_error("pinned KV sink: layer " + std::to_string(s.layer) + " slice of " +
                             std::to_string(bytes) + " bytes per tensor exceeds its " +
                             std::to_string(tensor_bytes_) + "-byte buffers");
  auto stream = static_cast<cudaStream_t>(s.stream);
  char* st = static_cast<char*>(stage_);
  // The staging buffer is free once the previous layer's device-to-host copy is done.
  if (pending_)
    MPREFILL_EDGE_CHECK_CUDA(cudaStreamWaitEvent(stream, copied_ev_, 0),
                             "kv sink: wait previous copy");
  MPREFILL_EDGE_CHECK_CUDA(cudaMemcpyAsync(st, s.k, bytes, cudaMemcpyDeviceToDevice, stream),
                           "kv sink: stage K");
  MPREFILL_EDGE_CHECK_CUDA(
      cudaMemcpyAsync(st + tensor_bytes_, s.v, bytes, cudaMemcpyDeviceToDevice, stream),
      "kv sink: stage V");
  MPREFILL_EDGE_CHECK_CUDA(cudaEventRecord(staged_, stream), "kv sink: record");
  MPREFILL_EDGE_CHECK_CUDA(cudaStreamWaitEvent(copy_, staged_, 0), "kv sink: wait staged");
  char* h = static_cast<char*>(host_[keep_all_ ? s.layer : 0]);
  MPREFILL_EDGE_CHECK_CUDA(cudaMemcpyAsync(h, st, bytes, cudaMemcpyDeviceToHost, copy_),
                           "kv sink: copy K to host");
  MPREFILL_EDGE_CHECK_CUDA(
      cudaMemcpyAsync(h + tensor_bytes_, st + tensor_bytes_, bytes, cudaMemcpyDeviceToHost, copy_),
      "kv sink: copy V to host");
  MPREFILL_EDGE_CHECK_CUDA(cudaEventRecord(copied_ev_, copy_), "kv sink: record");
  pending_ = true;
  copied_ += 2 * static_cast<int64_t>(bytes);
}

void PinnedStreamSink::finish() {
  const auto t0 = std::chrono::steady_clock::now();
  MPREFILL_EDGE_CHECK_CUDA(cudaStreamSynchronize(copy_), "kv sink: finish copies");
  wait_ms_ +=
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  pending_ = false;
}

HostStagingSink::~HostStagingSink() {
  cudaFreeHost(k_);  // nullptr: no-op
  cudaFreeHost(v_);
}

void HostStagingSink::put(const KvSlice& s) {
  if (!s.on_device) return next_->put(s);
  const auto t0 = std::chrono::steady_clock::now();
  const size_t bytes = static_cast<size_t>(s.bytes_per_tensor());
  if (bytes > cap_) {
    cudaFreeHost(k_);
    cudaFreeHost(v_);
    k_ = v_ = nullptr;
    cap_ = 0;
    MPREFILL_EDGE_CHECK_CUDA(cudaHostAlloc(&k_, bytes, cudaHostAllocDefault),
                             "kv sink: staging: pinning " + std::to_string(bytes) + " bytes (K)");
    MPREFILL_EDGE_CHECK_CUDA(cudaHostAlloc(&v_, bytes, cudaHostAllocDefault),
                             "kv sink: staging: pinning " + std::to_string(bytes) + " bytes (V)");
    cap_ = bytes;
  }
  auto st = static_cast<cudaStream_t>(s.stream);
  MPREFILL_EDGE_CHECK_CUDA(cudaMemcpyAsync(k_, s.k, bytes, cudaMemcpyDeviceToHost, st),
                           "kv sink: staging: copy K");
  MPREFILL_EDGE_CHECK_CUDA(cudaMemcpyAsync(v_, s.v, bytes, cudaMemcpyDeviceToHost, st),
                           "kv sink: staging: copy V");
  MPREFILL_EDGE_CHECK_CUDA(cudaStreamSynchronize(st), "kv sink: staging: synchronise");
  copy_ms_ +=
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  KvSlice h = s;
  h.k = k_;
  h.v = v_;
  h.on_device = false;
  h.stream = nullptr;
  next_->put(h);
}

}  // namespace mprefill::gpu
