// The one-rank group: the Communicator of a process that runs the distributed engine alone
// (tp 1 x sp 1, no MPI). Collectives over one rank copy send to recv; there is no peer to
// send to or receive from, so send / recv fail with kInvalidArgument.
#pragma once
#include <memory>

#include "comm/communicator.h"

namespace mprefill::comm {

std::unique_ptr<Communicator> make_self_communicator();

}  // namespace mprefill::comm
