#include "kv/cuda/nccl_kv_receiver.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstring>
#include <stdexcept>

#include "kernels/cuda/edge_check.h"
#include "kv/cuda/nccl_kv_common.h"
#include "kv/kv_handoff.h"

namespace mprefill::kv {
namespace {

constexpr size_t kMaxPageBytes = size_t{1} << 31;  // per tensor; larger headers are refused

class NcclPayloadSource final : public PagePayloadSource {
 public:
  NcclPayloadSource(const v1::KvStreamHello& hello, int device, int timeout_ms)
      : device_(device), timeout_ms_(timeout_ms) {
    if (hello.nccl_unique_id().size() != sizeof(ncclUniqueId))
      throw std::runtime_error("nccl_unique_id has " +
                               std::to_string(hello.nccl_unique_id().size()) + " bytes, not " +
                               std::to_string(sizeof(ncclUniqueId)));
    MPREFILL_EDGE_CHECK_CUDA(cudaSetDevice(device_), "NCCL KV receiver: cudaSetDevice");
    ncclUniqueId id;
    std::memcpy(&id, hello.nccl_unique_id().data(), sizeof id);
    std::string err;
    comm_ = ncclkv::init_comm(id, 2, 1, timeout_ms_, &err);
    if (!comm_) throw std::runtime_error(err);
    try {
      MPREFILL_EDGE_CHECK_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                               "NCCL KV receiver: cudaStreamCreate");
      MPREFILL_EDGE_CHECK_CUDA(cudaMalloc(&sums_, 4 * sizeof(uint32_t)),
                               "NCCL KV receiver: cudaMalloc checksums");
      MPREFILL_EDGE_CHECK_CUDA(cudaMallocHost(&host_sums_, 4 * sizeof(uint32_t)),
                               "NCCL KV receiver: cudaMallocHost");
      // Warm-up: one word from the sender sets up the peer connection (NCCL connects
      // lazily, ~100 ms) before the first page, and proves the communicator works.
      std::string e =
          ncclkv::settle(comm_, ncclRecv(sums_, 1, ncclUint32, 0, comm_, stream_), timeout_ms_);
      if (e.empty()) e = ncclkv::wait_stream(comm_, stream_, timeout_ms_);
      if (!e.empty()) throw std::runtime_error("NCCL warm-up receive: " + e);
    } catch (...) {
      release(true);
      throw;
    }
  }
  ~NcclPayloadSource() override { release(aborted_); }

