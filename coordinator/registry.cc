// The registry of worker groups and decoders: registration (names, shapes, transports,
// one KV contract for the whole service), heartbeats and the silence timeout, the choice
// of a free group / decoder for a job, and removal (their jobs fail).
#include <algorithm>
#include <mutex>

#include "coordinator/session.h"
#include "coordinator/state.h"
#include "coordinator/transport_choice.h"

namespace mprefill::coord {

bool Coordinator::Impl::check_contract(const v1::KvContract& kv, std::string* why) {
  const auto& m = kv.model();
  if (m.n_layers() <= 0 || m.n_heads() <= 0 || m.n_kv_heads() <= 0 || m.head_dim() <= 0 ||
      m.vocab() <= 0 || m.max_position() <= 0 || m.hidden() <= 0) {
    *why = "KV contract: the model shape has a non-positive field";
    return false;
  }
  if (m.n_heads() % m.n_kv_heads() != 0) {
    *why = "KV contract: n_heads is not a multiple of n_kv_heads";
    return false;
  }
  if (dtype_bytes(kv.kv_dtype()) == 0 || kv.page_tokens() <= 0 || kv.layout().empty()) {
    *why = "KV contract: kv_dtype, layout and page_tokens must be set";
    return false;
  }
  // Absurd shapes would overflow the admission arithmetic (layers x heads x head_dim x
  // dtype x tokens in 64 bits): each field and the KV bytes per token are bounded far
  // above any real model (Llama-3 405B: 126 layers, 8 x 128 KV, 2 MiB per token in bf16).
  auto over = [&](const char* what, int64_t v, int64_t max) {
    if (v <= max) return false;
    *why = std::string("KV contract: ") + what + " " + std::to_string(v) + " exceeds the limit " +
           std::to_string(max);
    return true;
  };
  if (over("n_layers", m.n_layers(), 4096) || over("n_heads", m.n_heads(), 65536) ||
      over("head_dim", m.head_dim(), 65536) || over("hidden", m.hidden(), int64_t{1} << 24) ||
      over("vocab", m.vocab(), int64_t{1} << 26) ||
      over("max_position", m.max_position(), int64_t{1} << 34) ||
      over("page_tokens", kv.page_tokens(), int64_t{1} << 20))
    return false;
  // At most 2 x 2^12 x 2^16 x 2^16 x 4 = 2^47 here (no overflow); bounded to 64 MiB per
  // token, so that any token count up to max_position (2^34) stays below 2^60 bytes.
  const uint64_t per_token = kv_bytes(kv, 1);
  if (over("KV bytes per token", static_cast<int64_t>(per_token), int64_t{1} << 26)) return false;
  if (!contract) {
    contract = kv;
    return true;
  }
  const std::string d = contract_difference(*contract, kv);
  if (d.empty()) return true;
  *why = "KV contract differs from the one of the registered worker groups / decoders: " + d;
  return false;
}

void Coordinator::Impl::maybe_reset_contract() {
  if (groups.empty() && decoders.empty()) contract.reset();
}

void Coordinator::Impl::handle_worker_register(const SessionPtr& s, const v1::WorkerRegister& m) {
  auto refuse = [&](v1::ErrorCode code, const std::string& why) {
    log("worker group '%s' from %s refused: %s", m.group().c_str(), s->peer().c_str(), why.c_str());
    s->send_error_and_close(0, code, "worker group registration refused: " + why);
  };
  if (!s->registered.empty())
    return refuse(v1::INVALID_ARGUMENT,
                  "this connection already registered '" + s->registered + "'");
  if (m.group().empty() || m.group().size() > 128)
    return refuse(v1::INVALID_ARGUMENT, "group name must have 1..128 characters");
  if (groups.count(m.group()))
    return refuse(v1::INVALID_ARGUMENT,
                  "a worker group named '" + m.group() + "' is already registered");
  if (m.tp() < 1 || m.sp() < 1 || int64_t{m.world()} != int64_t{m.tp()} * m.sp())
    return refuse(v1::INVALID_ARGUMENT, "world " + std::to_string(m.world()) + " != tp " +
                                            std::to_string(m.tp()) + " x sp " +
                                            std::to_string(m.sp()));
  if (m.ranks_size() != m.world())
    return refuse(v1::INVALID_ARGUMENT, std::to_string(m.ranks_size()) +
                                            " RankInfo entries for a world of " +
                                            std::to_string(m.world()));
  if (m.kv().model().n_kv_heads() > 0 && m.kv().model().n_kv_heads() % m.tp() != 0)
    return refuse(v1::INVALID_ARGUMENT, "tp " + std::to_string(m.tp()) + " does not divide the " +
                                            std::to_string(m.kv().model().n_kv_heads()) +
                                            " KV heads");
  for (const auto& t : m.kv_transports())
    if (!known_kv_transport(t))
      return refuse(v1::INVALID_ARGUMENT, "unknown KV transport '" + t + "'");
  std::string why;
  if (!check_contract(m.kv(), &why)) return refuse(v1::MODEL_MISMATCH, why);
  Group g;
  g.name = m.group();
  g.session = s;
  g.reg = m;
  if (g.reg.kv_transports_size() == 0) g.reg.add_kv_transports("tcp");
  g.last_seen = Clock::now();
  groups[g.name] = g;
  s->registered = g.name;
  auto env = envelope();
  env.mutable_worker_registered()->set_group(g.name);
  env.mutable_worker_registered()->set_heartbeat_ms(static_cast<uint32_t>(opt.heartbeat_ms));
  s->send(env);
  log("worker group '%s' registered: tp %d x sp %d, model %s, from %s", g.name.c_str(), m.tp(),
      m.sp(), m.kv().model().name().c_str(), s->peer().c_str());
  dispatch();
}

void Coordinator::Impl::handle_decoder_register(const SessionPtr& s, const v1::DecoderRegister& m) {
  auto refuse = [&](v1::ErrorCode code, const std::string& why) {
    log("decoder '%s' from %s refused: %s", m.name().c_str(), s->peer().c_str(), why.c_str());
    s->send_error_and_close(0, code, "decoder registration refused: " + why);
  };
  if (!s->registered.empty())
    return refuse(v1::INVALID_ARGUMENT,
                  "this connection already registered '" + s->registered + "'");
  if (m.name().empty() || m.name().size() > 128)
    return refuse(v1::INVALID_ARGUMENT, "decoder name must have 1..128 characters");
  if (decoders.count(m.name()))
    return refuse(v1::INVALID_ARGUMENT, "a decoder named '" + m.name() + "' is already registered");
  if (m.kv_port() == 0 || m.kv_port() > 65535)
    return refuse(v1::INVALID_ARGUMENT, "kv_port must be in 1..65535");
  if (m.capacity_bytes() == 0) return refuse(v1::INVALID_ARGUMENT, "capacity_bytes must be > 0");
  if (m.max_jobs() < 0) return refuse(v1::INVALID_ARGUMENT, "max_jobs must be >= 0");
  for (const auto& t : m.kv_transports())
    if (!known_kv_transport(t))
      return refuse(v1::INVALID_ARGUMENT, "unknown KV transport '" + t + "'");
  std::string why;
  if (!check_contract(m.kv(), &why)) return refuse(v1::MODEL_MISMATCH, why);
  Decoder d;
  d.name = m.name();
  d.session = s;
  d.reg = m;
  if (d.reg.kv_transports_size() == 0) d.reg.add_kv_transports("tcp");
  d.host = m.host();
  if (d.host.empty()) d.host = s->peer().substr(0, s->peer().rfind(':'));
  d.last_seen = Clock::now();
  decoders[d.name] = d;
  s->registered = d.name;
  auto env = envelope();
  env.mutable_decoder_registered()->set_name(d.name);
  env.mutable_decoder_registered()->set_heartbeat_ms(static_cast<uint32_t>(opt.heartbeat_ms));
  s->send(env);
  log("decoder '%s' registered: %s:%u, capacity %s, model %s", d.name.c_str(), d.host.c_str(),
      m.kv_port(), format_bytes(m.capacity_bytes()).c_str(), m.kv().model().name().c_str());
  dispatch();
}

Group* Coordinator::Impl::pick_group(const Job& j) {
  const std::string& req = j.options.kv_transport();
  const std::string transport = req.empty() || req == "auto" ? "tcp" : req;
  for (auto& [name, g] : groups) {
    if (!g.alive || g.job != 0 || g.cancelled_job != 0) continue;
    if (!j.options.group().empty() && name != j.options.group()) continue;
    const auto& ts = g.reg.kv_transports();
    if (std::find(ts.begin(), ts.end(), transport) == ts.end()) continue;
    const uint64_t need = rank_bytes_estimate(*contract, static_cast<int64_t>(j.tokens.size()),
                                              g.reg.tp(), g.reg.sp());
    bool fits = true;
    for (const auto& r : g.reg.ranks())
      if (r.free_memory_bytes() != 0 && r.free_memory_bytes() < need) fits = false;
    if (fits) return &g;
  }
  return nullptr;
}

Decoder* Coordinator::Impl::pick_decoder(const Job& j, const Group& g, std::string* transport) {
  // The pair's transport (coordinator/transport_choice.h); for "auto" a decoder that takes
  // ipc from this group comes first, then the most free room.
  const KvPeerSite gs = site_of(g.reg);
  Decoder* best = nullptr;
  bool best_ipc = false;
  for (auto& [name, d] : decoders) {
    if (!d.alive) continue;
    if (!j.options.decoder().empty() && name != j.options.decoder()) continue;
    const KvTransportChoice c = choose_kv_transport(j.options.kv_transport(), gs, site_of(d.reg));
    if (c.transport.empty()) continue;
    if (d.reserved_bytes + j.kv_bytes > d.reg.capacity_bytes()) continue;
    if (d.reg.max_jobs() > 0 && static_cast<int>(d.jobs.size()) >= d.reg.max_jobs()) continue;
    const bool ipc = c.transport == "ipc";
    if (!best || ipc > best_ipc ||
        (ipc == best_ipc && d.reg.capacity_bytes() - d.reserved_bytes >
                                best->reg.capacity_bytes() - best->reserved_bytes)) {
      best = &d;
      best_ipc = ipc;
      *transport = c.transport;
    }
  }
  return best;
}

// ---- messages of a registered group / decoder: heartbeats here, job events in jobs.cc

void Coordinator::Impl::handle_worker_message(const SessionPtr& s, v1::Envelope& env) {
  auto git = groups.find(s->registered);
  if (git == groups.end()) return;  // failed meanwhile; its session is closing
  Group& g = git->second;
  g.last_seen = Clock::now();
  if (env.has_heartbeat()) {
    const auto& hb = env.heartbeat();
    // A heartbeat sent after the CancelJob arrived that names another job (or none) means
    // the group has dropped the cancelled one.
    if (g.cancelled_job != 0 && hb.job_id() != g.cancelled_job &&
        Clock::now() - g.cancel_time > std::chrono::milliseconds(2 * opt.heartbeat_ms)) {
      g.cancelled_job = 0;
      dispatch();
    }
    return;
  }
  if (env.has_worker_progress()) return on_worker_progress(s, g, env.worker_progress());
  if (env.has_worker_done()) return on_worker_done(g, env.worker_done());
  if (env.has_worker_failed()) return on_worker_failed(g, env.worker_failed());
  unexpected_message(s, env, "worker group");
}

void Coordinator::Impl::handle_decoder_message(const SessionPtr& s, v1::Envelope& env) {
  auto dit = decoders.find(s->registered);
  if (dit == decoders.end()) return;
  Decoder& d = dit->second;
  d.last_seen = Clock::now();
  if (env.has_heartbeat()) return;
  if (env.has_ready()) return on_ready(d, env.ready().job_id());
  if (env.has_decode_started()) return on_decode_started(d, env.decode_started().job_id());
  if (env.has_decode_done()) return on_decode_done(d, env.decode_done());
  if (env.has_decode_failed()) return on_decode_failed(d, env.decode_failed());
  unexpected_message(s, env, "decoder");
}

// ---- removal and timeouts

void Coordinator::Impl::fail_group(Group& g, const std::string& why) {
  const std::string name = g.name;
  log("worker group '%s' removed: %s", name.c_str(), why.c_str());
  g.alive = false;
  if (g.job != 0) {
    auto it = jobs.find(g.job);
    if (it != jobs.end())
      finish(it->second, v1::FAILED, v1::WORKER_FAILED, "worker group '" + name + "': " + why);
  }
  if (auto s = g.session.lock()) s->close_async();
  groups.erase(name);
  maybe_reset_contract();
}

void Coordinator::Impl::fail_decoder(Decoder& d, const std::string& why) {
  const std::string name = d.name;
  log("decoder '%s' removed: %s", name.c_str(), why.c_str());
  d.alive = false;
  const std::set<uint64_t> mine = d.jobs;
  for (uint64_t id : mine) {
    auto it = jobs.find(id);
    if (it != jobs.end())
      finish(it->second, v1::FAILED, v1::DECODER_FAILED, "decoder '" + name + "': " + why);
  }
  if (auto s = d.session.lock()) s->close_async();
  decoders.erase(name);
  maybe_reset_contract();
}

void Coordinator::Impl::expire_silent_peers(Clock::time_point now) {
  const auto silent = std::chrono::milliseconds(opt.heartbeat_timeout_ms);
  std::vector<std::string> dead;
  for (auto& [name, g] : groups)
    if (now - g.last_seen > silent) dead.push_back(name);
  for (const auto& name : dead)
    fail_group(groups.at(name), "silent for more than " + std::to_string(opt.heartbeat_timeout_ms) +
                                    " ms (heartbeat timeout)");
  dead.clear();
  for (auto& [name, d] : decoders)
    if (now - d.last_seen > silent) dead.push_back(name);
  for (const auto& name : dead)
    fail_decoder(decoders.at(name), "silent for more than " +
                                        std::to_string(opt.heartbeat_timeout_ms) +
                                        " ms (heartbeat timeout)");
}

void Coordinator::Impl::end_cancel_grace(Clock::time_point now) {
  bool freed = false;
  for (auto& [name, g] : groups)
    if (g.cancelled_job != 0 && now > g.cancel_deadline) {
      log("worker group '%s' did not end cancelled job %llu within %d ms; treating it as idle",
          name.c_str(), static_cast<unsigned long long>(g.cancelled_job), opt.cancel_grace_ms);
      g.cancelled_job = 0;
      freed = true;
    }
  if (freed) dispatch();
}

}  // namespace mprefill::coord
