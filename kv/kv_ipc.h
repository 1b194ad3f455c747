// Transport "ipc" (same-host GPU -> GPU over CUDA IPC; docs/kv_ipc.md), the parts both ends
// and the coordinator's negotiation share without CUDA: who is on which host, and the byte
// layout of a job's KV region on the decoder's GPU. The CUDA ends are
// kv/cuda/ipc_kv_sink.h (worker) and kv/cuda/ipc_kv_receiver.h (decoder).
//
// Region of a job (one cudaMalloc on the decoder's GPU, exported with cudaIpcGetMemHandle):
//   [layer][K | V][n_tokens][n_kv_heads][head_dim] of the contract's dtype (the KvCache row
//   layout, so a decoder reads a layer in place), then the senders' page checksums
//   [layer][sender][sum_slots][K, V] u32. Every offset is a multiple of 256 bytes.
#pragma once
#include <cstdint>
#include <string>

#include "kv/kv_store.h"
#include "proto/wire.h"

namespace mprefill::kv {

namespace v1 = ::mprefill::v1;

// "HOSTNAME/BOOT_ID" (/proc/sys/kernel/random/boot_id; "HOSTNAME/" where it cannot be
// read). Two processes with the same value run on one booted kernel under one host name:
// the coordinator pairs them for "ipc". The proof that they can share device memory is
// the worker's cudaIpcOpenMemHandle of the decoder's region; a failure there fails the job
// with the CUDA error (never a silent fallback to another transport).
std::string host_identity();

// Page checksum slots per (layer, sender): a sender whose token ranges cut into more pages
// of one layer fails with the numbers. Pages of one sender and layer are disjoint and each
// lies in one page block, so ceil(n / P) + (ranges - 1) <= this for up to 64 ranges.
constexpr int kIpcExtraSumSlots = 64;

struct IpcRegionLayout {
  int64_t n_tokens = 0;
  int n_layers = 0, n_kv_heads = 0, head_dim = 0, elem_bytes = 0, senders = 0, sum_slots = 0;
  uint64_t layer_stride = 0;  // bytes of one layer (K and V)
  uint64_t v_offset = 0;      // V of a layer, from its K
  uint64_t sums_offset = 0;   // the checksum table
  uint64_t region_bytes = 0;  // everything

  // Throws std::invalid_argument on a bad shape or senders < 1.
  static IpcRegionLayout make(const KvStoreShape& shape, int64_t n_tokens, int senders);
  uint64_t kv_bytes() const { return uint64_t(n_layers) * layer_stride; }
  uint64_t row_bytes() const { return uint64_t(n_kv_heads) * head_dim * elem_bytes; }
  // Byte offset of K (v = false) or V of (layer, token, kv head).
  uint64_t kv_offset(int layer, bool v, int64_t token, int head) const {
    return uint64_t(layer) * layer_stride + (v ? v_offset : 0) + uint64_t(token) * row_bytes() +
           uint64_t(head) * head_dim * elem_bytes;
  }
  uint64_t sum_offset(int layer, int sender, int slot) const {
    return sums_offset + ((uint64_t(layer) * senders + sender) * sum_slots + slot) * 8;
  }
  void to_offer(v1::KvIpcOffer* o) const;
  // The layout an offer describes; "" or why it is not one (inconsistent offsets, a
  // region too small for them, a shape other than the contract's).
  static std::string from_offer(const v1::KvIpcOffer& o, const v1::KvContract& contract,
                                IpcRegionLayout* out);
};

// "" when a worker's KvIpcSetup may use this decoder's GPU over IPC, else why not (one line):
// unparsable setup bytes, or another host.
std::string ipc_setup_refusal(const std::string& setup_bytes, const std::string& decoder_host_id);

}  // namespace mprefill::kv
