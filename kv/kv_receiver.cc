#include "kv/kv_receiver.h"

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "kv/crc32c.h"
#include "kv/kv_handoff.h"
#include "kv/kv_page_frame.h"
#include "kv/kv_receiver_stream.h"
#include "proto/tls.h"

namespace mprefill::kv {
namespace {

v1::Envelope failed_env(uint64_t job, const std::string& msg) {
  return decode_failed_envelope(job, msg);
}

constexpr int kNotifyTimeoutMs = 2000;  // bound on telling a stream that its job failed

}  // namespace

v1::Envelope decode_failed_envelope(uint64_t job, const std::string& msg) {
  v1::Envelope env;
  env.mutable_decode_failed()->set_job_id(job);
  env.mutable_decode_failed()->set_message(msg);
  return env;
}

// ---- KvReceiver ----------------------------------------------------------------------

// Reads and drops frames until the peer closes or timeout_ms pass, then closes: the
// frames we sent last (an Error, a DecodeFailed) reach the peer instead of a reset.
void drain_and_close(wire::Connection* conn, int timeout_ms) {
  const auto end = Clock::now() + std::chrono::milliseconds(timeout_ms);
  try {
    v1::Envelope env;
    while (Clock::now() < end) conn->recv(&env, 50);
  } catch (const std::exception&) {
  }
  conn->close();
}

struct KvReceiver::Job {
  v1::Expect expect;
  int timeout_ms = 0;
  std::shared_ptr<JobKvStore> store;
  std::shared_ptr<JobDeviceSlot> device = std::make_shared<JobDeviceSlot>();
  std::vector<std::shared_ptr<Stream>> streams;
  Clock::time_point last_activity, first_page, complete_at;
  bool any_page = false, complete = false, failed = false, sender_failed = false;
  std::string error;
  uint64_t bytes = 0;
  uint64_t device_bytes = 0;  // of the DeviceJobKv while held (kept after its release)
  int layers_complete = 0;
};

// Takes the job's device KV out of its slot (under mu_); the caller drops the returned
// reference outside mu_ (freeing device memory may synchronise the device).
std::shared_ptr<DeviceJobKv> KvReceiver::release_device(const std::shared_ptr<Job>& job) {
  std::shared_ptr<DeviceJobKv> kv;
  {
    std::lock_guard<std::mutex> lock(job->device->mu);
    kv.swap(job->device->kv);
  }
  if (kv) job->device_bytes = std::max(job->device_bytes, kv->device_bytes());
  return kv;
}

KvReceiver::KvReceiver(ReceiverOptions opt, FailFn on_fail)
    : opt_(std::move(opt)), on_fail_(std::move(on_fail)) {
  const auto& m = opt_.contract.model();
  shape_.n_layers = m.n_layers();
  shape_.n_kv_heads = m.n_kv_heads();
  shape_.head_dim = m.head_dim();
  shape_.page_tokens = opt_.contract.page_tokens();
  try {
    shape_.dtype = from_proto(opt_.contract.kv_dtype());
    shape_.validate();
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(std::string("KV receiver contract: ") + e.what());
  }
  pool_ = std::make_unique<PagePool>(shape_, opt_.capacity_bytes);
  // Largest page frame: every KV head of page_tokens tokens, K and V in the contract's
  // dtype (fp32 pages too: an NCCL sender's bf16 pages are never larger), + header.
  const uint64_t page_frame = static_cast<uint64_t>(shape_.page_bytes()) + 4096;
  if (opt_.max_frame < page_frame)
    throw std::runtime_error("max frame " + std::to_string(opt_.max_frame) +
                             " bytes is smaller than one KV page frame of this model (" +
                             std::to_string(page_frame) + " bytes)");
  if (opt_.max_prehello < 1 || opt_.prehello_timeout_ms < 1)
    throw std::runtime_error("KV receiver: max_prehello and prehello_timeout_ms must be >= 1");
  if (opt_.tls_cert.empty() != opt_.tls_key.empty())
    throw std::invalid_argument("decoder: --tls-cert and --tls-key go together");
  listener_ = std::make_unique<wire::Listener>(opt_.listen_host, opt_.listen_port, opt_.max_frame);
  listener_->set_server_name("mprefill-decoder");
  if (!opt_.tls_cert.empty()) listener_->enable_tls(opt_.tls_cert, opt_.tls_key, "decoder");
  wire::ListenSecurity sec;
  sec.where = "decoder: --listen " + opt_.listen_host;
  sec.loopback = listener_->loopback();
  sec.tls = listener_->tls();
  sec.credentials = !opt_.secret.empty();
  sec.credential_flags = "--secret-file";
  sec.insecure = opt_.insecure;
  insecure_open_ = wire::check_listen_security(sec);
  accept_thread_ = std::thread([this] { accept_loop(); });
  monitor_thread_ = std::thread([this] { monitor_loop(); });
  hello_thread_ = std::thread([this] { hello_loop(); });
}

KvReceiver::~KvReceiver() {
  stop_ = true;
  cv_.notify_all();
  listener_->close();
  if (accept_thread_.joinable()) accept_thread_.join();
  if (monitor_thread_.joinable()) monitor_thread_.join();
  if (hello_thread_.joinable()) hello_thread_.join();
  {
    std::lock_guard<std::mutex> lock(wait_mu_);
    for (auto& s : waiting_) s->conn->close();
    waiting_.clear();
  }
  std::vector<std::shared_ptr<Stream>> streams;
  {
    std::lock_guard<std::mutex> lock(mu_);
    streams.swap(streams_);
  }
  for (auto& s : streams) s->conn->close();
  for (auto& s : streams)
    if (s->th.joinable()) s->th.join();
}

uint16_t KvReceiver::port() const { return listener_->port(); }

bool KvReceiver::expect(const v1::Expect& e, std::string* why) {
  auto say = [&](const std::string& m) {
    if (why) *why = "job " + std::to_string(e.job_id()) + ": " + m;
    return false;
  };
  // Under mu_: the id is new and a slot is free (checked again before inserting).
  auto admissible_locked = [&](std::string* no) {
    if (jobs_.count(e.job_id())) {
      *no = "already expected";
      return false;
    }
    int active = 0;
    for (const auto& [id, j] : jobs_) active += !j->failed;
    if (active >= opt_.max_jobs) {
      *no = "decoder holds " + std::to_string(active) + " jobs (max " +
            std::to_string(opt_.max_jobs) + ")";
      return false;
    }
    return true;
  };
  std::string no;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!admissible_locked(&no)) return say(no);
  }
  if (e.prompt_tokens() < 1) return say("prompt_tokens must be >= 1");
  // 2 x dtype bytes x kv_dim x layers per token: a count past 2^62 bytes would overflow
  // the reservation arithmetic (the capacity check below then refuses what merely is large).
  const uint64_t per_token = shape_.kv_bytes(1);
  if (static_cast<uint64_t>(e.prompt_tokens()) > (uint64_t{1} << 62) / per_token)
    return say("prompt_tokens " + std::to_string(e.prompt_tokens()) + " is absurd (" +
               std::to_string(per_token) + " KV bytes per token)");
  if (e.n_layers() != 0 && e.n_layers() != shape_.n_layers)
    return say("expects " + std::to_string(e.n_layers()) + " layers, the model has " +
               std::to_string(shape_.n_layers));
  // The reservation, without mu_: it may wait (bounded) for released jobs' stores, whose
  // last references are dropped by receiver threads that need mu_.
  std::shared_ptr<JobKvStore> store;
  try {
    store = std::make_shared<JobKvStore>(pool_.get(), e.prompt_tokens(),
                                         std::max(0, opt_.admission_wait_ms));
  } catch (const std::exception& ex) {
    return say(ex.what());
  }
  auto job = std::make_shared<Job>();
  job->expect = e;
  job->timeout_ms = e.timeout_ms() > 0 ? static_cast<int>(e.timeout_ms()) : opt_.default_timeout_ms;
  job->store = std::move(store);
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Another expect() may have taken the id or the last slot meanwhile: the job (declared
    // before the lock) is dropped after it, and its reservation returns.
    if (!admissible_locked(&no)) return say(no);
    job->last_activity = Clock::now();
    jobs_[e.job_id()] = job;
    cv_.notify_all();
  }
  return true;
}

