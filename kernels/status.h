// Status codes returned by every kernel launcher (CPU and CUDA). Exceptions are
// raised only at the edge (worker/, tools), never inside kernels/.
#pragma once

namespace mprefill {

enum class Status : int {
  kOk = 0,
  kInvalidArgument,  // a params field is out of range or inconsistent
  kUnsupported,      // valid request this backend/build does not implement (dtype, head_dim)
  kOutOfMemory,      // caller-provided workspace too small, or host allocation failed
  kCudaError,        // a CUDA runtime/driver call failed (see cudaGetLastError)
  kNoDevice,         // CUDA build, but no usable GPU at run time
  kTimeout,          // a bounded wait (comm/) ran out; the peer is named in the error text
  kCommError,        // MPI/NCCL reported an error or a peer aborted
  kInternal,         // a broken invariant: a bug
};

const char* to_string(Status s);

}  // namespace mprefill
