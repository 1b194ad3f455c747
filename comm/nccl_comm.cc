#include "comm/nccl_comm.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <chrono>
#include <sstream>
#include <thread>

namespace mprefill::comm {
namespace {

using Clock = std::chrono::steady_clock;

bool nccl_type(DType t, ncclDataType_t* out) {
  switch (t) {
    case DType::kF32:
      *out = ncclFloat32;
      return true;
    case DType::kBF16:
      *out = ncclBfloat16;
      return true;
    case DType::kF16:
      *out = ncclFloat16;
      return true;
    case DType::kI32:
      *out = ncclInt32;
      return true;
    case DType::kI64:
      *out = ncclInt64;
      return true;
  }
  return false;
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, int rank, int size, int device, MPI_Comm mpi,
                   const CommConfig& cfg)
      : comm_(comm), rank_(rank), size_(size), device_(device), cfg_(cfg) {
    MPI_Comm_dup(mpi, &mpi_);
  }
  ~NcclCommunicator() override {
    if (comm_) {
      if (aborted_) {
        ncclCommAbort(comm_);
      } else {
        ncclCommFinalize(comm_);
        wait_async("finalize", -1);
        ncclCommDestroy(comm_);
      }
    }
    MPI_Comm_free(&mpi_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "nccl"; }

  Status all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op,
                    StreamHandle stream) override {
    ncclDataType_t t;
    if (!nccl_type(dtype, &t)) return fail(Status::kInvalidArgument, "all_reduce", -1, "dtype");
    return issue(ncclAllReduce(send, recv, count, t, op == ReduceOp::kSum ? ncclSum : ncclMax,
                               comm_, cuda(stream)),
                 "all_reduce", -1);
  }
  Status all_gather(const void* send, void* recv, size_t count, DType dtype,
                    StreamHandle stream) override {
    ncclDataType_t t;
    if (!nccl_type(dtype, &t)) return fail(Status::kInvalidArgument, "all_gather", -1, "dtype");
    return issue(ncclAllGather(send, recv, count, t, comm_, cuda(stream)), "all_gather", -1);
  }
  Status broadcast(void* buf, size_t count, DType dtype, int root, StreamHandle stream) override {
    ncclDataType_t t;
    if (!nccl_type(dtype, &t) || root < 0 || root >= size_)
      return fail(Status::kInvalidArgument, "broadcast", root, "dtype or root");
    return issue(ncclBroadcast(buf, buf, count, t, root, comm_, cuda(stream)), "broadcast", root);
  }
  Status send(const void* buf, size_t count, DType dtype, int peer, StreamHandle stream) override {
    ncclDataType_t t;
    if (!nccl_type(dtype, &t) || peer < 0 || peer >= size_)
      return fail(Status::kInvalidArgument, "send to", peer, "dtype or peer");
    return issue(ncclSend(buf, count, t, peer, comm_, cuda(stream)), "send to", peer);
  }
  Status recv(void* buf, size_t count, DType dtype, int peer, StreamHandle stream) override {
    ncclDataType_t t;
    if (!nccl_type(dtype, &t) || peer < 0 || peer >= size_)
      return fail(Status::kInvalidArgument, "recv from", peer, "dtype or peer");
    return issue(ncclRecv(buf, count, t, peer, comm_, cuda(stream)), "recv from", peer);
  }
  Status group_start() override { return issue(ncclGroupStart(), "group_start", -1); }
  Status group_end() override { return issue(ncclGroupEnd(), "group_end", -1); }