void KvReceiver::fail_locked(const std::shared_ptr<Job>& job, const std::string& message,
                             std::vector<std::function<void()>>* after, bool sender) {
  if (job->failed) return;
  job->failed = true;
  job->sender_failed = sender;
  job->error = message;
  job->last_activity = Clock::now();  // failed jobs are forgotten a minute later
  // Pages go back to the pool once in-flight puts finish; meanwhile the reservation counts
  // as draining (an expect() may wait for it).
  if (job->store) job->store->retire();
  job->store.reset();
  after->push_back([kv = release_device(job)]() mutable { kv.reset(); });  // device KV too
  const uint64_t id = job->expect.job_id();
  const std::string frame = wire::encode_frame(failed_env(id, message));
  auto streams = job->streams;
  // Each stream's reader drains and closes it (closing with unread pages would reset the
  // connection and lose this message on the sender's side).
  after->push_back([streams, frame] {
    for (auto& s : streams) s->send(frame, kNotifyTimeoutMs);
  });
  if (on_fail_) after->push_back([this, id, message] { on_fail_(id, message); });
  cv_.notify_all();
}

void KvReceiver::fail_job(uint64_t job_id, const std::string& message) {
  std::vector<std::function<void()>> after;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = jobs_.find(job_id);
    if (it == jobs_.end()) return;
    fail_locked(it->second, message, &after);
  }
  for (auto& f : after) f();
}

