// One job on the worker group: Assignment -> checks (prompt, policy, plan, transport,
// the executor's caps) -> the KV handoff to the job's decoder -> make_executor()'s
// prefill with the coordinator's token layout -> totals over ranks -> WorkerDone with the
// first token (rank 0). Collective: every rank calls run_job with the same Assignment.
//
// Failures that leave the group in step (a bad request, a decoder that fails, a cancel)
// are agreed over the control channel, reported once as WorkerFailed naming the rank,
// and the group keeps serving. A throw from inside the collective prefill leaves peers
// out of step: run_job throws CommFailure and the group must exit.
#pragma once
#include <string>

#include "comm/mpi_comm.h"
#include "engine/executor.h"
#include "proto/wire.h"
#include "worker/control.h"
#include "worker/coordinator_link.h"
#include "worker/options.h"

namespace mprefill::worker {

// What a job needs from the group (the service owns all of it).
struct GroupContext {
  const WorkerOptions* opt = nullptr;
  comm::WorldInfo wi;
  DistTopology topo;  // tp x sp == wi.size
  Control* ctl = nullptr;
  Executor* exec = nullptr;
  const v1::KvContract* contract = nullptr;
  std::string secret;
  CoordinatorLink* link = nullptr;  // rank 0: the coordinator; null on the other ranks
  bool root() const { return wi.rank == 0; }
};

void run_job(const GroupContext& g, const v1::Assignment& job);

}  // namespace mprefill::worker
