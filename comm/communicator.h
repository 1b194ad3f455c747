// Communicator: the collectives and point-to-point calls the distributed prefill uses,
// with an MPI backend (CPU, host buffers) and an NCCL backend (GPU, device buffers,
// enqueued on a CUDA stream). Status codes inside comm/; every wait is bounded by
// CommConfig::timeout_ms and a timeout names the rank, the peer and the operation
// (last_error()).
//
// Semantics shared by both backends:
//   - Between group_start() and group_end() calls are only posted; group_end() (MPI) or
//     synchronize() (NCCL) completes them. Outside a group, an MPI call returns when it is
//     complete; an NCCL call returns once enqueued on the stream.
//   - all_gather: rank r's `count` elements land at recv + r * count.
//   - synchronize(stream): waits for everything issued on `stream` (NCCL) or for posted
//     work (MPI), bounded by the timeout.
#pragma once
#include <cstddef>
#include <memory>
#include <string>

#include "kernels/status.h"
#include "kernels/types.h"

namespace mprefill::comm {

enum class ReduceOp : int { kSum = 0, kMax = 1 };

struct CommConfig {
  int timeout_ms = 120000;  // bound of every wait; a timeout becomes Status::kTimeout
};

// cudaStream_t for NCCL, ignored by MPI (pass nullptr).
using StreamHandle = void*;

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const char* backend() const = 0;

  virtual Status all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op,
                            StreamHandle stream) = 0;
  virtual Status all_gather(const void* send, void* recv, size_t count, DType dtype,
                            StreamHandle stream) = 0;
  virtual Status broadcast(void* buf, size_t count, DType dtype, int root, StreamHandle stream) = 0;
  virtual Status send(const void* buf, size_t count, DType dtype, int peer,
                      StreamHandle stream) = 0;
  virtual Status recv(void* buf, size_t count, DType dtype, int peer, StreamHandle stream) = 0;
  virtual Status group_start() = 0;
  virtual Status group_end() = 0;
  virtual Status synchronize(StreamHandle stream) = 0;

  // Sub-communicator of the ranks that pass the same color, ordered by key (collective).
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // Text of the last failure: "rank 2: recv from peer 1 timed out after 5000 ms".
  const std::string& last_error() const { return last_error_; }

 protected:
  std::string last_error_;
};

}  // namespace mprefill::comm