void KvReceiver::release_all() {
  std::vector<uint64_t> ids;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [id, job] : jobs_) ids.push_back(id);
  }
  for (uint64_t id : ids) release(id);
}

bool KvReceiver::wait_complete(uint64_t job_id, std::string* why) {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    auto it = jobs_.find(job_id);
    if (it == jobs_.end()) {
      if (why) *why = "job " + std::to_string(job_id) + " is not expected (or was released)";
      return false;
    }
    const auto& job = it->second;
    if (job->failed) {
      if (why) *why = job->error;
      return false;
    }
    if (job->complete) return true;
    if (stop_) {
      if (why) *why = "decoder shutting down";
      return false;
    }
    // The monitor thread fails the job when its pages stop for timeout_ms.
    cv_.wait_for(lock, std::chrono::milliseconds(200));
  }
}

std::shared_ptr<JobKvStore> KvReceiver::store(uint64_t job_id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end() || it->second->failed) return nullptr;
  return it->second->store;
}

void KvReceiver::release(uint64_t job_id) {
  std::vector<std::shared_ptr<Stream>> streams;
  std::shared_ptr<DeviceJobKv> device;  // freed here, outside mu_
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = jobs_.find(job_id);
    if (it == jobs_.end()) return;
    streams = it->second->streams;
    it->second->failed = true;  // late pages of a released job are refused
    it->second->error = "job " + std::to_string(job_id) + " released";
    if (it->second->store) it->second->store->retire();  // see fail_locked
    it->second->store.reset();
    device = release_device(it->second);
    jobs_.erase(it);
    cv_.notify_all();
  }
  for (auto& s : streams) s->conn->close();
}

std::shared_ptr<DeviceJobKv> KvReceiver::device_kv(uint64_t job_id) {
  std::shared_ptr<JobDeviceSlot> slot;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = jobs_.find(job_id);
    if (it == jobs_.end() || it->second->failed) return nullptr;
    slot = it->second->device;
  }
  std::lock_guard<std::mutex> lock(slot->mu);
  return slot->kv;
}

KvReceiver::JobInfo KvReceiver::info(uint64_t job_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  JobInfo r;
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return r;
  const Job& j = *it->second;
  r.known = true;
  r.complete = j.complete;
  r.failed = j.failed;
  r.layers_complete = j.layers_complete;
  r.streams = static_cast<int>(j.streams.size());
  r.bytes = j.bytes;
  r.device_bytes = j.device_bytes;
  r.receive_ms = j.complete && j.any_page ? ms_between(j.first_page, j.complete_at) : 0;
  r.error = j.error;
  r.sender_failed = j.sender_failed;
  return r;
}

