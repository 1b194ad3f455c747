// KV transports: how a job's KV pages travel from the worker ranks to the decoder, and the
// one factory that picks them (the only place that knows which transports a build has).
//
// Every transport shares one control plane: TCP connections from each worker rank to the
// decoder's KV port (hello, KvStreamHello with the KV contract, the transport's name and its
// setup bytes; KvPageHeader of every page; LayerAck of every layer). They differ in where the
// K/V bytes of a page travel:
//   "tcp"   inside the KvPage frames on the same connections (kv/kv_handoff.h: several
//           streams per rank, large frames from reusable staging buffers)
//   "nccl"  ncclSend / ncclRecv of a 2-rank communicator whose id rides in the KvStreamHello
//           (kv/cuda/nccl_kv_sink.h, kv/cuda/nccl_kv_receiver.h; CUDA builds with NCCL)
//   "ipc"   device-to-device copies into the decoder's GPU memory on the same host, exported
//           by CUDA IPC (kv/cuda/ipc_kv_sink.h, kv/cuda/ipc_kv_receiver.h, docs/kv_ipc.md;
//           CUDA builds); the decoder keeps the job's KV there (kv_receiver.h DeviceJobKv)
// A later transport (RDMA through NIXL / UCX / Mooncake Transfer Engine) adds a
// KvSender on the worker side (headers on the control stream, bytes by its own engine) and a
// PagePayloadSource on the decoder side (kv/kv_receiver.h; its setup bytes, e.g. an IPC
// handle or an RDMA memory key, come in KvStreamHello.transport_setup), and one line in each
// factory below. The library to plug in there: NIXL (one agent API over UCX for RDMA and
// same-host CUDA IPC, and GDS; registered memory + descriptor lists fit "headers on the
// control stream, bytes by the engine"); Mooncake Transfer Engine is the alternative of the
// same shape. The page format is docs/kv_page_format.md.
//
// No silent fallback: a transport that this build or this executor cannot serve, or that
// cannot be set up (connect, NCCL init, ...), throws one line naming the transport and the
// reason; the worker fails the job with it.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kv/kv_handoff.h"
#include "kv/kv_receiver.h"
#include "kv/kv_sink.h"

namespace mprefill::kv {

// Worker side of a transport: the KvSink an executor rank writes its layers to. Errors are
// recorded (failed(), error()) and finish() throws them; with KvHandoffOptions::defer_errors
// put() never throws, so a collective executor stays in step with its peers.
class KvSender : public KvSink {
 public:
  virtual const std::string& transport() const = 0;  // "tcp", "nccl", ...
  virtual bool failed() const = 0;
  virtual std::string error() const = 0;
  virtual KvHandoffStats stats() const = 0;
};

// What a worker rank's executor offers a transport.
struct SenderSite {
  int device = -1;         // CUDA device of the rank (-1: a CPU executor)
  bool device_kv = false;  // the executor can hand device slices to a GPU peer (nccl_kv cap;
                           // "ipc" needs only device >= 0: each rank copies on its own)
};

// The transports a rank at `site` serves, in preference order ("tcp" always).
std::vector<std::string> sender_transports(const SenderSite& site);
// "" when `transport` ("" means "tcp") is served at `site`, else why not (one line).
std::string sender_refusal(const std::string& transport, const SenderSite& site);
// Connects the transport's streams to the decoder in opt (opt.streams TCP streams for
// "tcp"). Throws std::runtime_error "KV transport 'T' cannot be set up: REASON".
std::unique_ptr<KvSender> make_sender(const std::string& transport, KvHandoffOptions opt,
                                      const SenderSite& site);

// Decoder side: the payload sources by transport name for a decoder whose KV arrives on
// CUDA device `device` (-1: host only; then only "tcp", which needs no source). Throws
// std::runtime_error when the device asks for a transport this build lacks.
std::map<std::string, PayloadSourceFactory> receiver_payloads(int device);
// The names a decoder registers: "tcp" and the keys of `payloads`.
std::vector<std::string> receiver_transports(
    const std::map<std::string, PayloadSourceFactory>& payloads);

}  // namespace mprefill::kv
