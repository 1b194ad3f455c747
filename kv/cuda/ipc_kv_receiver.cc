#include "kv/cuda/ipc_kv_receiver.h"

#include <cuda_runtime_api.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "kernels/cuda/edge_check.h"
#include "kv/cuda/cuda_check.h"
#include "kv/cuda/page_sums.h"
#include "kv/kv_handoff.h"
#include "kv/kv_ipc.h"

namespace mprefill::kv {
namespace {

using Clock = std::chrono::steady_clock;

using cuda_util::device_name;

// Polls `ev` until it completed or timeout_ms passed (then throws naming `what`).
void wait_event(cudaEvent_t ev, int timeout_ms, const std::string& what) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (int spins = 0;; ++spins) {
    const cudaError_t q = cudaEventQuery(ev);
    if (q == cudaSuccess) return;
    if (q != cudaErrorNotReady) MPREFILL_EDGE_CHECK_CUDA(cudaEventQuery(ev), what);  // sticky
    if (Clock::now() > deadline)
      throw std::runtime_error(what + ": not done after " + std::to_string(timeout_ms) + " ms");
    if (spins < 2000)
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

// The page's pieces for kvsum (contiguous runs of its heads inside region rows); a full
// batch is launched on `stream` first.
// A bf16 page in an fp32 region (widened by the sender) is summed as the bf16 it was.
void add_pieces(const IpcRegionLayout& L, const char* base, const v1::KvPageHeader& h, bool v,
                uint32_t* out, kvsum::PageSumBatch* b, cudaStream_t stream) {
  const bool widened = h.dtype() == v1::BF16 && L.elem_bytes == 4;
  const int page_elem = widened ? 2 : L.elem_bytes;
  const uint32_t hw = static_cast<uint32_t>(L.head_dim * page_elem / 4);  // words per head
  const uint32_t packed_row = hw * static_cast<uint32_t>(h.kv_heads_size());
  for (int j0 = 0; j0 < h.kv_heads_size();) {
    int j1 = j0 + 1;
    while (j1 < h.kv_heads_size() && h.kv_heads(j1) == h.kv_heads(j1 - 1) + 1) ++j1;
    if (b->n == kvsum::kMaxPieces) {
      MPREFILL_EDGE_CHECK_CUDA(kvsum::launch_page_sums(*b, stream), "page checksum kernel");
      b->n = 0;
    }
    kvsum::PageSumPiece& p = b->piece[b->n++];
    p.src = base + L.kv_offset(h.layer(), v, h.token_begin(), h.kv_heads(j0));
    p.pitch = L.row_bytes();
    p.rows = static_cast<uint32_t>(h.token_end() - h.token_begin());
    p.width_words = hw * static_cast<uint32_t>(j1 - j0);
    p.packed_row_words = packed_row;
    p.packed_base_words = hw * static_cast<uint32_t>(j0);
    p.out = out;
    p.widened = widened;
    j0 = j1;
  }
}

class IpcJobKv final : public DeviceJobKv {
 public:
  IpcJobKv(int device, const IpcRegionLayout& layout) : device_(device), L_(layout) {
    MPREFILL_EDGE_CHECK_CUDA(cudaSetDevice(device_),
                             "cudaSetDevice(" + std::to_string(device_) + ")");
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    landed_bytes_ = static_cast<size_t>(L_.region_bytes - L_.sums_offset);
    const cudaError_t e = cudaMalloc(&base_, L_.region_bytes);
    if (e != cudaSuccess) {
      cudaGetLastError();
      throw_status(Status::kCudaError,
                   "the decoder's GPU " + device_name(device_) +
                       " cannot hold the job's KV region: " + std::to_string(L_.region_bytes) +
                       " bytes, " + std::to_string(free_b) + " free of " + std::to_string(total_b),
                   std::string("cudaMalloc: ") + cudaGetErrorString(e), __FILE__, __LINE__);
    }
    try {
      MPREFILL_EDGE_CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&landed_), landed_bytes_),
                               "cudaMalloc landed checksums");
      MPREFILL_EDGE_CHECK_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                               "cudaStreamCreate");
      // Zeroed before the offer leaves (the worker writes the sender half, our kernels
      // add into the landed half on stream_).
      MPREFILL_EDGE_CHECK_CUDA(cudaMemsetAsync(landed_, 0, landed_bytes_, stream_),
                               "cudaMemsetAsync landed checksums");
      MPREFILL_EDGE_CHECK_CUDA(
          cudaMemsetAsync(static_cast<char*>(base_) + L_.sums_offset, 0, landed_bytes_, stream_),
          "cudaMemsetAsync sender checksums");
      MPREFILL_EDGE_CHECK_CUDA(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
      MPREFILL_EDGE_CHECK_CUDA(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming),
                               "cudaEventCreate");
      MPREFILL_EDGE_CHECK_CUDA(cudaIpcGetMemHandle(&handle_, base_), "cudaIpcGetMemHandle");
      MPREFILL_EDGE_CHECK_CUDA(
          cudaMallocHost(reinterpret_cast<void**>(&host_sums_), 2 * layer_sum_bytes()),
          "cudaMallocHost");
    } catch (...) {
      release();
      throw;
    }
    pages_.resize(L_.n_layers);
  }
  ~IpcJobKv() override { release(); }

  const IpcRegionLayout& layout() const { return L_; }
  const cudaIpcMemHandle_t& handle() const { return handle_; }

  int device() const override { return device_; }
  uint64_t device_bytes() const override { return L_.region_bytes + landed_bytes_; }
  const void* k(int layer) const override {
    return static_cast<const char*>(base_) + L_.kv_offset(layer, false, 0, 0);
  }
  const void* v(int layer) const override {
    return static_cast<const char*>(base_) + L_.kv_offset(layer, true, 0, 0);
  }

  // Queues the checksum of a landed page (header checked by the caller).
  void enqueue_check(const v1::KvPageHeader& h) {
    std::lock_guard<std::mutex> lock(mu_);
    const uint64_t slot = sum_index(h.layer(), h.sender_rank(), h.sum_slot());
    kvsum::PageSumBatch b;
    const char* base = static_cast<const char*>(base_);
    MPREFILL_EDGE_CHECK_CUDA(cudaSetDevice(device_), "cudaSetDevice");
    add_pieces(L_, base, h, false, landed_ + 2 * slot, &b, stream_);
    add_pieces(L_, base, h, true, landed_ + 2 * slot + 1, &b, stream_);
    MPREFILL_EDGE_CHECK_CUDA(kvsum::launch_page_sums(b, stream_), "page checksum kernel");
    pages_[h.layer()].push_back({h.sender_rank(), h.sum_slot(), h.token_begin(), h.token_end()});
  }

  void verify_layer(int layer, int timeout_ms) override {
    std::lock_guard<std::mutex> lock(mu_);
    MPREFILL_EDGE_CHECK_CUDA(cudaSetDevice(device_), "cudaSetDevice");
    MPREFILL_EDGE_CHECK_CUDA(cudaEventRecord(done_, stream_), "cudaEventRecord");
    const std::string where = "layer " + std::to_string(layer) + " device checksums";
    wait_event(done_, timeout_ms, where);
    const size_t n = layer_sum_bytes();
    const uint64_t first = sum_index(layer, 0, 0);
    uint32_t* sender = host_sums_;
    uint32_t* landed = host_sums_ + n / 4;
    MPREFILL_EDGE_CHECK_CUDA(
        cudaMemcpyAsync(sender, static_cast<char*>(base_) + L_.sums_offset + first * 8, n,
                        cudaMemcpyDeviceToHost, stream_),
        "copy sender checksums");
    MPREFILL_EDGE_CHECK_CUDA(
        cudaMemcpyAsync(landed, landed_ + 2 * first, n, cudaMemcpyDeviceToHost, stream_),
        "copy landed checksums");
    MPREFILL_EDGE_CHECK_CUDA(cudaEventRecord(done_, stream_), "cudaEventRecord");
    wait_event(done_, timeout_ms, where);
    for (const PageRec& p : pages_[layer]) {
      const uint64_t i = 2 * (sum_index(layer, p.rank, p.slot) - first);
      if (sender[i] != landed[i] || sender[i + 1] != landed[i + 1])
        throw std::runtime_error("device checksum mismatch, layer " + std::to_string(layer) +
                                 " rank " + std::to_string(p.rank) + " tokens [" +
                                 std::to_string(p.begin) + ", " + std::to_string(p.end) +
                                 "): sender K " + std::to_string(sender[i]) + " V " +
                                 std::to_string(sender[i + 1]) + ", landed K " +
                                 std::to_string(landed[i]) + " V " + std::to_string(landed[i + 1]));
    }
  }

  void export_layer(int layer, void* k_host, void* v_host) const override {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t n = static_cast<size_t>(L_.n_tokens) * L_.row_bytes();
    MPREFILL_EDGE_CHECK_CUDA(cudaSetDevice(device_), "cudaSetDevice");
    MPREFILL_EDGE_CHECK_CUDA(cudaMemcpy(k_host, k(layer), n, cudaMemcpyDeviceToHost), "export K");
    MPREFILL_EDGE_CHECK_CUDA(cudaMemcpy(v_host, v(layer), n, cudaMemcpyDeviceToHost), "export V");
  }

 private:
  struct PageRec {
    int rank, slot;
    int64_t begin, end;
  };
  int device_;
  IpcRegionLayout L_;
  mutable std::mutex mu_;
  void* base_ = nullptr;
  uint32_t* landed_ = nullptr;  // [layer][sender][slot][K, V] sums of what landed
  size_t landed_bytes_ = 0;
  uint32_t* host_sums_ = nullptr;  // pinned: one layer of sender sums, then of landed sums
  cudaStream_t stream_ = nullptr;
  cudaEvent_t done_ = nullptr;
  cudaIpcMemHandle_t handle_{};
  std::vector<std::vector<PageRec>> pages_;  // [layer]

  size_t layer_sum_bytes() const { return size_t(L_.senders) * L_.sum_slots * 8; }
  uint64_t sum_index(int layer, int rank, int slot) const {
    return (uint64_t(layer) * L_.senders + rank) * L_.sum_slots + slot;
  }
  void release() {
    cudaSetDevice(device_);
    if (stream_) cudaStreamSynchronize(stream_);  // only local checksum kernels
    if (base_) cudaFree(base_);
    if (landed_) cudaFree(landed_);
    if (host_sums_) cudaFreeHost(host_sums_);
    if (done_) cudaEventDestroy(done_);
    if (stream_) cudaStreamDestroy(stream_);
    base_ = nullptr;
    landed_ = nullptr;
    host_sums_ = nullptr;
    done_ = nullptr;
    stream_ = nullptr;
  }
};