void KvReceiver::monitor_loop() {
  while (!stop_) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    std::vector<std::function<void()>> after;
    std::vector<std::shared_ptr<Stream>> finished;
    {
      std::lock_guard<std::mutex> lock(mu_);
      const auto now = Clock::now();
      for (auto it = jobs_.begin(); it != jobs_.end();) {  // failed jobs: kept a minute
        const bool old = it->second->failed && ms_between(it->second->last_activity, now) > 60000;
        it = old ? jobs_.erase(it) : std::next(it);
      }
      for (auto& [id, job] : jobs_) {
        if (job->failed || job->complete) continue;
        const double idle = ms_between(job->last_activity, now);
        if (idle > job->timeout_ms)
          fail_locked(job,
                      "job " + std::to_string(id) + ": no KV page for " +
                          std::to_string(static_cast<int64_t>(idle)) + " ms (timeout " +
                          std::to_string(job->timeout_ms) + " ms; " +
                          std::to_string(job->layers_complete) + " of " +
                          std::to_string(shape_.n_layers) + " layers complete, " +
                          std::to_string(job->streams.size()) + " streams of " +
                          std::to_string(job->expect.senders()) + " senders connected)",
                      &after, /*sender=*/true);
      }
      // Reap stream threads that ended.
      auto it = std::partition(streams_.begin(), streams_.end(),
                               [](const std::shared_ptr<Stream>& s) { return !s->done; });
      finished.assign(it, streams_.end());
      streams_.erase(it, streams_.end());
    }
    for (auto& f : after) f();
    for (auto& s : finished)
      if (s->th.joinable()) s->th.join();
  }
}

void KvReceiver::serve_stream(std::shared_ptr<Stream> s) {
  struct Done {
    Stream* s;
    ~Done() { s->done = true; }
  } done_guard{s.get()};
  v1::KvStreamHello hello;
  if (!stream_hellos(*s, &hello)) return;
  std::vector<int> complete_layers;
  const std::shared_ptr<Job> job = join_job(s, hello, &complete_layers);
  if (!job) return;
  // The stream's transport: "tcp" carries K/V in the page frames; any other one gets its
  // bytes from a payload source set up here (nccl: joins the sender's communicator).
  const std::string transport = !hello.transport().empty()
                                    ? hello.transport()
                                    : (hello.nccl_unique_id().empty() ? "tcp" : "nccl");
  std::unique_ptr<PagePayloadSource> payload;
  if (transport != "tcp" && !(payload = open_payload(*s, job, hello, transport))) return;
  for (int l : complete_layers) {  // a stream that joins late still hears every ack
    v1::Envelope ack;
    ack.mutable_layer_ack()->set_job_id(s->job_id);
    ack.mutable_layer_ack()->set_layer(l);
    s->send(wire::encode_frame(ack), job->timeout_ms);
  }
  read_pages(*s, job, transport, payload.get());
}

void KvReceiver::refuse_stream(Stream& s, v1::ErrorCode code, const std::string& msg) {
  s.send(wire::encode_frame(wire::make_error(s.job_id, code, msg)), kNotifyTimeoutMs);
  drain_and_close(s.conn.get(), kNotifyTimeoutMs);
  log_refusal("from " + s.peer + ": " + msg);
}

bool KvReceiver::stream_hellos(Stream& s, v1::KvStreamHello* hello) {
  struct Prehello {
    KvReceiver* rx;
    Stream* s;
    void done() {
      if (s->prehello.exchange(false)) --rx->prehello_;
    }
    ~Prehello() { done(); }
  } prehello{this, &s};
  const auto hello_deadline = s.hello_deadline;
  auto hello_left = [&] {
    return std::max(1, static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                            hello_deadline - Clock::now())
                                            .count()));
  };
  std::string hello_error;
  if (!s.conn->server_handshake(v1::WORKER, opt_.secret, "mprefill-decoder", opt_.max_frame,
                                hello_left(), &hello_error)) {
    log_refusal(hello_error);
    s.conn->close();
    return false;
  }
  v1::Envelope env;
  try {
    if (!s.conn->recv(&env, hello_left())) {
      prehello.done();
      refuse_stream(s, v1::BAD_FRAME,
                    "no KvStreamHello within " + std::to_string(opt_.prehello_timeout_ms) + " ms");
      return false;
    }
  } catch (const std::exception& e) {
    return false;  // gone before saying anything
  }
  prehello.done();
  if (!env.has_kv_hello()) {
    refuse_stream(s, v1::BAD_FRAME, "first frame is not KvStreamHello");
    return false;
  }
  *hello = env.kv_hello();
  s.job_id = hello->job_id();
  s.rank = hello->rank();
  return true;
}

