// KV transport "ipc", worker side (docs/kv_ipc.md): a KvSink that copies each layer's device
// KV slice device-to-device into the decoder's region on the same host (the same GPU or a
// peer GPU), over CUDA IPC.
//
// Setup (constructor): one TCP connection to the decoder's KV port (hello, then
// KvStreamHello with transport "ipc" and a KvIpcSetup naming this host); the decoder answers
// with a KvIpcOffer (its region's memory handle, two event handles, the layout) or refuses
// (another host, no room on its GPU). The sink checks the offer against the contract, opens
// the handles (cudaIpcOpenMemHandle: the proof that both processes can share the memory; its
// failure fails the setup with the CUDA error).
// put(): stream-ordered on the slice's stream, nothing waits on the host except the
// back-pressure: layer L waits (bounded) until the decoder acked layer L - 2, so at most two
// layers are in flight. Then: the device checksum of each page into a local buffer
// (kv/cuda/page_sums.h), the K / V rows of each token range into the region (one
// cudaMemcpyAsync per range and tensor when the slice holds every KV head, a 2-D copy per
// contiguous head run otherwise), the checksums into the region's table, the layer's
// interprocess event recorded (event L % 2), then the page headers on the TCP connection
// (empty k / v, sum_slot). The engine's later writes to the slice wait for the copies (same
// stream). The decoder acks the layer once its checksums match.
// CUDA builds (no NCCL needed).
#pragma once
#include <memory>

#include "kv/kv_handoff.h"
#include "kv/kv_sink.h"

namespace mprefill::gpu {

class IpcKvSink : public KvSink {
 public:
  // opt as for TcpKvHandoff (streams unused); device: this rank's CUDA device. Throws
  // std::runtime_error naming the decoder on failure.
  IpcKvSink(KvHandoffOptions opt, int device);
  ~IpcKvSink() override;
  IpcKvSink(const IpcKvSink&) = delete;
  IpcKvSink& operator=(const IpcKvSink&) = delete;

  void put(const KvSlice& slice) override;
  bool takes_device_slices() const override { return true; }
  // Waits (bounded) for every layer's ack, closes the connection and the IPC handles.
  void finish() override;

  bool failed() const;
  std::string error() const;
  // bytes: K + V payload; send_ms: the time the copies occupied the slice's stream (CUDA
  // events around each layer's checksums and copies); handoff_ms / tail_ms as for TCP.
  KvHandoffStats stats() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace mprefill::gpu
