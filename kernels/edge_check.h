// The one edge check: a Status from kernels/ or comm/ becomes an exception at the edge
// (engine/, kv/, worker/, decode/, search/, tools), carrying where it happened:
//
//   "rank 3 (cuda:1): flash attention at layer 7 failed: CUDA error (cudaMemcpyAsync at
//    kernels/cuda/gemm.cc:88: an illegal memory access) [engine/cuda/layer_forward.cc:214]"
//
// Role, rank and device come from the process-wide edge context (set once by the executor
// or the service that owns the process; nullptr / -1 = not set, left out of the text):
// "decoder (cuda:0): ..." in the decoder, which has no rank. The backend's
// last error text is passed by the caller: cuda::last_error() for CUDA launchers,
// Communicator::last_error() for comm/, empty for the CPU kernels. Nothing in kernels/
// or comm/ calls this: they return Status.
#pragma once
#include <stdexcept>
#include <string>
#include <string_view>

#include "kernels/status.h"

namespace mprefill {

// Thrown by the edge check; status() is the code the backend returned.
class StatusError : public std::runtime_error {
 public:
  StatusError(Status s, const std::string& text) : std::runtime_error(text), status_(s) {}
  Status status() const { return status_; }

 private:
  Status status_;
};

// Process-wide role / rank / CUDA device named in every edge error (thread-safe to read).
// role must outlive every reader (a string literal such as "decoder"); nullptr when the rank
// says enough (the worker ranks, executors).
void set_edge_context(int rank, int device, const char* role = nullptr);
int edge_rank();
int edge_device();
const char* edge_role();

// "ROLE rank R (cuda:D): ", each part left out when unset ("" when all are).
std::string edge_prefix();

[[noreturn]] void throw_status(Status s, std::string_view what, std::string_view backend_error,
                               const char* file, int line);

}  // namespace mprefill

// Throws StatusError when `status_expr` is not kOk. `what` is a std::string or literal
// naming the operation (and layer / head); `backend_error` the backend's last error text
// (evaluated only on failure).
#define MPREFILL_EDGE_CHECK(status_expr, what, backend_error)                                  \
  do {                                                                                         \
    const ::mprefill::Status mprefill_edge_s_ = (status_expr);                                 \
    if (mprefill_edge_s_ != ::mprefill::Status::kOk)                                           \
      ::mprefill::throw_status(mprefill_edge_s_, (what), (backend_error), __FILE__, __LINE__); \
  } while (0)