  Status synchronize(StreamHandle stream) override {
    const auto deadline = Clock::now() + std::chrono::milliseconds(cfg_.timeout_ms);
    for (int spins = 0;; ++spins) {
      const cudaError_t q = cudaStreamQuery(cuda(stream));
      if (q == cudaSuccess) return Status::kOk;
      if (q != cudaErrorNotReady)
        return fail(Status::kCudaError, "synchronize", -1, cudaGetErrorString(q));
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      if (async != ncclSuccess && async != ncclInProgress) return abort_with("synchronize", async);
      if (Clock::now() > deadline) return abort_with("synchronize", ncclInProgress);
      if (spins > 64) std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    MPI_Comm sub;
    if (MPI_Comm_split(mpi_, color, key, &sub) != MPI_SUCCESS) return nullptr;
    std::string err;
    auto out = make_nccl_communicator(sub, device_, cfg_, &err);
    if (!out) last_error_ = err;
    MPI_Comm_free(&sub);
    return out;
  }

 private:
  static cudaStream_t cuda(StreamHandle s) { return static_cast<cudaStream_t>(s); }

  // Non-blocking NCCL: a call may return ncclInProgress; poll until it settles.
  Status issue(ncclResult_t r, const char* op, int peer) {
    if (r == ncclSuccess) return Status::kOk;
    if (r != ncclInProgress) return abort_with(op, r, peer);
    return wait_async(op, peer);
  }

  Status wait_async(const char* op, int peer) {
    const auto deadline = Clock::now() + std::chrono::milliseconds(cfg_.timeout_ms);
    for (;;) {
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      if (async == ncclSuccess) return Status::kOk;
      if (async != ncclInProgress) return abort_with(op, async, peer);
      if (Clock::now() > deadline) return abort_with(op, ncclInProgress, peer);
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  Status abort_with(const char* op, ncclResult_t r, int peer = -1) {
    std::ostringstream m;
    m << "rank " << rank_ << " (nccl, device " << device_ << "): " << op;
    if (peer >= 0) m << " peer " << peer;
    if (r == ncclInProgress) {
      m << ": timed out after " << cfg_.timeout_ms << " ms; communicator aborted";
    } else {
      m << ": " << ncclGetErrorString(r) << "; communicator aborted";
    }
    last_error_ = m.str();
    aborted_ = true;
    return r == ncclInProgress ? Status::kTimeout : Status::kCommError;
  }

  Status fail(Status s, const char* op, int peer, const char* what) {
    std::ostringstream m;
    m << "rank " << rank_ << " (nccl): " << op;
    if (peer >= 0) m << " peer " << peer;
    m << ": " << what;
    last_error_ = m.str();
    return s;
  }

  ncclComm_t comm_ = nullptr;
  int rank_, size_, device_;
  CommConfig cfg_;
  MPI_Comm mpi_ = MPI_COMM_NULL;
  bool aborted_ = false;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm, int device,
                                                     const CommConfig& cfg, std::string* error) {
  int rank = 0, size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  auto set_error = [&](const std::string& what) {
    if (error) *error = "rank " + std::to_string(rank) + ": NCCL init: " + what;
    return nullptr;
  };
  if (cudaSetDevice(device) != cudaSuccess)
    return set_error("cudaSetDevice(" + std::to_string(device) + ") failed");
  ncclUniqueId id;
  if (rank == 0 && ncclGetUniqueId(&id) != ncclSuccess) return set_error("ncclGetUniqueId failed");
  if (MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, comm) != MPI_SUCCESS)
    return set_error("MPI_Bcast of the unique id failed");
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t nc = nullptr;
  ncclResult_t r = ncclCommInitRankConfig(&nc, size, id, rank, &config);
  const auto deadline = Clock::now() + std::chrono::milliseconds(cfg.timeout_ms);
  while (r == ncclInProgress) {
    if (Clock::now() > deadline) {
      ncclCommAbort(nc);
      return set_error("timed out after " + std::to_string(cfg.timeout_ms) + " ms");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    ncclCommGetAsyncError(nc, &r);
  }
  if (r != ncclSuccess) {
    if (nc) ncclCommAbort(nc);
    return set_error(ncclGetErrorString(r));
  }
  return std::make_unique<NcclCommunicator>(nc, rank, size, device, comm, cfg);
}

}  // namespace mprefill::comm
