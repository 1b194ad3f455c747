// KV transport "nccl", worker side: a KvSink that hands each layer's device KV slice to a
// GPU decoder by ncclSend, straight from the slice (no host staging).
//
// Setup (constructor): one TCP connection to the decoder's KV port (hello +
// KvStreamHello, as the TCP handoff) whose KvStreamHello carries a fresh ncclUniqueId; the
// worker rank is rank 0 and the decoder rank 1 of a 2-rank non-blocking communicator
// (ncclCommInitRankConfig polled against timeout_ms; a decoder that refuses the stream
// ends the wait at once).
// put(): cuts the slice into pages (kv/kv_store.h cut_pages), computes each page's
// device checksum (kv/cuda/nccl_kv_common.h) on the slice's stream, sends each page
// header over TCP (KvPage with empty k / v; dtype is the slice's, bf16) and enqueues
// ncclSend of the page's K, V and checksum on the slice's stream, then returns. Being
// stream-ordered, the engine's later writes to its slice buffers wait for the sends.
// The decoder acks each layer on the TCP connection (LayerAck); a reader thread collects
// the acks and fails the handoff — aborting the communicator, which ends the pending
// sends on the engine's stream — when a layer is not acked within timeout_ms of its put,
// when the decoder refuses the stream or fails the job, or the connection drops.
// CUDA builds with NCCL only (MPREFILL_HAVE_NCCL).
#pragma once
#include <memory>

#include "kv/kv_handoff.h"
#include "kv/kv_sink.h"

namespace mprefill::gpu {

class NcclKvSink : public KvSink {
 public:
  // opt as for TcpKvHandoff (streams unused: one connection carries the headers);
  // device: this rank's CUDA device. Throws std::runtime_error naming the decoder.
  NcclKvSink(KvHandoffOptions opt, int device);
  ~NcclKvSink() override;
  NcclKvSink(const NcclKvSink&) = delete;
  NcclKvSink& operator=(const NcclKvSink&) = delete;

  void put(const KvSlice& slice) override;
  bool takes_device_slices() const override { return true; }
  // Waits (bounded) for every layer's ack, checks all layers were put, closes the
  // connection and the communicator. Throws on failure.
  void finish() override;

  bool failed() const;
  std::string error() const;
  // bytes: K + V payload; send_ms: the time the NCCL sends occupied the engine's stream
  // (CUDA events around each layer's sends, waiting for the decoder's receives included);
  // handoff_ms / tail_ms as for TCP.
  KvHandoffStats stats() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace mprefill::gpu
