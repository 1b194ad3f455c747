#include "decode/decoder.h"

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "kv/kv_handoff.h"
#include "kv/kv_ipc.h"
#include "model/prompt.h"
#include "model/sampler.h"

namespace mprefill::decode {
namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

int64_t unix_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

v1::Envelope failed_env(uint64_t job, const std::string& msg) {
  return kv::decode_failed_envelope(job, msg);
}

}  // namespace

// ---- Decoder -------------------------------------------------------------------------

Decoder::Decoder(const ModelWeights& w, DecoderOptions opt, SendFn send)
    : w_(w), opt_(std::move(opt)), engine_(w), send_(std::move(send)) {
  fp_ = model_fingerprint(w, opt_.model_name);
  ReceiverOptions ro = opt_.receiver;
  ro.contract = make_kv_contract(fp_, opt_.page_tokens);  // the model's KV dtype
  receiver_ = std::make_unique<KvReceiver>(ro, [this](uint64_t job, const std::string& msg) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      expects_.erase(job);
    }
    v1::Envelope env = failed_env(job, msg);
    // Called from a receiver thread once the job failed: receiver_ is set by then.
    env.mutable_decode_failed()->set_sender_failed(receiver_->info(job).sender_failed);
    emit(env);
  });
  decode_thread_ = std::thread([this] { decode_loop(); });
}

Decoder::~Decoder() {
  stop();
  if (decode_thread_.joinable()) decode_thread_.join();
  receiver_.reset();
}

void Decoder::stop() {
  stop_ = true;
  cv_.notify_all();
  std::lock_guard<std::mutex> lock(registering_mu_);
  if (registering_) registering_->close();
}

void Decoder::emit(const v1::Envelope& env) {
  std::lock_guard<std::mutex> lock(send_mu_);
  if (!send_) return;
  try {
    send_(env);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mprefill-decoder: sending to the coordinator: %s\n", e.what());
  }
}

void Decoder::handle(const v1::Envelope& env) {
  if (env.has_expect()) {
    const v1::Expect& e = env.expect();
    std::string why;
    if (e.decode_tokens() < 0) {
      emit(failed_env(e.job_id(),
                      "job " + std::to_string(e.job_id()) + ": decode_tokens must be >= 0"));
      return;
    }
    // The decode cache holds prompt + decoded tokens (the prompt is bounded by the
    // capacity check of expect()): no more decoded tokens than the model has positions.
    if (e.decode_tokens() > w_.config.max_position) {
      emit(failed_env(e.job_id(), "job " + std::to_string(e.job_id()) + ": decode_tokens " +
                                      std::to_string(e.decode_tokens()) +
                                      " exceeds the model's max_position " +
                                      std::to_string(w_.config.max_position)));
      return;
    }
    if (!receiver_->expect(e, &why)) {
      emit(failed_env(e.job_id(), why));
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      expects_[e.job_id()] = e;
      cancelled_.erase(e.job_id());
    }
    v1::Envelope ready;
    ready.mutable_ready()->set_job_id(e.job_id());
    emit(ready);
  } else if (env.has_start_decode()) {
    std::lock_guard<std::mutex> lock(mu_);
    decode_queue_.push_back(env.start_decode());
    cv_.notify_all();
  } else if (env.has_release()) {
    const uint64_t id = env.release().job_id();
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled_[id] = true;
      expects_.erase(id);
    }
    receiver_->release(id);
  }
}

