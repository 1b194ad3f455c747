// The mprefill coordinator: one Boost.Asio io_context run by a small thread pool; every
// connection is a session on its own strand (reads, writes), the service state (jobs,
// worker groups, decoders, metrics) sits behind one mutex whose critical sections never
// block on I/O (sends are queued onto the sessions' strands) and do no work that grows
// with client input: size caps are checked first, text is tokenized and sparse configs are
// read and parsed before the mutex is taken (intake.cc).
//
// Job states: QUEUED -> RUNNING (Expect sent to the decoder, then Assignment to the group
// once the decoder is Ready) -> HANDING_OFF (WorkerDone: prefill finished, StartDecode
// sent) -> DECODING (DecodeStarted: the KV is complete on the decoder) -> DONE
// (DecodeDone, JobResult to the client) / FAILED / CANCELLED.
#pragma once
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>

#include "proto/wire.h"

namespace mprefill::coord {

struct CoordinatorOptions {
  std::string host = "127.0.0.1";  // bind address of the service port
  // TLS (Boost.Asio SSL, TLS 1.3) on the service and metrics ports: PEM certificate chain
  // and private key. Beyond loopback TLS and `secret` are required unless `insecure`
  // (a warning at start, mprefill_insecure 1 in /metrics).
  std::string tls_cert, tls_key;
  bool insecure = false;
  uint16_t port = 0;      // 0: any free port (see Coordinator::port())
  int metrics_port = -1;  // -1: no metrics server; 0: any free port
  // Infrastructure secret (--secret-file): worker groups and decoders prove it; so do
  // clients when there are no client keys. Empty: no auth (loopback use only).
  std::string secret;
  // Client keys (client_keys.h, --client-keys): one per client, with a name; needs
  // `secret`. Clients then see and cancel only their own jobs (admin keys: all).
  std::string client_keys;
  int client_max_jobs = 16;                    // unfinished jobs of one client key at most
  int64_t client_max_queued_tokens = 1 << 22;  // prompt tokens of one key's queued jobs
  std::string tokenizer;   // llama2.c tokenizer.bin for text prompts and result text
  int64_t max_prompt = 0;  // prompt limit; 0: the model's max_position only
  // Sparse configs chosen by name: DIR/NAME.json (sparse_source.h); empty: only the
  // built-ins and configs sent inline. Clients never name a path.
  std::string config_dir;
  // Checked before any other work on a SubmitJob (one INVALID_ARGUMENT naming the limit):
  // Text prompt bytes, before tokenizing (model/tokenizer on the 2-core CI machine: 0.6 s
  // for 512 KiB of English, 19 s for 3 MiB).
  size_t max_prompt_bytes = size_t{1} << 20;
  size_t max_config_bytes = size_t{4} << 20;  // inline sparse_config, and files of config_dir
  size_t max_tag_bytes = 1024;                // client_tag bytes
  // Threads that tokenize text prompts and read / parse sparse configs: off the io threads
  // and the service lock (a connection reads nothing more until its job is prepared).
  int prep_threads = 2;
  int queue_limit = 64;              // queued jobs at most; more are refused
  int max_jobs_per_client = 16;      // unfinished jobs of one client connection at most
  int threads = 2;                   // io_context threads
  int heartbeat_ms = 1000;           // groups and decoders send a Heartbeat this often
  int heartbeat_timeout_ms = 10000;  // silent longer: dead, its jobs fail
  int ready_timeout_ms = 30000;      // decoder's Ready after Expect
  int handoff_timeout_ms = 60000;    // sent to groups and decoders: bound on each KV wait
  int decode_timeout_ms = 600000;    // DecodeDone after StartDecode
  int cancel_grace_ms = 30000;       // a group that does not end a cancelled job is freed
  // Connections that have not finished their hello: their own pool of at most
  // max_pre_hello (the oldest is closed for a new one), each closed after
  // hello_timeout_ms; they never count against max_connections.
  int hello_timeout_ms = 3000;
  int max_pre_hello = 512;
  // A frame begun after the hello must be complete within this (a peer that starts a
  // frame and stalls is closed with an Error).
  int frame_timeout_ms = 30000;
  size_t max_frame = wire::kDefaultMaxFrame;  // larger frames: Error BAD_FRAME + close
  // A client's frames after the hello (at most max_frame): a SubmitJob of 1M token ids
  // (<= 3 bytes each below 2^21) with an inline config of max_config_bytes fits; a larger
  // frame is refused at its length prefix, before any byte of it is held.
  size_t max_client_frame = size_t{8} << 20;
  // Bytes of large client frames (> kSmallFrame) held at once, all connections together
  // (>= twice the client frame limit): a client's large frame is read only once twice its
  // length is granted (its bytes, then the parsed message until it is handled); until then
  // it waits (bounded by frame_timeout_ms).
  size_t max_large_frame_bytes = size_t{16} << 20;
  size_t client_frame_limit() const { return std::min(max_client_frame, max_frame); }
  // Authenticated connections at most (all roles); one more hello gets Error
  // RESOURCE_EXHAUSTED + close.
  int max_connections = 256;
  int keep_finished = 1000;  // finished jobs kept for status queries
  bool log = true;           // one line per event on stderr
};

class Coordinator {
 public:
  // Binds the ports (throws std::runtime_error naming the address on failure).
  explicit Coordinator(CoordinatorOptions opt);
  ~Coordinator();  // stop()
  Coordinator(const Coordinator&) = delete;
  Coordinator& operator=(const Coordinator&) = delete;

  void start();  // runs the io_context threads
  void stop();   // closes every connection, joins the threads; idempotent
  uint16_t port() const;
  uint16_t metrics_port() const;  // 0 when there is no metrics server
  std::string metrics_text();     // what GET /metrics returns
  // Re-reads --client-keys now (SIGHUP); connections of removed or changed keys close.
  void reload_client_keys();

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace mprefill::coord
