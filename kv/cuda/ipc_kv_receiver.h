// KV transport "ipc", decoder side (docs/kv_ipc.md): the job's KV region on this decoder's
// GPU and the PagePayloadSource of each worker rank's stream.
//
// The first ipc stream of a job allocates the region (kv/kv_ipc.h IpcRegionLayout: exactly
// the job's KV in the contract's dtype, plus the senders' checksum table; one cudaMalloc,
// exported with cudaIpcGetMemHandle) and keeps it as the job's DeviceJobKv; every stream
// creates two interprocess events and answers its KvStreamHello with a KvIpcOffer (memory
// handle, event handles, layout). The worker copies each layer's pages device to device into
// the region, writes their checksums into the table, records the layer's event (layer L:
// event L % 2) and only then sends the layer's page headers on the stream. For each header
// land() polls that event (bounded by the job's timeout; no GPU-side wait on another
// process) and queues the checksum of the landed page on the region's stream;
// verify_layer() compares every page of a complete layer with the sender's before the
// layer is acked. CUDA builds (no NCCL needed).
#pragma once
#include "kv/kv_receiver.h"

namespace mprefill::kv {

// The ReceiverOptions::payload entry "ipc" for a decoder whose KV lives on CUDA device
// `device`. Throws std::runtime_error when the device is not visible.
PayloadSourceFactory make_ipc_payload_factory(int device);

}  // namespace mprefill::kv