std::shared_ptr<KvReceiver::Job> KvReceiver::join_job(const std::shared_ptr<Stream>& s,
                                                      const v1::KvStreamHello& hello,
                                                      std::vector<int>* complete_layers) {
  std::vector<std::function<void()>> after;
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, std::chrono::milliseconds(opt_.hello_wait_ms),
               [&] { return stop_ || jobs_.count(s->job_id) > 0; });
  auto it = jobs_.find(s->job_id);
  if (it == jobs_.end()) {
    lock.unlock();
    refuse_stream(*s, v1::NOT_FOUND, "job " + std::to_string(s->job_id) + " is not expected here");
    return nullptr;
  }
  std::shared_ptr<Job> job = it->second;
  if (job->failed) {
    const std::string err = job->error;
    lock.unlock();
    refuse_stream(*s, v1::DECODER_FAILED, err);
    return nullptr;
  }
  const std::string mismatch = kv_contract_mismatch(hello.kv(), opt_.contract);
  const int senders = job->expect.senders();
  if (!mismatch.empty() || s->rank < 0 || (senders > 0 && s->rank >= senders)) {
    const std::string msg =
        "job " + std::to_string(s->job_id) + ": KV stream of rank " + std::to_string(s->rank) +
        " from " + s->peer + ": " +
        (mismatch.empty() ? "rank outside [0, " + std::to_string(senders) + ")" : mismatch);
    fail_locked(job, msg, &after);
    lock.unlock();
    for (auto& f : after) f();
    refuse_stream(*s, mismatch.empty() ? v1::INVALID_ARGUMENT : v1::MODEL_MISMATCH, msg);
    return nullptr;
  }
  job->streams.push_back(s);
  job->last_activity = Clock::now();
  for (int l = 0; l < shape_.n_layers; ++l)
    if (job->store->layer_complete(l)) complete_layers->push_back(l);
  return job;
}

std::unique_ptr<PagePayloadSource> KvReceiver::open_payload(Stream& s,
                                                            const std::shared_ptr<Job>& job,
                                                            const v1::KvStreamHello& hello,
                                                            const std::string& transport) {
  std::unique_ptr<PagePayloadSource> payload;
  std::string why;
  auto it = opt_.payload.find(transport);
  if (it == opt_.payload.end() || !it->second) {
    std::string served = "tcp";
    for (const auto& [name, f] : opt_.payload) served += ", " + name;
    why = "this decoder does not serve kv_transport " + transport + " (it serves " + served + ")";
  } else {
    PayloadJob pj;
    pj.job_id = s.job_id;
    pj.n_tokens = job->expect.prompt_tokens();
    pj.senders = std::max(1, job->expect.senders());
    pj.shape = shape_;
    pj.device = job->device;
    try {
      payload = it->second(hello, job->timeout_ms, pj);
      v1::Envelope reply;
      if (payload && payload->setup_reply(&reply)) {
        std::lock_guard<std::mutex> lock(s.send_mu);
        s.conn->send_frame(wire::encode_frame(reply), job->timeout_ms);
      }
    } catch (const std::exception& e) {
      payload.reset();
      why = e.what();
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      std::lock_guard<std::mutex> dlock(job->device->mu);
      if (job->device->kv)
        job->device_bytes = std::max(job->device_bytes, job->device->kv->device_bytes());
    }
  }
  if (!payload) {
    const std::string msg = "job " + std::to_string(s.job_id) + ": " + transport +
                            " KV stream of rank " + std::to_string(s.rank) +
                            " cannot be set up: " + why;
    std::vector<std::function<void()>> after;
    {
      std::lock_guard<std::mutex> lock(mu_);
      fail_locked(job, msg, &after);
    }
    for (auto& f : after) f();
    refuse_stream(s, v1::INVALID_ARGUMENT, msg);
  }
  return payload;
}

