// KV handoff, worker side, transport "tcp" (kv/kv_transport.h): a KvSink that pushes each
// layer's KV pages over TCP to the decoder named in the job's Assignment, overlapped with
// the next layer's compute.
//
// put() cuts the slice into pages (kv/kv_store.h cut_pages: page-aligned global blocks,
// never two ranges in a page), checksums them (crc32c of k then v) and frames each as one
// KvPage straight from the slice memory (its one copy: the executor may reuse the slice once
// put() returns) into reusable staging buffers of staging_bytes each, allocated once per
// handoff: many page frames back to back, sent with one write per buffer ("large frames").
// A full buffer goes to a FIFO that the sender threads (one per TCP stream) drain in order,
// so the pages of layer L are handed out before those of L + 1 (per-layer ordering); a
// buffer holds the pages of one layer only. Back-pressure: the buffers are the only memory
// (staging_buffers x staging_bytes, or one page frame where a page is larger); put() waits
// (bounded) for a free one. A reader thread per stream collects the decoder's LayerAck.
// Every wait is bounded by timeout_ms: a free buffer, a send, and the ack of each layer
// (counted from the moment its last page was sent). A decoder that is gone, refuses the
// stream, or is too slow fails the handoff with one line naming the decoder, the job, the
// rank and the layer.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "kv/kv_sink.h"
#include "model/fingerprint.h"
#include "proto/wire.h"

namespace mprefill {

namespace v1 = ::mprefill::v1;

constexpr int kDefaultPageTokens = 256;
constexpr const char* kKvLayout = "token-major";

// The KV contract of a model: fingerprint, the model's KV dtype (fp.kv_dtype, decided by
// model_kv_dtype: bf16 for bf16 checkpoints, else fp32), token-major pages of page_tokens.
v1::KvContract make_kv_contract(const ModelFingerprint& fp, int page_tokens = kDefaultPageTokens);
// Empty when a and b describe the same KV stream; else one line naming the first
// difference ("weights digest 1a2b... vs 3c4d...").
std::string kv_contract_mismatch(const v1::KvContract& a, const v1::KvContract& b);

DType from_proto(v1::DType t);  // throws std::invalid_argument on DTYPE_UNSPECIFIED
v1::DType to_proto(DType t);

struct KvHandoffOptions {
  uint64_t job_id = 0;
  int rank = 0;      // sender rank in the worker group (KvPageHeader.sender_rank)
  std::string host;  // decoder KV endpoint
  uint16_t port = 0;
  std::string secret;  // service shared secret (empty: none)
  // TLS to the decoder's KV port (DecoderEndpoint.tls; ca_file: the worker's --tls-ca).
  wire::TlsClientOptions tls;
  std::string name = "mprefill-worker";  // ClientHello name
  v1::KvContract contract;  // sent in KvStreamHello; page_tokens and kv_dtype cut pages
  int timeout_ms = 30000;   // connect, each send, each queue wait, each layer's ack
  int streams = 1;          // TCP connections to the decoder (pages spread over them)
  // Staging of the TCP sender: buffers of staging_bytes (page frames back to back; a page
  // larger than that gets a buffer of its own size), staging_buffers of them (0: 2 per
  // stream + 2). 4 MiB: large enough that a write per buffer costs nothing measurable,
  // small enough that 2 x streams of them stay in the L2/L3 working set (bench/NOTES.md
  // §10.2 has the page-size and stream curves).
  size_t staging_bytes = size_t{4} << 20;
  int staging_buffers = 0;
  // true: put() records a failure and drops later layers instead of throwing, so a
  // collective executor (DistEngine) finishes the layer loop in step with its peers;
  // finish() throws the recorded failure.
  bool defer_errors = false;
};

struct KvHandoffStats {
  uint64_t bytes = 0;  // K + V payload bytes sent
  int64_t pages = 0;
  int layers_put = 0, layers_acked = 0;
  double handoff_ms = 0;  // first put() -> last ack (0 before finish()), overlapped
                          // with the executor's compute
  double send_ms = 0;     // busy time of the busiest stream: sum of its frame sends
                          // (bytes / send_ms is the rate the transport sustained)
  double tail_ms = 0;     // last put() -> last ack: the part not hidden by compute
  double copy_ms = 0;     // time spent in put() cutting, checksumming, framing
  double wait_ms = 0;     // time put() blocked on a full queue
  // Steady-clock times (ms since its epoch, comparable within the process; 0 before
  // finish()): the last put() was called (the executor's last layer is done: end of
  // prefill on this rank) and the last layer's ack arrived (KV ready).
  double last_put_ms = 0, kv_ready_ms = 0;
};

class TcpKvHandoff : public KvSink {
 public:
  // Connects every stream (hello + KvStreamHello) within timeout_ms; throws
  // std::runtime_error naming the decoder on failure.
  explicit TcpKvHandoff(KvHandoffOptions opt);
  ~TcpKvHandoff() override;

  void put(const KvSlice& slice) override;
  // Waits (bounded) until the decoder acked every layer put, checks that all
  // contract.model.n_layers layers were put, closes the streams. Throws on failure.
  void finish() override;

  bool failed() const;
  std::string error() const;  // the first failure, "" if none
  KvHandoffStats stats() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// One KvPage frame (encode_frame layout: length, Envelope{version, kv_page}) written
// straight from the page's K and V bytes (one copy instead of three through protobuf
// objects). Parses as the Envelope a protobuf-built KvPage would give.
std::string encode_kv_page_frame(const v1::KvPageHeader& header, const void* k, const void* v,
                                 size_t bytes_each);
// The same frame written at dst (kv_page_frame_size bytes, returned) from the serialized
// header: how the TCP sender fills its staging buffers.
size_t kv_page_frame_size(size_t header_bytes, size_t bytes_each);
size_t write_kv_page_frame(char* dst, const std::string& header, const void* k, const void* v,
                           size_t bytes_each);

}  // namespace mprefill