class IpcPayloadSource final : public PagePayloadSource {
 public:
  IpcPayloadSource(const v1::KvStreamHello& hello, int device, int timeout_ms,
                   const PayloadJob& job)
      : device_(device), timeout_ms_(timeout_ms), rank_(hello.rank()), job_id_(job.job_id) {
    const std::string me = host_identity();
    const std::string refusal = ipc_setup_refusal(hello.transport_setup(), me);
    if (!refusal.empty()) throw std::runtime_error(refusal);
    if (rank_ < 0 || rank_ >= job.senders)
      throw std::runtime_error("rank " + std::to_string(rank_) + " outside [0, " +
                               std::to_string(job.senders) + ")");
    const KvStoreShape& sh = job.shape;
    if (sh.head_dim * sh.elem_bytes() % 4 != 0)
      throw std::runtime_error("ipc needs head_dim x dtype bytes to be a multiple of 4, got " +
                               std::to_string(sh.head_dim * sh.elem_bytes()));
    std::shared_ptr<IpcJobKv> kv;
    {
      std::lock_guard<std::mutex> lock(job.device->mu);
      if (!job.device->kv)
        job.device->kv = std::make_shared<IpcJobKv>(
            device_, IpcRegionLayout::make(sh, job.n_tokens, job.senders));
      kv = std::dynamic_pointer_cast<IpcJobKv>(job.device->kv);
    }
    if (!kv) throw std::runtime_error("the job's device KV is not an ipc region");
    kv_ = kv;
    MPREFILL_EDGE_CHECK_CUDA(cudaSetDevice(device_), "cudaSetDevice");
    for (int i = 0; i < 2; ++i) {
      MPREFILL_EDGE_CHECK_CUDA(
          cudaEventCreateWithFlags(&ev_[i], cudaEventInterprocess | cudaEventDisableTiming),
          "cudaEventCreate (interprocess)");
      MPREFILL_EDGE_CHECK_CUDA(cudaIpcGetEventHandle(&ev_handle_[i], ev_[i]),
                               "cudaIpcGetEventHandle");
    }
    host_ = me;
  }
  ~IpcPayloadSource() override {
    cudaSetDevice(device_);
    for (auto& e : ev_)
      if (e) cudaEventDestroy(e);
  }