// Page frames are read in place (kv_page_frame.h: the K/V bytes go from the socket buffer
// into the store, one copy); other frames through protobuf.
void KvReceiver::read_pages(Stream& st, const std::shared_ptr<Job>& job,
                            const std::string& transport, PagePayloadSource* payload) {
  Stream* s = &st;
  v1::Envelope in;
  KvPageView page;
  std::string fk, fv;  // payload-source transports: the page's bytes
  for (;;) {
    std::string_view raw;
    bool is_page = false;
    try {
      if (!s->conn->recv_raw(&raw, 200)) {
        std::lock_guard<std::mutex> lock(mu_);
        if (stop_) return;
        if (!job->failed) continue;
      }
      if (job_failed(job)) return drain_and_close(s->conn.get(), kNotifyTimeoutMs);
      is_page = read_kv_page_frame(raw, &page);
      if (!is_page) {
        in.Clear();
        if (!in.ParseFromArray(raw.data(), static_cast<int>(raw.size())))
          throw wire::WireError(wire::WireError::Kind::kBadFrame,
                                "unparsable envelope of " + std::to_string(raw.size()) + " bytes");
        if (in.version() != wire::kProtocolVersion)
          throw wire::WireError(wire::WireError::Kind::kBadVersion,
                                "protocol version " + std::to_string(in.version()));
        if (in.msg_case() == v1::Envelope::MSG_NOT_SET)
          throw wire::WireError(wire::WireError::Kind::kBadFrame,
                                "envelope without a message (unknown type?)");
        if (in.has_kv_page()) {  // a page in another encoding: the same page
          page.header = in.kv_page().header();
          page.k = in.kv_page().k();
          page.v = in.kv_page().v();
          is_page = true;
        }
      }
    } catch (const std::exception& e) {
      std::vector<std::function<void()>> fails;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stop_ || job->failed || job->complete) return;
        fail_locked(job,
                    "job " + std::to_string(s->job_id) + ": KV stream of rank " +
                        std::to_string(s->rank) + " (" + s->peer + ") ended with " +
                        std::to_string(job->layers_complete) + " of " +
                        std::to_string(shape_.n_layers) + " layers complete: " + e.what(),
                    &fails, /*sender=*/true);
      }
      for (auto& f : fails) f();
      return;
    }
    // A device page that cannot be landed or fetched fails the job (the stream ends).
    auto page_failed = [&](const char* what) {
      std::vector<std::function<void()>> fails;
      {
        std::lock_guard<std::mutex> lock(mu_);
        fail_locked(job,
                    "job " + std::to_string(s->job_id) + ": rank " + std::to_string(s->rank) +
                        " (" + s->peer + "): page of layer " + std::to_string(page.header.layer()) +
                        " (" + transport + "): " + what,
                    &fails);
      }
      for (auto& f : fails) f();
      return drain_and_close(s->conn.get(), kNotifyTimeoutMs);
    };
    if (is_page && payload && payload->in_place()) {
      try {
        payload->land(page.header);
      } catch (const std::exception& e) {
        return page_failed(e.what());
      }
      // bf16 pages may have been widened into an fp32 contract's region (ipc).
      handle_page(*s, job, page, /*bf16_ok=*/true, /*in_place=*/true);
    } else if (is_page && payload) {
      try {
        payload->fetch(page.header, &fk, &fv);
      } catch (const std::exception& e) {
        return page_failed(e.what());
      }
      // The sender's crc32c cannot exist (its bytes never reach host memory); the device
      // checksum was compared in fetch(), this one guards the host copy into the store.
      page.header.set_crc32c(crc32c(fv.data(), fv.size(), crc32c(fk.data(), fk.size())));
      page.k = fk;
      page.v = fv;
      handle_page(*s, job, page, /*bf16_ok=*/true);
    } else if (is_page) {
      handle_page(*s, job, page);
    } else if (in.has_error()) {
      std::vector<std::function<void()>> fails;
      {
        std::lock_guard<std::mutex> lock(mu_);
        fail_locked(job,
                    "job " + std::to_string(s->job_id) + ": rank " + std::to_string(s->rank) +
                        " gave up: " + in.error().message(),
                    &fails, /*sender=*/true);
      }
      for (auto& f : fails) f();
      return;
    }
  }
}

