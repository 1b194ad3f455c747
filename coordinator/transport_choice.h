// Which KV transport a (worker group, decoder) pair uses for a job (issue 15): the one
// place the coordinator decides it. Pure functions of what the peers registered, so the
// rules are tested without a service (tests/cpu/coordinator_transport_test.cc).
//
//   requested   chosen
//   "" / "tcp"  tcp (every peer serves it)
//   "nccl"      nccl when both serve it
//   "ipc"       ipc when both serve it and run on one host (every rank of the group reports
//               the decoder's host_id: hostname + kernel boot id, kv/kv_ipc.h)
//   "auto"      ipc when the pair could take it, else tcp
// A pair that cannot take the request gets "" and the reason. What is chosen here is final:
// a transport that then cannot be set up (cudaIpcOpenMemHandle refused, a decoder GPU
// without room) fails the job with its reason; the job result names the transport used.
#pragma once
#include <string>
#include <vector>

#include "proto/wire.h"

namespace mprefill::coord {

namespace v1 = ::mprefill::v1;

// The transports a client may request (JobOptions.kv_transport); "" means tcp.
bool known_kv_request(const std::string& requested);
// The transports a peer may register.
bool known_kv_transport(const std::string& transport);

struct KvPeerSite {
  std::vector<std::string> transports;  // as registered ("tcp" at least)
  std::vector<std::string> host_ids;    // group: one per rank; decoder: one ("" unknown)
};
KvPeerSite site_of(const v1::WorkerRegister& group);
KvPeerSite site_of(const v1::DecoderRegister& decoder);

// True when every host id of both sides is known and the same.
bool same_host(const KvPeerSite& group, const KvPeerSite& decoder);

struct KvTransportChoice {
  std::string transport;  // "" when the pair cannot serve the request
  std::string why;        // why not (or, for "auto" falling back to tcp, why not ipc)
};
KvTransportChoice choose_kv_transport(const std::string& requested, const KvPeerSite& group,
                                      const KvPeerSite& decoder);

}  // namespace mprefill::coord