  bool setup_reply(v1::Envelope* env) override {
    const auto kv_ = region();
    v1::KvIpcOffer* o = env->mutable_kv_ipc_offer();
    o->set_job_id(job_id_);
    o->set_mem_handle(
        std::string(reinterpret_cast<const char*>(&kv_->handle()), sizeof(cudaIpcMemHandle_t)));
    for (const auto& h : ev_handle_)
      o->add_event_handles(std::string(reinterpret_cast<const char*>(&h), sizeof h));
    kv_->layout().to_offer(o);
    o->set_host_id(host_);
    o->set_device(device_name(device_));
    return true;
  }

  bool in_place() const override { return true; }

  void land(const v1::KvPageHeader& h) override {
    // Everything a checksum kernel would read is inside the region: check before launching.
    const auto kv_ = region();
    const IpcRegionLayout& L = kv_->layout();
    auto bad = [&](const std::string& m) { throw std::runtime_error("ipc page header: " + m); };
    if (h.sender_rank() != rank_) bad("sender_rank is not the stream's rank");
    if (h.layer() < 0 || h.layer() >= L.n_layers) bad("layer out of range");
    if (h.token_begin() < 0 || h.token_end() <= h.token_begin() || h.token_end() > L.n_tokens)
      bad("tokens outside the job's");
    if (h.head_dim() != L.head_dim) bad("head_dim is not the contract's");
    const bool same =
        (h.dtype() == v1::BF16 && L.elem_bytes == 2) || (h.dtype() == v1::F32 && L.elem_bytes == 4);
    const bool widened = h.dtype() == v1::BF16 && L.elem_bytes == 4;
    if (!same && !widened) bad("dtype is neither the contract's nor bf16 widened into it");
    if (h.head_dim() % 2 != 0) bad("odd head_dim");
    if (h.kv_heads_size() < 1) bad("no KV heads");
    for (int j = 0; j < h.kv_heads_size(); ++j)
      if (h.kv_heads(j) < 0 || h.kv_heads(j) >= L.n_kv_heads ||
          (j > 0 && h.kv_heads(j) <= h.kv_heads(j - 1)))
        bad("KV heads must be ascending ids of the contract");
    if (h.sum_slot() < 0 || h.sum_slot() >= L.sum_slots) bad("sum_slot out of range");
    wait_event(ev_[h.layer() % 2], timeout_ms_,
               "layer " + std::to_string(h.layer()) + " copies of rank " + std::to_string(rank_));
    kv_->enqueue_check(h);
  }

 private:
  int device_, timeout_ms_, rank_;
  uint64_t job_id_;
  std::string host_;
  // The job owns its region (JobDeviceSlot); a stream only borrows it, so a failed or
  // released job frees its device memory at once, not when its last stream ends.
  std::weak_ptr<IpcJobKv> kv_;
  cudaEvent_t ev_[2] = {nullptr, nullptr};

  std::shared_ptr<IpcJobKv> region() const {
    auto kv = kv_.lock();
    if (!kv) throw std::runtime_error("the job's KV region was released");
    return kv;
  }
  cudaIpcEventHandle_t ev_handle_[2]{};
};

}  // namespace

PayloadSourceFactory make_ipc_payload_factory(int device) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || device < 0 || device >= n)
    throw std::runtime_error("CUDA device " + std::to_string(device) + " is not visible (" +
                             std::to_string(n) + " devices)");
  return [device](const v1::KvStreamHello& hello, int timeout_ms, const PayloadJob& job) {
    return std::unique_ptr<PagePayloadSource>(
        std::make_unique<IpcPayloadSource>(hello, device, timeout_ms, job));
  };
}

}  // namespace mprefill::kv
