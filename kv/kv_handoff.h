// KV handoff, worker side: a KvSink that pushes each layer's KV pages over TCP to the
// decoder named in the job's Assignment, overlapped with the next layer's compute.
//
// put() cuts the slice into pages (kv/kv_store.h cut_pages: page-aligned global
// blocks, never two ranges in a page), checksums them (crc32c of k then v) and frames
// each as one KvPage straight from the slice memory (its one copy: the executor may
// reuse the slice once put() returns) into a bounded queue, and returns; sender threads
// (one per TCP stream) send the frames while the executor computes the next layer. A
// reader thread per stream collects the decoder's LayerAck. Every wait is bounded by timeout_ms: a
// full queue, a send, and the ack of each layer (counted from the moment its last page was sent). A
// decoder that is gone, refuses the stream, or is too slow fails the handoff with one line naming
// the decoder, the job, the rank and the layer.
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
  std::string secret;                    // service shared secret (empty: none)
  std::string name = "mprefill-worker";  // ClientHello name
  v1::KvContract contract;    // sent in KvStreamHello; page_tokens and kv_dtype cut pages
  int timeout_ms = 30000;     // connect, each send, each queue wait, each layer's ack
  int streams = 1;            // TCP connections to the decoder (pages spread over them)
  int max_queued_layers = 2;  // copied layers waiting to be sent before put() blocks
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

}  // namespace mprefill