v1::DecodeDone Decoder::decode(uint64_t job_id, const v1::StartDecode& start) {
  const std::string where = "job " + std::to_string(job_id) + ": ";
  v1::Expect e;
  uint64_t epoch = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    epoch = epoch_;
    auto it = expects_.find(job_id);
    if (it == expects_.end())
      throw std::runtime_error(where + "StartDecode for a job not expected");
    e = it->second;
  }
  std::string why;
  if (!receiver_->wait_complete(job_id, &why)) throw std::runtime_error(why);
  auto store = receiver_->store(job_id);
  if (!store) throw std::runtime_error(where + "KV store gone (released)");
  v1::Envelope started;  // the coordinator's HANDING_OFF -> DECODING
  started.mutable_decode_started()->set_job_id(job_id);
  emit(started);
  // Transport "ipc" wrote the KV into a region on this decoder's GPU (the store then keeps
  // the page bookkeeping only): the KV stays there, in the contract's dtype.
  auto device_kv = receiver_->device_kv(job_id);
  const KvReceiver::JobInfo info = receiver_->info(job_id);
  const ModelConfig& c = w_.config;
  check_token_id(c, start.first_token_id(), where + "first token id");

  const auto t0 = Clock::now();
  const int64_t n = store->n_tokens();
  const int steps = e.decode_tokens();
  // The cache keeps the store's dtype (a bf16 model's KV stays bf16; the engine widens
  // it on read). Decoding runs on the CPU engine: a device KV is copied to it as is.
  KvCache cache(c, n + steps, store->shape().dtype);
  for (int l = 0; l < c.n_layers; ++l) {  // pages go back to the pool layer by layer
    if (device_kv)
      device_kv->export_layer(l, cache.k_data(l), cache.v_data(l));
    else
      store->export_layer(l, cache.k_data(l), cache.v_data(l));
    store->release_layer(l);
  }
  cache.n_tokens = n;
  store.reset();
  const uint64_t device_bytes = device_kv ? device_kv->device_bytes() : info.device_bytes;
  device_kv.reset();

  SamplerOptions so;
  so.temperature = e.sampling().temperature();
  so.top_p = e.sampling().top_p() > 0.f ? e.sampling().top_p() : 1.f;
  so.seed = e.sampling().seed();
  Sampler sampler(so);
  // The worker drew the first token from this seed's first draw (Engine::generate's
  // order): skip it so the decoded tokens use the same stream.
  if (so.temperature > 0.f) {
    const float one = 0.f;
    sampler.sample(&one, 1);
  }
  auto is_stop = [&](int id) {
    return std::find(e.stop_ids().begin(), e.stop_ids().end(), id) != e.stop_ids().end();
  };
  v1::DecodeDone done;
  done.set_job_id(job_id);
  done.set_stopped_by("length");
  int tok = start.first_token_id();
  for (int step = 0;; ++step) {
    done.add_generated_ids(tok);
    if (is_stop(tok)) {
      done.set_stopped_by("stop_id");
      break;
    }
    if (step == steps) break;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cancelled_.count(job_id) || stop_ || epoch != epoch_)
        throw std::runtime_error(where + "released while decoding");
    }
    const std::vector<float> logits = engine_.decode_step(tok, n + step, &cache);
    tok = sampler.sample(logits.data(), static_cast<int>(logits.size())).id;
  }
  done.set_decode_ms(ms_between(t0, Clock::now()));
  done.set_kv_bytes_received(info.bytes);
  done.set_receive_ms(info.receive_ms);
  done.set_peak_device_bytes(device_bytes);
  return done;
}

void Decoder::decode_loop() {
  for (;;) {
    v1::StartDecode s;
    uint64_t epoch = 0;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !decode_queue_.empty(); });
      if (stop_) return;
      s = decode_queue_.front();
      decode_queue_.pop_front();
      epoch = epoch_;
    }
    v1::Envelope out;
    try {
      *out.mutable_decode_done() = decode(s.job_id(), s);
    } catch (const std::exception& e) {
      out = failed_env(s.job_id(), e.what());
    }
    {
      // A job of a lost coordinator: its id may already name a job of the new one.
      std::lock_guard<std::mutex> lock(mu_);
      if (epoch != epoch_) continue;
      expects_.erase(s.job_id());
    }
    receiver_->release(s.job_id());
    emit(out);
  }
}

std::unique_ptr<wire::Connection> Decoder::register_with(const std::string& host, uint16_t port,
                                                         const std::string& secret, int timeout_ms,
                                                         std::string* why, bool* refused) {
  *refused = false;
  std::unique_ptr<wire::Connection> conn;  // outlives `registering` (declared after it)
  struct Registering {  // visible to stop() while the hello and DecoderRegister run
    Decoder* d;
    void set(wire::Connection* c) {
      std::lock_guard<std::mutex> lock(d->registering_mu_);
      d->registering_ = c;
      if (c && d->stop_) c->close();
    }
    ~Registering() { set(nullptr); }
  } registering{this};
  try {
    conn = wire::Connection::connect(host, port, timeout_ms);
    registering.set(conn.get());
    conn->client_handshake(v1::DECODER, opt_.name, secret, timeout_ms);
    v1::Envelope reg;
    auto* r = reg.mutable_decoder_register();
    r->set_name(opt_.name);
    r->set_host(opt_.advertise_host.empty() ? opt_.receiver.listen_host : opt_.advertise_host);
    r->set_kv_port(kv_port());
    r->set_kv_tls(receiver_->tls());
    r->set_capacity_bytes(opt_.receiver.capacity_bytes);
    r->set_max_jobs(opt_.receiver.max_jobs);
    r->set_host_id(kv::host_identity());
    *r->mutable_kv() = contract();
    for (const std::string& t : opt_.kv_transports) r->add_kv_transports(t);
    conn->send(reg, timeout_ms);
    v1::Envelope ans;
    if (!conn->recv(&ans, timeout_ms))
      throw std::runtime_error("no answer to DecoderRegister within " + std::to_string(timeout_ms) +
                               " ms");
    if (ans.has_error()) {
      *refused = true;
      throw std::runtime_error("registration refused: " + ans.error().message());
    }
    if (!ans.has_decoder_registered()) {
      *refused = true;
      throw std::runtime_error("expected DecoderRegistered, got another message");
    }
    if (ans.decoder_registered().heartbeat_ms() > 0)
      opt_.heartbeat_ms = static_cast<int>(ans.decoder_registered().heartbeat_ms());
    return conn;
  } catch (const wire::WireError& e) {
    // A wrong secret or protocol version does not get better by retrying.
    *refused =
        e.kind() == wire::WireError::Kind::kAuth || e.kind() == wire::WireError::Kind::kBadVersion;
    *why = e.what();
  } catch (const std::exception& e) {
    *why = e.what();
  }
  return nullptr;
}

