// Options of one worker group (mprefill-worker's flags, parsed in tools/): the same on
// every rank of the mpirun group.
#pragma once
#include <string>

#include "kv/kv_handoff.h"

namespace mprefill::worker {

struct WorkerOptions {
  std::string coordinator;     // HOST:PORT; rank 0 connects and registers the group
  std::string model;           // load_model() naming; the decoder loads the same weights
  std::string device = "cpu";  // the executor's backend: "cpu" | "cuda"
  std::string group;           // group name; empty: worker-HOSTNAME-PID
  std::string secret_file;     // shared secret of the coordinator and decoder hellos
  std::string tls_ca;          // PEM CAs verifying TLS peers (tls:// coordinator, TLS decoders)
  int tp = 1;                  // tensor-parallel ranks (divides the ranks and the KV heads)
  int streams = 1;             // TCP streams per rank to the decoder
  int page_tokens = kDefaultPageTokens;  // tokens per KV page (the decoder must agree)
  int comm_timeout_ms = 120000;          // bound of every MPI wait
  int handoff_timeout_ms = 30000;        // decoder waits when the Assignment gives none
  int connect_timeout_ms = 10000;        // connecting to the coordinator
  int reconnect_s = 60;                  // a lost coordinator: re-register for this long
};

}  // namespace mprefill::worker
