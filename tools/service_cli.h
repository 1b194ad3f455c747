// The service commands of the `mprefill` binary (issue 6):
//   mprefill submit --coordinator HOST:PORT ...   submit a job, follow it, print the result
//   mprefill status --coordinator HOST:PORT ...   jobs, worker groups, decoders
//   mprefill cancel --coordinator HOST:PORT --job ID
//   mprefill run --ranks R --tp T ...             one shot: coordinator + mpirun workers +
//                                                 decoder, submit, print, shut down
#pragma once
#include <string>

namespace mprefill::cli {

// One usage line per command, for `mprefill --help`.
extern const char* const kServiceCommandsUsage;

bool is_service_command(const std::string& cmd);

// argv: the arguments after the command name. Returns the exit status (0 ok, 1 runtime
// error or a failed / cancelled job, 2 usage error, 130 interrupted); prints its own
// one-line errors ("mprefill: error: ...").
int service_main(const std::string& cmd, int argc, char** argv);

}  // namespace mprefill::cli
