#include "worker/coordinator_link.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "kv/kv_ipc.h"

namespace mprefill::worker {

namespace {

int64_t unix_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

uint64_t meminfo_bytes(const char* key) {  // /proc/meminfo "MemAvailable:  123 kB"
  std::ifstream f("/proc/meminfo");
  std::string k, unit;
  uint64_t v = 0;
  while (f >> k >> v >> unit)
    if (k == key) return v * 1024;
  return 0;
}

}  // namespace

CoordinatorLink::CoordinatorLink(std::unique_ptr<wire::Connection> conn, int heartbeat_ms)
    : conn_(std::move(conn)), heartbeat_ms_(heartbeat_ms) {
  reader_ = std::thread([this] { read_loop(); });
  beater_ = std::thread([this] { beat_loop(); });
}

CoordinatorLink::~CoordinatorLink() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  conn_->close();
  reader_.join();
  beater_.join();
}

void CoordinatorLink::send(const v1::Envelope& env) {
  std::lock_guard<std::mutex> lock(send_mu_);
  try {
    conn_->send(env, 10000);
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> l2(mu_);
    if (!closed_)
      std::fprintf(stderr, "mprefill-worker: sending to the coordinator: %s\n", e.what());
    closed_ = true;
    cv_.notify_all();
  }
}

std::optional<v1::Envelope> CoordinatorLink::next(int timeout_ms) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms),
               [&] { return closed_ || !inbox_.empty(); });
  if (inbox_.empty()) return std::nullopt;
  v1::Envelope e = std::move(inbox_.front());
  inbox_.pop_front();
  return e;
}

bool CoordinatorLink::closed() {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_;
}

bool CoordinatorLink::cancelled(uint64_t job) {
  std::lock_guard<std::mutex> lock(mu_);
  return cancelled_ == job && job != 0;
}

void CoordinatorLink::read_loop() {
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_ || closed_) return;
    }
    v1::Envelope env;
    try {
      if (!conn_->recv(&env, 200)) continue;
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!stop_)
        std::fprintf(stderr, "mprefill-worker: coordinator connection ended: %s\n", e.what());
      closed_ = true;
      cv_.notify_all();
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (env.has_cancel()) cancelled_ = env.cancel().job_id();
    inbox_.push_back(std::move(env));
    cv_.notify_all();
  }
}

void CoordinatorLink::beat_loop() {
  uint64_t seq = 0;
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_ && !closed_) {
    lock.unlock();
    v1::Envelope hb;
    hb.mutable_heartbeat()->set_seq(++seq);
    hb.mutable_heartbeat()->set_unix_ms(unix_ms());
    hb.mutable_heartbeat()->set_job_id(running_);
    send(hb);
    lock.lock();
    cv_.wait_for(lock, std::chrono::milliseconds(heartbeat_ms_), [&] { return stop_; });
  }
}

std::string rank_info_record(const std::string& device) {
  char host[256] = {};
  gethostname(host, sizeof host - 1);
  return std::string(host) + "\n" + device + "\n" + std::to_string(meminfo_bytes("MemAvailable:")) +
         "\n" + std::to_string(meminfo_bytes("MemTotal:")) + "\n" + kv::host_identity();
}

v1::RankInfo parse_rank_info(int rank, const std::string& record) {
  std::vector<std::string> f;
  size_t at = 0;
  for (int k = 0; k < 5; ++k) {
    const size_t nl = record.find('\n', at);
    f.push_back(record.substr(at, nl == std::string::npos ? std::string::npos : nl - at));
    at = nl == std::string::npos ? record.size() : nl + 1;
  }
  v1::RankInfo ri;
  ri.set_rank(rank);
  ri.set_hostname(f[0]);
  ri.set_device(f[1]);
  ri.set_free_memory_bytes(std::strtoull(f[2].c_str(), nullptr, 10));
  ri.set_total_memory_bytes(std::strtoull(f[3].c_str(), nullptr, 10));
  ri.set_host_id(f[4]);
  return ri;
}

std::unique_ptr<CoordinatorLink> register_group(const std::string& coordinator,
                                                const std::string& secret,
                                                const v1::WorkerRegister& reg, int timeout_ms,
                                                const std::string& tls_ca) {
  const std::string who = "coordinator " + coordinator + ": ";
  try {
    std::string host;
    uint16_t port = 0;
    wire::parse_host_port(coordinator, &host, &port);
    auto conn = wire::Connection::connect(host, port, timeout_ms, wire::kDefaultMaxFrame,
                                          wire::TlsClientOptions{false, tls_ca});
    conn->client_handshake(v1::WORKER, reg.group(), secret, timeout_ms);
    v1::Envelope env;
    *env.mutable_worker_register() = reg;
    conn->send(env, timeout_ms);
    v1::Envelope ans;
    if (!conn->recv(&ans, timeout_ms))
      throw std::runtime_error("no answer to WorkerRegister within " + std::to_string(timeout_ms) +
                               " ms");
    // Auth, fingerprint, a taken name: retrying does not help.
    if (ans.has_error()) throw RegisterRefused(who + ans.error().message());
    if (!ans.has_worker_registered())
      throw RegisterRefused(who + "expected WorkerRegistered, got another message");
    const int hb = ans.worker_registered().heartbeat_ms() > 0
                       ? static_cast<int>(ans.worker_registered().heartbeat_ms())
                       : 1000;
    return std::make_unique<CoordinatorLink>(std::move(conn), hb);
  } catch (const RegisterRefused&) {
    throw;
  } catch (const wire::WireError& e) {
    if (e.kind() == wire::WireError::Kind::kAuth || e.kind() == wire::WireError::Kind::kBadVersion)
      throw RegisterRefused(who + e.what());
    throw std::runtime_error(who + e.what());
  } catch (const std::exception& e) {
    throw std::runtime_error(who + e.what());
  }
}

}  // namespace mprefill::worker
