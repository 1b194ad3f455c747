// KV transport "nccl", decoder side: the PagePayloadSource of one worker rank's KV stream.
// The rank's KvStreamHello carries an ncclUniqueId; the source joins that 2-rank
// communicator as rank 1 on its GPU (ncclCommInitRankConfig, non-blocking, bounded). For
// each page header read from the TCP stream it posts ncclRecv of the page's K and V and of
// the sender's device checksum (kv/cuda/nccl_kv_common.h) into device buffers, computes the
// checksum of what arrived on the device, copies K and V to host (the paged store is host
// memory) and compares. Every wait polls ncclCommGetAsyncError against the stream's
// timeout and aborts the communicator when it passes. CUDA builds with NCCL only.
#pragma once
#include <memory>

#include "kv/kv_receiver.h"

namespace mprefill::kv {

// A factory for ReceiverOptions::nccl: sources on CUDA device `device`. Throws
// std::runtime_error when the device cannot be used.
PayloadSourceFactory make_nccl_payload_factory(int device);

}  // namespace mprefill::kv
