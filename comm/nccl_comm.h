// NCCL backend of Communicator (GPU buffers, CUDA streams), bootstrapped over MPI:
// rank 0 of `comm` creates the ncclUniqueId and broadcasts it. Communicators are
// non-blocking (ncclConfig_t::blocking = 0): every NCCL call and every wait polls
// ncclCommGetAsyncError against the deadline and aborts the communicator
// (ncclCommAbort) when it passes, so a dead peer becomes Status::kTimeout, not a hang.
#pragma once
#include <mpi.h>

#include <memory>

#include "comm/communicator.h"

namespace mprefill::comm {

// `device`: the CUDA device of this rank (usually the node-local rank). Returns null and
// fills *error on failure.
std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm, int device,
                                                     const CommConfig& cfg, std::string* error);

}  // namespace mprefill::comm
