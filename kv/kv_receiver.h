// KV transport, receiving end (the decode tier's KV port): accepts worker streams (hello +
// KvStreamHello with the KV contract), stores their pages (JobKvStore: checksums,
// geometry, overlap), sends LayerAck to every stream of a job once a layer is complete,
// and fails a job whose pages stop arriving for its timeout, whose stream closes early,
// or that sends a bad page (memory released, streams told). The sending end is
// kv/kv_handoff.h (TCP) and kv/cuda/nccl_kv_sink.h (page headers over TCP, payload over
// NCCL: a PagePayloadSource here).
#pragma once
#include <atomic>
#include <chrono>
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

#include "kv/kv_page_frame.h"
#include "kv/kv_store.h"
#include "proto/line_limiter.h"
#include "proto/wire.h"

namespace mprefill::kv {

namespace v1 = ::mprefill::v1;

// The DecodeFailed envelope of a job (sent to the coordinator and to the job's streams).
v1::Envelope decode_failed_envelope(uint64_t job, const std::string& msg);

// A job's KV held on a GPU by the transport that wrote it there ("ipc": the region the
// worker ranks copy into, kv/cuda/ipc_kv_receiver.h): the decoder's store of that job, in
// the contract's dtype, bytes as the workers computed them. Shared by the job's streams.
class DeviceJobKv {
 public:
  virtual ~DeviceJobKv() = default;
  virtual int device() const = 0;
  virtual uint64_t device_bytes() const = 0;  // held on the device for this job
  // Checks every page of a complete layer (device checksums of what landed against the
  // senders'); throws std::runtime_error naming the first bad page. Bounded by timeout_ms.
  virtual void verify_layer(int layer, int timeout_ms) = 0;
  // Device K / V of a layer, each [n_tokens][n_kv_heads][head_dim] (KvCache rows).
  virtual const void* k(int layer) const = 0;
  virtual const void* v(int layer) const = 0;
  // Copies a layer to host memory (each [n_tokens][kv_dim] of the contract's dtype).
  virtual void export_layer(int layer, void* k_host, void* v_host) const = 0;
};

// What a payload source knows of its stream's job. `device` is the job's one slot for a
// DeviceJobKv: the first in-place stream of the job fills it (under its mutex), the others
// share it.
struct JobDeviceSlot {
  std::mutex mu;
  std::shared_ptr<DeviceJobKv> kv;
};
struct PayloadJob {
  uint64_t job_id = 0;
  int64_t n_tokens = 0;
  int senders = 1;
  KvStoreShape shape;
  std::shared_ptr<JobDeviceSlot> device;
};

// The K/V bytes of pages whose headers arrive on a KV stream while their payload travels
// another way (kv_transport "nccl": kv/cuda/nccl_kv_receiver.h; "ipc":
// kv/cuda/ipc_kv_receiver.h). One per stream, used from that stream's thread only.
class PagePayloadSource {
 public:
  virtual ~PagePayloadSource() = default;
  // A frame to send the worker once the source is set up ("ipc": the KvIpcOffer);
  // false: none.
  virtual bool setup_reply(v1::Envelope* env) {
    (void)env;
    return false;
  }
  // false (nccl): fetch() brings each page's bytes. true (ipc): the bytes are written in
  // place into the job's DeviceJobKv; land() waits (bounded) until the page is there and
  // queues its check (DeviceJobKv::verify_layer completes it).
  virtual bool in_place() const { return false; }
  virtual void land(const v1::KvPageHeader& h) { (void)h; }
  // Fills *k and *v with the page's bytes (size from the header's geometry and dtype),
  // checked end to end; throws std::runtime_error with context (transport failure,
  // checksum mismatch, a wait past its bound).
  virtual void fetch(const v1::KvPageHeader& h, std::string* k, std::string* v) {
    (void)h, (void)k, (void)v;
  }
};
// Makes the source of a stream whose KvStreamHello names its transport (setup bytes in the
// hello: nccl_unique_id for "nccl", transport_setup for later ones) within timeout_ms.
// Throws std::runtime_error on failure.
using PayloadSourceFactory = std::function<std::unique_ptr<PagePayloadSource>(
    const v1::KvStreamHello& hello, int timeout_ms, const PayloadJob& job)>;

struct ReceiverOptions {
  std::string listen_host = "127.0.0.1";  // bind address of the KV port
  uint16_t listen_port = 0;               // 0: any free port
  std::string secret;                     // streams must prove it (empty: no auth)
  // TLS 1.3 on the KV port (PEM chain and key; both or neither). Beyond loopback TLS and
  // a secret are required unless insecure (wire::check_listen_security, as the
  // coordinator's ports).
  std::string tls_cert, tls_key;
  bool insecure = false;
  v1::KvContract contract;  // what every stream must declare
  uint64_t capacity_bytes = uint64_t{2} << 30;
  int max_jobs = 4;
  // A job that fits only once released / failed jobs' stores are gone (in-flight puts
  // still hold them for a moment) waits up to this long in expect() for them (0: refused at
  // once, as a job that would not fit even then always is).
  int admission_wait_ms = 2000;
  int default_timeout_ms = 30000;  // Expect.timeout_ms when 0
  int hello_wait_ms = 5000;        // a stream for a job not expected yet waits this long
  // Connections that have not yet said hello (ClientHello, then KvStreamHello): a silent
  // one waits in one poll() set (no thread: a flood of them costs a socket each); the
  // first bytes move it to its own thread for the hellos (a slow one delays no other). At
  // most max_prehello at once: a new connection to a full pool closes the oldest one in
  // its hello (so a flood of silent sockets cannot lock out the workers' streams; refusals
  // logged at most once a second), and each is closed when both hellos did not arrive
  // within prehello_timeout_ms.
  int max_prehello = 256;
  int prehello_timeout_ms = 2000;
  // Frame limit on the KV port after a stream's hello (before it: 64 KiB); at least one
  // full page of the contract (checked by the constructor).
  size_t max_frame = wire::kDefaultMaxFrame;
  // Transports other than "tcp" this KV port serves, by name (kv/kv_transport.h
  // receiver_payloads); a stream naming another one is refused with the reason.
  std::map<std::string, PayloadSourceFactory> payload;
};

class KvReceiver {
 public:
  // Called (from a receiver thread) when a job fails: timeout, bad page, early close.
  using FailFn = std::function<void(uint64_t job_id, const std::string& message)>;

