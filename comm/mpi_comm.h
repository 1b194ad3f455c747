// MPI world bootstrap and the MPI backend of Communicator.
#pragma once
#include <mpi.h>

#include <memory>

#include "comm/communicator.h"

namespace mprefill::comm {

// MPI_Init_thread / MPI_Finalize for the process (one per process, RAII).
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;
};

struct WorldInfo {
  int rank = 0, size = 1;              // MPI_COMM_WORLD
  int local_rank = 0, local_size = 1;  // ranks on this node (MPI_Comm_split_type shared)
};
WorldInfo world_info();

// Wraps a duplicate of `comm` (the caller keeps ownership of its own handle).
std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm, const CommConfig& cfg = {});

// Abort every rank of the world (after a fatal comm error); does not return.
[[noreturn]] void abort_world(int code);

}  // namespace mprefill::comm