bool KvReceiver::job_failed(const std::shared_ptr<Job>& job) const {
  std::lock_guard<std::mutex> lock(mu_);
  return job->failed;
}

void KvReceiver::handle_page(Stream& s, const std::shared_ptr<Job>& job, const KvPageView& page,
                             bool bf16_ok, bool in_place) {
  const v1::KvPageHeader& h = page.header;
  std::shared_ptr<JobKvStore> store;
  std::shared_ptr<DeviceJobKv> device;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (job->failed) return;
    store = job->store;
    if (in_place) {
      std::lock_guard<std::mutex> dlock(job->device->mu);
      device = job->device->kv;
    }
    job->last_activity = Clock::now();
    if (!job->any_page) {
      job->any_page = true;
      job->first_page = job->last_activity;
    }
  }
  std::string bad;
  bool layer_done = false;
  if (h.job_id() != s.job_id || h.sender_rank() != s.rank)
    bad = "page of job " + std::to_string(h.job_id()) + " rank " + std::to_string(h.sender_rank()) +
          " on the stream of job " + std::to_string(s.job_id) + " rank " + std::to_string(s.rank);
  else if (h.layout() != opt_.contract.layout() || h.page_tokens() != shape_.page_tokens)
    bad = "page layout / page_tokens differ from the KV contract";
  else if (h.dtype() != opt_.contract.kv_dtype() && !(bf16_ok && h.dtype() == v1::BF16))
    bad = "page dtype " + v1::DType_Name(h.dtype()) + ", the KV contract says " +
          v1::DType_Name(opt_.contract.kv_dtype());
  if (bad.empty()) {
    PageIn p;
    p.layer = h.layer();
    p.kv_heads.assign(h.kv_heads().begin(), h.kv_heads().end());
    p.token_begin = h.token_begin();
    p.token_end = h.token_end();
    p.head_dim = h.head_dim();
    p.dtype = h.dtype() == v1::BF16 ? DType::kBF16 : DType::kF32;  // checked above
    p.k = page.k.data();
    p.v = page.v.data();
    p.k_bytes = page.k.size();
    p.v_bytes = page.v.size();
    p.crc32c = h.crc32c();
    try {
      if (in_place && !device) throw std::runtime_error("in-place page of a job without device KV");
      layer_done = in_place ? store->mark(p) : store->put(p);
      // An in-place layer is complete once its bytes check out on the device.
      if (layer_done && in_place) device->verify_layer(h.layer(), job->timeout_ms);
    } catch (const std::exception& e) {
      bad = e.what();
    }
  }
  store.reset();
  device.reset();  // a failed job's pages go back to the pool with the last reference
  std::vector<std::function<void()>> after;
  std::vector<std::shared_ptr<Stream>> to_ack;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!bad.empty()) {
      fail_locked(job,
                  "job " + std::to_string(s.job_id) + ": rank " + std::to_string(s.rank) + " (" +
                      s.peer + "): " + bad,
                  &after);
    } else if (!job->failed) {
      job->bytes += in_place ? 2 * static_cast<uint64_t>(h.token_end() - h.token_begin()) *
                                   h.kv_heads_size() * h.head_dim() * shape_.elem_bytes()
                             : page.k.size() + page.v.size();
      if (layer_done) {
        job->layers_complete++;
        to_ack = job->streams;
        if (job->layers_complete == shape_.n_layers) {
          job->complete = true;
          job->complete_at = Clock::now();
          cv_.notify_all();
        }
      }
    }
  }
  for (auto& f : after) f();
  if (!to_ack.empty()) {
    v1::Envelope ack;
    ack.mutable_layer_ack()->set_job_id(s.job_id);
    ack.mutable_layer_ack()->set_layer(h.layer());
    const std::string frame = wire::encode_frame(ack);
    for (auto& st : to_ack) st->send(frame, job->timeout_ms);
  }
}

}  // namespace mprefill::kv
