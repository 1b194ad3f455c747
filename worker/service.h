// The worker service of one mpirun group (issue 6; a library since issue 14): every rank
// builds its executor with make_executor() (its tensor-parallel slices) and joins the
// group's control channel; rank 0 registers the group with the coordinator and turns its
// messages into group commands (a tick at least every 500 ms, a job, exit), which every
// rank follows; a job runs through job_runner.h. A lost coordinator is re-registered for
// up to --reconnect-s; a rank that stops answering fails the group (every wait bounded).
#pragma once
#include "worker/options.h"

namespace mprefill::worker {

// Initialises MPI (argc, argv as mpirun passed them), installs SIGINT / SIGTERM handlers
// (a clean stop) and serves until a signal or a failure. Returns the exit status: 0 on a
// signal, 1 on a failure (refused registration, a rank that stopped answering, a
// coordinator not back within reconnect_s); a group out of step aborts every rank (1).
int run_service(const WorkerOptions& opt, int* argc, char*** argv);

}  // namespace mprefill::worker
