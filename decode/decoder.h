// The reference decoder (issue 6): receives a job's KV pages from every worker rank
// through its KV port (kv::KvReceiver, kv/kv_receiver.h) into a paged store, then continues
// generation from the first token with the CPU model code.
//
//   Decoder     the coordinator side: DecoderRegister, Expect -> Ready, StartDecode ->
//               DecodeDone (or DecodeFailed), Release, heartbeats. Decoding runs on its
//               own thread: the store is copied into a KvCache of the contract's
//               dtype (bf16 for a bf16 model) layer by layer (pages released as they go) and
//               Engine::decode_step continues from the first token, so the ids equal
//               Engine::generate's for the same KV and sampler.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/engine.h"
#include "kv/kv_receiver.h"
#include "model/fingerprint.h"
#include "proto/wire.h"

namespace mprefill::decode {

namespace v1 = ::mprefill::v1;
using kv::KvReceiver;
using kv::ReceiverOptions;

struct DecoderOptions {
  std::string name = "decoder";
  std::string model_name;      // fingerprint name (model_name_from_path of the model path)
  std::string advertise_host;  // host workers connect to (default: listen host)
  ReceiverOptions receiver;    // contract is filled by the Decoder from the weights
  int page_tokens = 256;
  int heartbeat_ms = 1000;    // until DecoderRegistered says otherwise
  int io_timeout_ms = 10000;  // coordinator connect / send bound
  // DecoderRegister.kv_transports (kv/kv_transport.h receiver_transports of
  // ReceiverOptions::payload)
  std::vector<std::string> kv_transports = {"tcp"};
  // A lost coordinator: re-register (backoff 100 ms doubling to 2 s) for at most this
  // long, then give up (serve() returns 1). 0: give up at once. Jobs of the old
  // connection are dropped first (the new coordinator numbers its jobs afresh).
  int reconnect_s = 60;
};

class Decoder {
 public:
  using SendFn = std::function<void(const v1::Envelope&)>;

  // w must outlive the decoder. send: where replies to the coordinator go (serve() sets
  // its connection; tests pass their own).
  Decoder(const ModelWeights& w, DecoderOptions opt, SendFn send = {});
  ~Decoder();

  // One coordinator message: Expect -> Ready / DecodeFailed, StartDecode (queued for the
  // decode thread) -> DecodeDone / DecodeFailed, Release. Other messages are ignored.
  void handle(const v1::Envelope& env);

  // Connects to the coordinator, registers, then handles its messages and sends
  // heartbeats until stop(). A lost coordinator is re-registered with (reconnect_s).
  // Returns the exit status: 0 after stop(); 1 on a refused registration or a
  // coordinator that did not come back within reconnect_s.
  int serve(const std::string& host, uint16_t port, const std::string& secret);
  void stop();

  uint16_t kv_port() const { return receiver_->port(); }
  const v1::KvContract& contract() const { return receiver_->contract(); }
  const ModelFingerprint& fingerprint() const { return fp_; }
  KvReceiver& receiver() { return *receiver_; }

  // Decodes a complete job (the decode thread's work; public for tests). Throws
  // std::runtime_error with context.
  v1::DecodeDone decode(uint64_t job_id, const v1::StartDecode& start);

 private:
  const ModelWeights& w_;
  DecoderOptions opt_;
  ModelFingerprint fp_;
  Engine engine_;
  std::mutex send_mu_;
  SendFn send_;
  std::unique_ptr<KvReceiver> receiver_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, v1::Expect> expects_;
  std::deque<v1::StartDecode> decode_queue_;
  std::map<uint64_t, bool> cancelled_;
  std::atomic<bool> stop_{false};
  std::thread decode_thread_;

  uint64_t epoch_ = 0;  // coordinator connections so far (mu_): results of older ones are dropped
  // The connection register_with is setting up: stop() closes it, so a SIGTERM during a
  // re-registration (a coordinator that accepted but does not answer) ends it at once.
  std::mutex registering_mu_;
  wire::Connection* registering_ = nullptr;

  void emit(const v1::Envelope& env);
  void decode_loop();
  // Connect + hello + DecoderRegister within timeout_ms. nullptr with *why; *refused when
  // the coordinator answered with an Error (no point in retrying).
  std::unique_ptr<wire::Connection> register_with(const std::string& host, uint16_t port,
                                                  const std::string& secret, int timeout_ms,
                                                  std::string* why, bool* refused);
  // Drops every job of the lost coordinator (expects, queued decodes, KV in the receiver).
  void forget_jobs();
};

}  // namespace mprefill::decode
