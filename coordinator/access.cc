// Who may connect and what they must prove: the key a hello is checked with (the
// infrastructure secret for worker groups and decoders, a client's own key from
// --client-keys for clients), the pool of connections that have not finished their hello
// (own cap, oldest closed first, never counted against authenticated peers), grants for
// large client frames, key reloads with revocation, and the rate-limited refusal log.
#include <cstdarg>
#include <cstdio>
#include <mutex>

#include "coordinator/session.h"
#include "coordinator/state.h"
#include "proto/hmac.h"

namespace mprefill::coord {

namespace {

std::string digest_hex(const std::string& secret) {
  auto d = wire::sha256(secret);
  return wire::to_hex(d.data(), d.size());
}

// A name from the wire, safe to echo in one line.
std::string printable(const std::string& s) {
  std::string out;
  for (char c : s.substr(0, 64)) out += (c >= 0x20 && c < 0x7f) ? c : '?';
  return s.size() > 64 ? out + "..." : out;
}

}  // namespace

void Coordinator::Impl::log_limited(LogLimiter& l, const char* what, const char* fmt, va_list ap) {
  if (!opt.log) return;
  uint64_t held = 0;
  if (!l.admit(&held)) {
    ++log_suppressed;
    return;
  }
  char msg[1024];
  std::vsnprintf(msg, sizeof(msg), fmt, ap);
  if (held)
    log("%s (and %llu similar %s in the last second(s), not logged)", msg,
        static_cast<unsigned long long>(held), what);
  else
    log("%s", msg);
}

void Coordinator::Impl::log_refusal(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  log_limited(refusal_log, "refusals", fmt, ap);
  va_end(ap);
}

void Coordinator::Impl::log_job_refusal(const std::string& owner, const char* fmt, ...) {
  LogLimiter* l = &refusal_log;
  if (!owner.empty()) {
    std::lock_guard<std::mutex> lk(key_logs_mu);
    l = &key_logs[owner];  // std::map nodes stay put
  }
  va_list ap;
  va_start(ap, fmt);
  log_limited(*l, "refused jobs", fmt, ap);
  va_end(ap);
}

void Coordinator::Impl::log_connect(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  log_limited(connect_log, "client connections", fmt, ap);
  va_end(ap);
}

namespace {
std::string too_many(int64_t open, int cap) {
  return "too many connections: " + std::to_string(open) + " open (--max-connections " +
         std::to_string(cap) + ")";
}
}  // namespace

std::vector<SessionPtr> Coordinator::Impl::enter_pre_hello(const SessionPtr& s, std::string* full) {
  std::vector<SessionPtr> out;
  std::lock_guard<std::mutex> lk(mu);
  const int64_t authenticated = static_cast<int64_t>(sessions.size()) - pre_hello;
  if (authenticated >= opt.max_connections) {
    ++metrics.refused_connections;
    *full = too_many(authenticated, opt.max_connections);
    return out;
  }
  while (!pre_hello_fifo.empty()) {  // drop entries that left the pool
    auto front = pre_hello_fifo.front().lock();
    if (front && front->pre_hello) break;
    pre_hello_fifo.pop_front();
  }
  while (pre_hello >= opt.max_pre_hello && !pre_hello_fifo.empty()) {
    auto old = pre_hello_fifo.front().lock();
    pre_hello_fifo.pop_front();
    if (!old || !old->pre_hello) continue;
    old->pre_hello = false;
    --pre_hello;
    ++metrics.pre_hello_closed;
    out.push_back(std::move(old));
  }
  sessions.insert(s.get());
  s->pre_hello = true;
  ++pre_hello;
  pre_hello_fifo.push_back(s);
  metrics.connections = static_cast<int64_t>(sessions.size());
  metrics.pre_hello = pre_hello;
  return out;
}

std::string Coordinator::Impl::leave_pre_hello(Session* s) {
  std::lock_guard<std::mutex> lk(mu);
  if (s->pre_hello) {
    s->pre_hello = false;
    --pre_hello;
    metrics.pre_hello = pre_hello;
  }
  const int64_t peers = static_cast<int64_t>(sessions.size()) - pre_hello;  // s included
  if (peers <= opt.max_connections) {
    s->authenticated = true;
    return "";
  }
  ++metrics.refused_connections;
  return too_many(peers - 1, opt.max_connections);
}

std::string Coordinator::Impl::hello_key(const v1::ClientHello& h, std::string* secret,
                                         std::string* identity, bool* admin,
                                         std::string* key_digest, v1::ErrorCode* code) {
  *code = v1::UNAUTHENTICATED;
  *identity = "";
  *admin = h.role() == v1::CLIENT;  // without client keys a client sees every job
  if (!client_keys || h.role() != v1::CLIENT) {
    if (!h.key_id().empty())
      return client_keys ? std::string("a ") + role_name(h.role()) +
                               " proves the infrastructure secret (--secret-file), "
                               "not a client key"
                         : "this coordinator has no client keys: use its shared secret";
    *secret = opt.secret;
    *key_digest = "";
    return "";
  }
  if (h.key_id().empty())
    return "this coordinator takes client keys: pass --key-file with your client key";
  auto keys = client_keys->keys();
  auto it = keys->find(h.key_id());
  if (it == keys->end()) return "unknown client key '" + printable(h.key_id()) + "'";
  *secret = it->second.secret;
  *identity = it->second.name;
  *admin = it->second.admin;
  *key_digest = digest_hex(it->second.secret);
  return "";
}

bool Coordinator::Impl::reserve_large_frame(size_t n) {
  int64_t cur = large_frame_bytes.load();
  for (;;) {
    if (cur + static_cast<int64_t>(n) > static_cast<int64_t>(opt.max_large_frame_bytes))
      return false;
    if (large_frame_bytes.compare_exchange_weak(cur, cur + static_cast<int64_t>(n))) return true;
  }
}

void Coordinator::Impl::release_large_frame(size_t n) {
  large_frame_bytes -= static_cast<int64_t>(n);
}

void Coordinator::Impl::check_client_keys(bool force) {
  if (!client_keys) return;
  std::string error;
  const bool changed = client_keys->reload(force, &error);  // file I/O off mu
  if (!error.empty()) log("%s", error.c_str());
  if (!changed) return;
  auto keys = client_keys->keys();
  std::vector<std::pair<SessionPtr, std::string>> revoked;
  {
    std::lock_guard<std::mutex> lk(mu);
    for (Session* s : sessions) {
      if (!s->authenticated || s->role() != v1::CLIENT || s->owner().empty()) continue;
      auto it = keys->find(s->owner());
      if (it != keys->end() && digest_hex(it->second.secret) == s->key_digest()) continue;
      revoked.emplace_back(s->shared_from_this(), s->owner());
    }
  }
  log("client keys reloaded from %s: %zu key(s); %zu connection(s) of removed or changed keys "
      "closed",
      client_keys->path().c_str(), keys->size(), revoked.size());
  for (auto& [s, name] : revoked)
    s->send_error_and_close(0, v1::UNAUTHENTICATED, "client key '" + name + "' was revoked");
}

void Coordinator::reload_client_keys() { impl_->check_client_keys(true); }

}  // namespace mprefill::coord
