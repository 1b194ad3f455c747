#include "comm/mpi_comm.h"

#include <chrono>
#include <cstdint>
#include <sstream>
#include <thread>
#include <vector>

namespace mprefill::comm {
namespace {

using Clock = std::chrono::steady_clock;

bool mpi_type(DType t, MPI_Datatype* out) {
  switch (t) {
    case DType::kF32:
      *out = MPI_FLOAT;
      return true;
    case DType::kBF16:
    case DType::kF16:
      *out = MPI_UINT16_T;
      return true;  // moved as bits, never reduced
    case DType::kI32:
      *out = MPI_INT32_T;
      return true;
    case DType::kI64:
      *out = MPI_INT64_T;
      return true;
  }
  return false;
}

struct Pending {
  MPI_Request req = MPI_REQUEST_NULL;
  const char* op = "";
  int peer = -1;             // -1: collective
  bool cancellable = false;  // receives can be cancelled after a timeout
};

// Polls `MPI_Test`, yielding and then sleeping so that oversubscribed ranks (CI runs 4
// ranks on 2 cores) leave the core to the peer they wait for.
class Backoff {
 public:
  void pause() {
    if (++spins_ < 64) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(spins_ < 1024 ? 20 : 200));
    }
  }

 private:
  int spins_ = 0;
};

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, const CommConfig& cfg) : cfg_(cfg) {
    MPI_Comm_dup(comm, &comm_);
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiCommunicator() override {
    // Requests still pending after a timeout cannot be freed safely; leave them (the
    // process is about to abort in that case).
    if (pending_.empty()) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "mpi"; }

  Status all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op,
                    StreamHandle) override {
    MPI_Datatype t;
    if (!mpi_type(dtype, &t) || dtype == DType::kBF16 || dtype == DType::kF16)
      return fail(Status::kUnsupported, "all_reduce", -1, "dtype not reducible on MPI");
    Pending p{MPI_REQUEST_NULL, "all_reduce", -1, false};
    const int rc = MPI_Iallreduce(send == recv ? MPI_IN_PLACE : send, recv, to_int(count), t,
                                  op == ReduceOp::kSum ? MPI_SUM : MPI_MAX, comm_, &p.req);
    return post(rc, p);
  }

  Status all_gather(const void* send, void* recv, size_t count, DType dtype,
                    StreamHandle) override {
    MPI_Datatype t;
    if (!mpi_type(dtype, &t)) return fail(Status::kInvalidArgument, "all_gather", -1, "dtype");
    Pending p{MPI_REQUEST_NULL, "all_gather", -1, false};
    const char* in_place =
        static_cast<const char*>(recv) + static_cast<size_t>(rank_) * count * dtype_size(dtype);
    const int rc = MPI_Iallgather(send == in_place ? MPI_IN_PLACE : send, to_int(count), t, recv,
                                  to_int(count), t, comm_, &p.req);
    return post(rc, p);
  }

  Status broadcast(void* buf, size_t count, DType dtype, int root, StreamHandle) override {
    MPI_Datatype t;
    if (!mpi_type(dtype, &t) || root < 0 || root >= size_)
      return fail(Status::kInvalidArgument, "broadcast", root, "dtype or root");
    Pending p{MPI_REQUEST_NULL, "broadcast", root, false};
    return post(MPI_Ibcast(buf, to_int(count), t, root, comm_, &p.req), p);
  }

  Status send(const void* buf, size_t count, DType dtype, int peer, StreamHandle) override {
    MPI_Datatype t;
    if (!mpi_type(dtype, &t) || peer < 0 || peer >= size_)
      return fail(Status::kInvalidArgument, "send", peer, "dtype or peer");
    Pending p{MPI_REQUEST_NULL, "send to", peer, false};
    return post(MPI_Isend(buf, to_int(count), t, peer, kTag, comm_, &p.req), p);
  }

  Status recv(void* buf, size_t count, DType dtype, int peer, StreamHandle) override {
    MPI_Datatype t;
    if (!mpi_type(dtype, &t) || peer < 0 || peer >= size_)
      return fail(Status::kInvalidArgument, "recv", peer, "dtype or peer");
    Pending p{MPI_REQUEST_NULL, "recv from", peer, true};
    return post(MPI_Irecv(buf, to_int(count), t, peer, kTag, comm_, &p.req), p);
  }

  Status group_start() override {
    if (in_group_) return fail(Status::kInvalidArgument, "group_start", -1, "nested group");
    in_group_ = true;
    return Status::kOk;
  }

  Status group_end() override {
    if (!in_group_) return fail(Status::kInvalidArgument, "group_end", -1, "no open group");
    in_group_ = false;
    return wait_pending();
  }

  Status synchronize(StreamHandle) override { return wait_pending(); }

  std::unique_ptr<Communicator> split(int color, int key) override {
    // Prove every rank arrived (bounded) before the blocking MPI_Comm_split.
    std::vector<int> all(2 * size_);
    const int mine[2] = {color, key};
    Pending p{MPI_REQUEST_NULL, "split", -1, false};
    if (post(MPI_Iallgather(mine, 2, MPI_INT, all.data(), 2, MPI_INT, comm_, &p.req), p) !=
        Status::kOk)
      return nullptr;
    MPI_Comm sub;
    if (MPI_Comm_split(comm_, color, key, &sub) != MPI_SUCCESS) return nullptr;
    auto out = std::make_unique<MpiCommunicator>(sub, cfg_);
    MPI_Comm_free(&sub);
    return out;
  }

 private:
  static constexpr int kTag = 0x6d70;

  // MPI counts are int: callers split larger messages (1M-token shards stay below 2^31).
  static int to_int(size_t n) { return n > INT32_MAX ? -1 : static_cast<int>(n); }

  Status post(int rc, Pending p) {
    if (rc == MPI_ERR_COUNT)
      return fail(Status::kInvalidArgument, p.op, p.peer, "count over 2^31-1");
    if (rc != MPI_SUCCESS) return fail(Status::kCommError, p.op, p.peer, mpi_error(rc));
    pending_.push_back(p);
    return in_group_ ? Status::kOk : wait_pending();
  }

  Status wait_pending() {
    const auto deadline = Clock::now() + std::chrono::milliseconds(cfg_.timeout_ms);
    Backoff backoff;
    for (;;) {
      bool all_done = true;
      for (auto& p : pending_) {
        if (p.req == MPI_REQUEST_NULL) continue;
        int flag = 0;
        const int rc = MPI_Test(&p.req, &flag, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) {
          const Pending bad = p;
          return fail(Status::kCommError, bad.op, bad.peer, mpi_error(rc));
        }
        all_done &= static_cast<bool>(flag);
      }
      if (all_done) {
        pending_.clear();
        return Status::kOk;
      }
      if (Clock::now() > deadline) return timeout();
      backoff.pause();
    }
  }

  // Names the first unfinished request, cancels what MPI can cancel (receives) so the
  // communicator stays usable when the peer was merely absent.
  Status timeout() {
    const Pending* first = nullptr;
    for (auto& p : pending_) {
      if (p.req == MPI_REQUEST_NULL) continue;
      if (!first) first = &p;
    }
    std::ostringstream why;
    why << "timed out after " << cfg_.timeout_ms << " ms";
    const Pending bad = *first;
    bool all_cancelled = true;
    for (auto& p : pending_) {
      if (p.req == MPI_REQUEST_NULL) continue;
      if (p.cancellable) {
        MPI_Cancel(&p.req);
        MPI_Wait(&p.req, MPI_STATUS_IGNORE);  // completes at once after a cancel
      } else {
        all_cancelled = false;
      }
    }
    if (all_cancelled) pending_.clear();
    return fail(Status::kTimeout, bad.op, bad.peer, why.str());
  }

  Status fail(Status s, const char* op, int peer, const std::string& what) {
    std::ostringstream m;
    m << "rank " << rank_ << ": " << op;
    if (peer >= 0) m << " peer " << peer;
    m << ": " << what;
    last_error_ = m.str();
    return s;
  }

  static std::string mpi_error(int rc) {
    char buf[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, buf, &len);
    return std::string(buf, len);
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  CommConfig cfg_;
  int rank_ = 0, size_ = 1;
  bool in_group_ = false;
  std::vector<Pending> pending_;
};

}  // namespace

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int provided = 0;
  MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
}

MpiRuntime::~MpiRuntime() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

WorldInfo world_info() {
  WorldInfo w;
  MPI_Comm_rank(MPI_COMM_WORLD, &w.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &w.size);
  MPI_Comm local;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, w.rank, MPI_INFO_NULL, &local);
  MPI_Comm_rank(local, &w.local_rank);
  MPI_Comm_size(local, &w.local_size);
  MPI_Comm_free(&local);
  return w;
}

std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm, const CommConfig& cfg) {
  return std::make_unique<MpiCommunicator>(comm, cfg);
}

void abort_world(int code) {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::abort();
}

}  // namespace mprefill::comm