void Decoder::forget_jobs() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++epoch_;
    for (const auto& [id, e] : expects_) cancelled_[id] = true;
    for (const auto& s : decode_queue_) cancelled_[s.job_id()] = true;
    expects_.clear();
    decode_queue_.clear();
  }
  receiver_->release_all();
}

int Decoder::serve(const std::string& host, uint16_t port, const std::string& secret) {
  const std::string where = host + ":" + std::to_string(port);
  std::string why;
  bool refused = false;
  std::fprintf(stderr, "mprefill-decoder: registering with %s (KV port %u)\n", where.c_str(),
               kv_port());
  std::unique_ptr<wire::Connection> conn =
      register_with(host, port, secret, opt_.io_timeout_ms, &why, &refused);
  if (!conn) {
    if (stop_) return 0;  // stop() cut the registration short
    std::fprintf(stderr, "mprefill-decoder: coordinator %s: %s\n", where.c_str(), why.c_str());
    return 1;
  }
  std::fprintf(stderr, "mprefill-decoder: registered as '%s' with %s (KV port %u%s, %s)\n",
               opt_.name.c_str(), where.c_str(), kv_port(), receiver_->tls() ? " TLS" : "",
               fp_.to_string().c_str());
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(send_mu_);
      wire::Connection* c = conn.get();
      const int t = opt_.io_timeout_ms;
      send_ = [c, t](const v1::Envelope& env) { c->send(env, t); };
    }
    std::string lost;
    uint64_t seq = 0;
    auto next_hb = Clock::now();
    while (!stop_) {
      if (Clock::now() >= next_hb) {
        v1::Envelope hb;
        hb.mutable_heartbeat()->set_seq(++seq);
        hb.mutable_heartbeat()->set_unix_ms(unix_ms());
        emit(hb);
        next_hb = Clock::now() + std::chrono::milliseconds(opt_.heartbeat_ms);
      }
      v1::Envelope env;
      try {
        if (!conn->recv(&env, std::min(opt_.heartbeat_ms, 100))) continue;
      } catch (const wire::WireError& e) {
        lost = e.what();
        break;
      }
      if (env.has_error()) {
        std::fprintf(stderr, "mprefill-decoder: coordinator error: %s\n",
                     env.error().message().c_str());
        continue;
      }
      handle(env);
    }
    {
      std::lock_guard<std::mutex> lock(send_mu_);
      send_ = nullptr;
    }
    conn->close();
    conn.reset();
    if (stop_) return 0;

    // The coordinator went away (crash, restart): its jobs are gone with it.
    forget_jobs();
    std::fprintf(stderr,
                 "mprefill-decoder: coordinator connection ended (%s); re-registering with %s "
                 "within %d s\n",
                 lost.c_str(), where.c_str(), opt_.reconnect_s);
    const auto t_lost = Clock::now();
    const auto deadline = t_lost + std::chrono::seconds(opt_.reconnect_s);
    int backoff_ms = 100;
    for (;;) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      if (stop_) return 0;
      if (left <= 0) {
        std::fprintf(stderr,
                     "mprefill-decoder: error: coordinator %s did not come back within %d s "
                     "(last attempt: %s); exiting\n",
                     where.c_str(), opt_.reconnect_s, why.empty() ? "none" : why.c_str());
        return 1;
      }
      conn = register_with(host, port, secret,
                           static_cast<int>(std::min<int64_t>(left, opt_.io_timeout_ms)), &why,
                           &refused);
      if (conn) break;
      if (stop_) return 0;
      if (refused) {
        std::fprintf(stderr, "mprefill-decoder: error: coordinator %s: %s; exiting\n",
                     where.c_str(), why.c_str());
        return 1;
      }
      const auto wake = Clock::now() + std::chrono::milliseconds(backoff_ms);
      while (!stop_ && Clock::now() < wake && Clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      backoff_ms = std::min(backoff_ms * 2, 2000);
    }
    std::fprintf(stderr, "mprefill-decoder: re-registered as '%s' with %s after %.1f s\n",
                 opt_.name.c_str(), where.c_str(), ms_between(t_lost, Clock::now()) / 1000.0);
  }
}

}  // namespace mprefill::decode