  KvReceiver(ReceiverOptions opt, FailFn on_fail);
  ~KvReceiver();
  uint16_t port() const;
  const v1::KvContract& contract() const { return opt_.contract; }
  bool tls() const { return listener_->tls(); }
  // Listening beyond loopback without TLS or a secret (allowed by insecure): warn.
  bool insecure_open() const { return insecure_open_; }

  // Reserves the job's pages. false with *why (duplicate id, too many jobs, no room).
  // May wait up to admission_wait_ms for released jobs' reservations (never under mu_).
  bool expect(const v1::Expect& e, std::string* why);
  // Waits until every layer arrived (true) or the job failed / was released (false,
  // *why). Bounded: a job whose pages stop for its timeout fails.
  bool wait_complete(uint64_t job_id, std::string* why);
  // The complete store of a job (nullptr when unknown or failed).
  std::shared_ptr<JobKvStore> store(uint64_t job_id);
  // The job's KV on the device when an in-place transport ("ipc") wrote it there (then the
  // store holds the page bookkeeping only); nullptr otherwise.
  std::shared_ptr<DeviceJobKv> device_kv(uint64_t job_id);
  // Drops a job: memory released, its streams closed. Unknown ids are ignored.
  void release(uint64_t job_id);
  // Fails a job (as if a stream had failed it), telling its streams.
  void fail_job(uint64_t job_id, const std::string& message);
  // Releases every job (a coordinator connection lost: its job ids mean nothing now).
  void release_all();

  struct JobInfo {
    bool known = false, complete = false, failed = false;
    int layers_complete = 0, streams = 0;
    uint64_t bytes = 0;
    uint64_t device_bytes = 0;  // the job's DeviceJobKv (0: host store)
    double receive_ms = 0;      // first page -> last layer complete
    std::string error;
    bool sender_failed = false;  // a stream ended early, a rank gave up, or no page came
  };
  JobInfo info(uint64_t job_id) const;
  uint64_t reserved_bytes() const { return pool_->reserved_bytes(); }

 private:
  struct Stream;
  struct Job;
  ReceiverOptions opt_;
  FailFn on_fail_;
  KvStoreShape shape_;
  std::unique_ptr<PagePool> pool_;
  std::unique_ptr<wire::Listener> listener_;
  bool insecure_open_ = false;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, std::shared_ptr<Job>> jobs_;
  std::vector<std::shared_ptr<Stream>> streams_;
  std::atomic<bool> stop_{false};
  std::thread accept_thread_, monitor_thread_, hello_thread_;
  std::atomic<int> prehello_{0};  // connections in their hello (waiting or on a thread)
  // Silent connections in their hello, oldest first (accept_loop adds, hello_loop takes).
  std::mutex wait_mu_;
  std::deque<std::shared_ptr<Stream>> waiting_;
  wire::LineLimiter refusal_log_;  // refusal lines: at most one a second

  void log_refusal(const std::string& line);

  void accept_loop();
  // Closes the oldest connection still in its hello; false when none can be (see accept_loop).
  bool evict_oldest_prehello();
  // Waits (poll) for the first bytes of the silent connections; moves a connection that
  // spoke to its own thread (serve_stream), closes one past its hello deadline.
  void hello_loop();
  void start_stream(std::shared_ptr<Stream> s);
  void monitor_loop();
  void serve_stream(std::shared_ptr<Stream> s);
  // serve_stream's steps: the hellos (false: refused or gone), the job the stream joins
  // (null: refused), a transport's payload source other than tcp's (null: the job failed
  // and the stream was refused), then the pages until the sender closes.
  void refuse_stream(Stream& s, v1::ErrorCode code, const std::string& msg);
  bool stream_hellos(Stream& s, v1::KvStreamHello* hello);
  std::shared_ptr<Job> join_job(const std::shared_ptr<Stream>& s, const v1::KvStreamHello& hello,
                                std::vector<int>* complete_layers);
  std::unique_ptr<PagePayloadSource> open_payload(Stream& s, const std::shared_ptr<Job>& job,
                                                  const v1::KvStreamHello& hello,
                                                  const std::string& transport);
  void read_pages(Stream& s, const std::shared_ptr<Job>& job, const std::string& transport,
                  PagePayloadSource* payload);
  bool job_failed(const std::shared_ptr<Job>& job) const;
  std::shared_ptr<DeviceJobKv> release_device(const std::shared_ptr<Job>& job);
  // in_place: the bytes are in the job's DeviceJobKv (page.k / v empty).
  void handle_page(Stream& s, const std::shared_ptr<Job>& job, const KvPageView& page,
                   bool bf16_ok = false, bool in_place = false);
  // sender: the failure is the KV senders' (JobInfo::sender_failed).
  void fail_locked(const std::shared_ptr<Job>& job, const std::string& message,
                   std::vector<std::function<void()>>* after, bool sender = false);
};

}  // namespace mprefill::kv