  void fetch(const v1::KvPageHeader& h, std::string* k, std::string* v) override {
    if (aborted_) throw std::runtime_error("NCCL communicator already aborted");
    const DType dt = from_proto(h.dtype());
    const int64_t tokens = h.token_end() - h.token_begin();
    if (tokens <= 0 || h.head_dim() <= 0 || h.kv_heads_size() <= 0)
      throw std::runtime_error("page header with no tokens, heads or head_dim");
    const size_t n =
        static_cast<size_t>(tokens) * h.kv_heads_size() * h.head_dim() * dtype_size(dt);
    if (n > kMaxPageBytes) throw std::runtime_error("page of " + std::to_string(n) + " bytes");
    MPREFILL_EDGE_CHECK_CUDA(cudaSetDevice(device_), "NCCL KV receiver: cudaSetDevice");
    if (n > cap_) {
      // Growing: the previous fetch finished (its wait returned), nothing is in flight.
      if (buf_) cudaFree(buf_);
      if (host_) cudaFreeHost(host_);
      buf_ = nullptr;
      host_ = nullptr;
      cap_ = 0;
      MPREFILL_EDGE_CHECK_CUDA(cudaMalloc(&buf_, 2 * n),
                               "NCCL KV receiver: cudaMalloc page buffer");
      MPREFILL_EDGE_CHECK_CUDA(cudaMallocHost(&host_, 2 * n),
                               "NCCL KV receiver: cudaMallocHost page buffer");
      cap_ = n;
    }
    char* dk = static_cast<char*>(buf_);
    char* dv = dk + cap_;
    MPREFILL_EDGE_CHECK_CUDA(cudaMemsetAsync(sums_, 0, 4 * sizeof(uint32_t), stream_),
                             "NCCL KV receiver: cudaMemsetAsync");
    std::string err = ncclkv::settle(comm_, ncclGroupStart(), timeout_ms_);
    if (err.empty())
      err = ncclkv::settle(comm_, ncclRecv(dk, n, ncclUint8, 0, comm_, stream_), timeout_ms_);
    if (err.empty())
      err = ncclkv::settle(comm_, ncclRecv(dv, n, ncclUint8, 0, comm_, stream_), timeout_ms_);
    if (err.empty())
      err = ncclkv::settle(comm_, ncclRecv(sums_, 2, ncclUint32, 0, comm_, stream_), timeout_ms_);
    if (err.empty()) err = ncclkv::settle(comm_, ncclGroupEnd(), timeout_ms_);
    if (!err.empty()) fail("ncclRecv: " + err);
    MPREFILL_EDGE_CHECK_CUDA(ncclkv::launch_device_sum(dk, n, sums_ + 2, stream_),
                             "NCCL KV receiver: device checksum K");
    MPREFILL_EDGE_CHECK_CUDA(ncclkv::launch_device_sum(dv, n, sums_ + 3, stream_),
                             "NCCL KV receiver: device checksum V");
    // Into pinned memory (a pageable destination makes the driver stage every copy), then
    // into the page's strings once the stream is done.
    char* hk = static_cast<char*>(host_);
    MPREFILL_EDGE_CHECK_CUDA(cudaMemcpyAsync(hk, dk, n, cudaMemcpyDeviceToHost, stream_),
                             "NCCL KV receiver: copy K to host");
    MPREFILL_EDGE_CHECK_CUDA(cudaMemcpyAsync(hk + cap_, dv, n, cudaMemcpyDeviceToHost, stream_),
                             "NCCL KV receiver: copy V to host");
    MPREFILL_EDGE_CHECK_CUDA(
        cudaMemcpyAsync(host_sums_, sums_, 4 * sizeof(uint32_t), cudaMemcpyDeviceToHost, stream_),
        "NCCL KV receiver: copy checksums");
    err = ncclkv::wait_stream(comm_, stream_, timeout_ms_);
    if (!err.empty()) fail("receiving the page: " + err);
    k->assign(hk, n);
    v->assign(hk + cap_, n);
    if (host_sums_[0] != host_sums_[2] || host_sums_[1] != host_sums_[3])
      throw std::runtime_error(
          "device checksum mismatch for tokens [" + std::to_string(h.token_begin()) + ", " +
          std::to_string(h.token_end()) + "): sender K " + std::to_string(host_sums_[0]) + " V " +
          std::to_string(host_sums_[1]) + ", received K " + std::to_string(host_sums_[2]) + " V " +
          std::to_string(host_sums_[3]));
  }

 private:
  int device_, timeout_ms_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  void* buf_ = nullptr;   // device [2][cap_]: K then V of the current page
  void* host_ = nullptr;  // pinned [2][cap_]
  size_t cap_ = 0;
  uint32_t* sums_ = nullptr;       // device: sender K, V; received K, V
  uint32_t* host_sums_ = nullptr;  // pinned copy
  bool aborted_ = false;

  [[noreturn]] void fail(const std::string& msg) {
    aborted_ = true;
    ncclCommAbort(comm_);  // unblocks the kernels of the pending receives
    comm_ = nullptr;
    throw std::runtime_error(msg + "; NCCL communicator aborted");
  }

  void release(bool abort) {
    cudaSetDevice(device_);
    if (comm_) {
      std::string err;
      if (!abort) err = ncclkv::settle(comm_, ncclCommFinalize(comm_), timeout_ms_);
      if (abort || !err.empty())
        ncclCommAbort(comm_);
      else
        ncclCommDestroy(comm_);
      comm_ = nullptr;
    }
    if (stream_) cudaStreamSynchronize(stream_);
    if (buf_) cudaFree(buf_);
    if (host_) cudaFreeHost(host_);
    if (sums_) cudaFree(sums_);
    if (host_sums_) cudaFreeHost(host_sums_);
    if (stream_) cudaStreamDestroy(stream_);
    buf_ = nullptr;
    host_ = nullptr;
    sums_ = nullptr;
    host_sums_ = nullptr;
    stream_ = nullptr;
  }
};

}  // namespace

PayloadSourceFactory make_nccl_payload_factory(int device) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || device < 0 || device >= n)
    throw std::runtime_error("CUDA device " + std::to_string(device) + " is not visible (" +
                             std::to_string(n) + " devices)");
  return [device](const v1::KvStreamHello& hello, int timeout_ms, const PayloadJob&) {
    return std::unique_ptr<PagePayloadSource>(
        std::make_unique<NcclPayloadSource>(hello, device, timeout_ms));
  };
}

}  // namespace mprefill::kv
