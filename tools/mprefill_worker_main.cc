// mprefill-worker: one worker group of the prefill service (issue 6), launched as
//   mpirun -np N mprefill-worker --coordinator HOST:PORT --model PATH --tp T
// Every rank loads the model (its tensor-parallel slices under DistEngine); rank 0 holds
// the group's one coordinator connection (register, heartbeats, assignments, progress,
// results) and relays to the other ranks over MPI on a control communicator of its own.
// On an Assignment every rank prefills its shard (DistEngine over tp x sp = N ranks, or
// the single-process Engine when N == 1) and pushes each layer's KV pages to the job's
// decoder (TcpKvHandoff); rank 0 samples the first token and answers WorkerDone, or
// WorkerFailed naming the rank. Every wait is bounded: idle ranks hear from rank 0 at
// least every second (a tick), and a rank that stops answering fails the group.
#include <mpi.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "comm/mpi_comm.h"
#include "engine/executor.h"
#include "kernels/cpu/cpu.h"
#include "kv/kv_handoff.h"
#include "model/fingerprint.h"
#include "model/prompt.h"
#include "model/sampler.h"
#include "model/sparse_policy.h"
#include "model/weights.h"
#include "proto/wire.h"
#include "tools/cli_args.h"
#ifdef MPREFILL_HAVE_NCCL_KV
#include "kv/cuda/nccl_kv_sink.h"
#endif

namespace {

using mprefill::cli::hostname;
using mprefill::cli::parse_int;
using mprefill::cli::UsageError;

using namespace mprefill;
namespace v1 = ::mprefill::v1;
using Clock = std::chrono::steady_clock;

const char* kUsage =
    "usage: mpirun -np N mprefill-worker --coordinator HOST:PORT --model PATH [--tp T]\n"
    "                                    [--device cpu|cuda] [--group NAME] [--secret-file F]\n"
    "                                    [--threads N] [--kv-streams S] [--page-tokens P]\n"
    "                                    [--comm-timeout-ms MS]\n"
    "                                    [--handoff-timeout-ms MS] [--connect-timeout-ms MS]\n"
    "                                    [--reconnect-s S]\n"
    "One worker group of the prefill service: N MPI ranks, tp x sp = N (sp = N / tp).\n"
    "  --coordinator HOST:PORT  the coordinator (rank 0 connects and registers the group)\n"
    "  --model PATH             HF directory, llama2.c .bin, or random:NAME[:SEED]; the\n"
    "                           decoder must load the same weights (fingerprint checked)\n"
    "  --tp T                   tensor-parallel ranks (divides N and the KV heads; default 1)\n"
    "  --device cpu|cuda        the executor's backend (engine/executor.h): cpu runs every\n"
    "                           tp x sp shape (one rank: tp 1 x sp 1); cuda runs each rank on\n"
    "                           the GPU of its node-local rank (CUDA builds; several ranks\n"
    "                           need NCCL); the KV is copied to host for the TCP handoff, or\n"
    "                           sent from the GPU by NCCL for kv_transport nccl jobs (one rank)\n"
    "  --group NAME             group name (default worker-HOSTNAME-PID)\n"
    "  --secret-file F          shared secret for the coordinator and decoder hellos\n"
    "  --threads N              CPU threads per rank (default: all cores or MPREFILL_THREADS)\n"
    "  --kv-streams S           TCP streams per rank to the decoder (default 1)\n"
    "  --page-tokens P          tokens per KV page (default 256; the decoder must agree)\n"

    "  --comm-timeout-ms MS     bound of every MPI wait (default 120000)\n"
    "  --handoff-timeout-ms MS  bound of each wait on the decoder when the Assignment gives\n"
    "                           none (default 30000)\n"
    "  --connect-timeout-ms MS  bound on connecting to the coordinator (default 10000)\n"
    "  --reconnect-s S          a lost coordinator: rank 0 re-registers the group for up to\n"
    "                           S s (backoff 0.1 s doubling to 2 s), then the group exits 1\n"
    "                           (default 60; 0: exit 1 at once)\n"
    "Exit status: 0 on SIGINT/SIGTERM; 1 on a failure (refused registration, a rank that\n"
    "stopped answering, a coordinator not back within --reconnect-s); 2 on bad arguments.\n";

struct Args {
  std::string coordinator, model, device = "cpu", group, secret_file;
  int tp = 1, threads = 0, streams = 1, page_tokens = kDefaultPageTokens;
  int comm_timeout_ms = 120000, handoff_timeout_ms = 30000, connect_timeout_ms = 10000;
  int reconnect_s = 60;
  bool help = false;
};

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--help" || flag == "-h")
      a.help = true;
    else if (flag == "--coordinator")
      a.coordinator = value();
    else if (flag == "--model")
      a.model = value();
    else if (flag == "--tp")
      a.tp = parse_int(flag, value(), 1, 4096);
    else if (flag == "--device")
      a.device = value();
    else if (flag == "--group")
      a.group = value();
    else if (flag == "--secret-file")
      a.secret_file = value();
    else if (flag == "--threads")
      a.threads = parse_int(flag, value(), 1, 4096);
    else if (flag == "--kv-streams")
      a.streams = parse_int(flag, value(), 1, 64);
    else if (flag == "--page-tokens")
      a.page_tokens = parse_int(flag, value(), 1, 1 << 20);
    else if (flag == "--comm-timeout-ms")
      a.comm_timeout_ms = parse_int(flag, value(), 100, 86400000);
    else if (flag == "--handoff-timeout-ms")
      a.handoff_timeout_ms = parse_int(flag, value(), 100, 86400000);
    else if (flag == "--connect-timeout-ms")
      a.connect_timeout_ms = parse_int(flag, value(), 100, 600000);
    else if (flag == "--reconnect-s")
      a.reconnect_s = parse_int(flag, value(), 0, 86400);
    else
      throw UsageError("unknown option '" + flag + "' (see --help)");
  }
  if (a.help) return a;
  if (a.coordinator.empty()) throw UsageError("--coordinator HOST:PORT is required");
  if (a.model.empty()) throw UsageError("--model PATH is required");
  if (a.device != "cpu" && a.device != "cuda")
    throw UsageError("--device must be cpu or cuda, got '" + a.device + "'");
  return a;
}

std::atomic<bool> g_stop{false};
void on_signal(int) { g_stop = true; }

uint64_t meminfo_bytes(const char* key) {  // /proc/meminfo "MemAvailable:  123 kB"
  std::ifstream f("/proc/meminfo");
  std::string k;
  uint64_t v = 0;
  std::string unit;
  while (f >> k >> v >> unit)
    if (k == key) return v * 1024;
  return 0;
}

int64_t unix_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// ---- control channel (MPI, its own communicator) -------------------------------------

// A failed or timed-out control collective: the group is out of step and must exit.
struct CommFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Control {
 public:
  explicit Control(std::unique_ptr<comm::Communicator> c) : c_(std::move(c)) {}
  int rank() const { return c_->rank(); }
  int size() const { return c_->size(); }

  // Rank 0's bytes on every rank.
  void bcast(std::string* s) {
    int64_t len = rank() == 0 ? static_cast<int64_t>(s->size()) : 0;
    check(c_->broadcast(&len, 1, DType::kI64, 0, nullptr), "broadcast of a length");
    std::vector<int32_t> buf((len + 3) / 4);
    if (rank() == 0 && len > 0) std::memcpy(buf.data(), s->data(), len);
    if (!buf.empty())
      check(c_->broadcast(buf.data(), buf.size(), DType::kI32, 0, nullptr), "broadcast");
    s->assign(reinterpret_cast<const char*>(buf.data()), len);
  }

  // Every rank's fixed-size text record (truncated to kRecord - 1 bytes).
  std::vector<std::string> all_gather(const std::string& mine) {
    static constexpr size_t kRecord = 1024;
    std::vector<int32_t> rec(kRecord / 4, 0), all(kRecord / 4 * size(), 0);
    std::memcpy(rec.data(), mine.data(), std::min(mine.size(), kRecord - 1));
    check(c_->all_gather(rec.data(), all.data(), rec.size(), DType::kI32, nullptr), "all_gather");
    std::vector<std::string> out;
    for (int r = 0; r < size(); ++r) {
      const char* p = reinterpret_cast<const char*>(all.data() + r * rec.size());
      out.emplace_back(p, strnlen(p, kRecord));
    }
    return out;
  }

  // The first rank whose error is non-empty (-1: none) and its message, on every rank.
  int agree(const std::string& my_error, std::string* msg) {
    const auto all = all_gather(my_error);
    for (int r = 0; r < size(); ++r)
      if (!all[r].empty()) {
        *msg = all[r];
        return r;
      }
    return -1;
  }

  int64_t max(int64_t v) {
    int64_t out = 0;
    check(c_->all_reduce(&v, &out, 1, DType::kI64, comm::ReduceOp::kMax, nullptr), "all_reduce");
    return out;
  }
  double sum(double v) {
    // Sums of non-negative byte counts and times fit in int64 microunits.
    int64_t in = static_cast<int64_t>(v), out = 0;
    check(c_->all_reduce(&in, &out, 1, DType::kI64, comm::ReduceOp::kSum, nullptr), "all_reduce");
    return static_cast<double>(out);
  }

 private:
  std::unique_ptr<comm::Communicator> c_;
  void check(Status st, const char* what) {
    if (st != Status::kOk)
      throw CommFailure(std::string("control ") + what + ": " + c_->last_error());
  }
};

// Commands rank 0 broadcasts to the group.
enum Cmd : int64_t { kTick = 0, kJob = 1, kExit = 2, kExitFailed = 3 };

// ---- rank 0: the coordinator link --------------------------------------------------------

class CoordinatorLink {
 public:
  CoordinatorLink(std::unique_ptr<wire::Connection> conn, int heartbeat_ms)
      : conn_(std::move(conn)), heartbeat_ms_(heartbeat_ms) {
    reader_ = std::thread([this] { read_loop(); });
    beater_ = std::thread([this] { beat_loop(); });
  }
  ~CoordinatorLink() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    conn_->close();
    reader_.join();
    beater_.join();
  }

  // Never throws: a lost coordinator shows up as closed().
  void send(const v1::Envelope& env) {
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

  // The next message within timeout_ms (nullopt on timeout or a closed link).
  std::optional<v1::Envelope> next(int timeout_ms) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms),
                 [&] { return closed_ || !inbox_.empty(); });
    if (inbox_.empty()) return std::nullopt;
    v1::Envelope e = std::move(inbox_.front());
    inbox_.pop_front();
    return e;
  }
  bool closed() {
    std::lock_guard<std::mutex> lock(mu_);
    return closed_;
  }
  // CancelJob for this job arrived (consumed).
  bool cancelled(uint64_t job) {
    std::lock_guard<std::mutex> lock(mu_);
    return cancelled_ == job && job != 0;
  }
  void set_running(uint64_t job) { running_ = job; }

 private:
  std::unique_ptr<wire::Connection> conn_;
  int heartbeat_ms_;
  std::mutex mu_, send_mu_;
  std::condition_variable cv_;
  std::deque<v1::Envelope> inbox_;
  bool stop_ = false, closed_ = false;
  uint64_t cancelled_ = 0;
  std::atomic<uint64_t> running_{0};
  std::thread reader_, beater_;

  void read_loop() {
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

  void beat_loop() {
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
};

// ---- the group -------------------------------------------------------------------------

// The job's KV handoff: TcpKvHandoff, or (kv_transport "nccl", GPU ranks) NcclKvSink.
class Handoff : public KvSink {
 public:
  explicit Handoff(std::unique_ptr<TcpKvHandoff> tcp) : tcp_(std::move(tcp)) {}
#ifdef MPREFILL_HAVE_NCCL_KV
  explicit Handoff(std::unique_ptr<gpu::NcclKvSink> nccl) : nccl_(std::move(nccl)) {}
#endif
  void put(const KvSlice& s) override { tcp_ ? tcp_->put(s) : nccl_put(s); }
  void finish() override { tcp_ ? tcp_->finish() : nccl_finish(); }
  bool takes_device_slices() const override { return !tcp_; }
  bool failed() const { return tcp_ ? tcp_->failed() : nccl_failed(); }
  std::string error() const { return tcp_ ? tcp_->error() : nccl_error(); }
  KvHandoffStats stats() const { return tcp_ ? tcp_->stats() : nccl_stats(); }

 private:
  std::unique_ptr<TcpKvHandoff> tcp_;
#ifdef MPREFILL_HAVE_NCCL_KV
  std::unique_ptr<gpu::NcclKvSink> nccl_;
  void nccl_put(const KvSlice& s) { nccl_->put(s); }
  void nccl_finish() { nccl_->finish(); }
  bool nccl_failed() const { return nccl_->failed(); }
  std::string nccl_error() const { return nccl_->error(); }
  KvHandoffStats nccl_stats() const { return nccl_->stats(); }
#else
  void nccl_put(const KvSlice&) {}
  void nccl_finish() {}
  bool nccl_failed() const { return false; }
  std::string nccl_error() const { return ""; }
  KvHandoffStats nccl_stats() const { return {}; }
#endif
};

struct Cancelled : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct HandoffStop : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Worker {
 public:
  Worker(const Args& a, const comm::WorldInfo& wi) : a_(a), wi_(wi) {}

  int run() {
    world_ = comm::make_mpi_communicator(MPI_COMM_WORLD, {a_.comm_timeout_ms});
    ctl_ = std::make_unique<Control>(
        comm::make_mpi_communicator(MPI_COMM_WORLD, {a_.comm_timeout_ms}));
    if (!load()) return 1;
    if (!register_group()) return 1;
    return serve();
  }

 private:
  Args a_;
  comm::WorldInfo wi_;
  std::unique_ptr<comm::Communicator> world_;
  std::unique_ptr<Control> ctl_;
  std::unique_ptr<Executor> exec_;
  ModelConfig cfg_;
  v1::KvContract contract_;
  std::string secret_;
  std::unique_ptr<CoordinatorLink> link_;  // rank 0
  // Every rank's RankInfo text and the registered group name (rank 0 registers with them).
  std::vector<std::string> infos_;
  std::string group_;
  // Rank 0 after losing the coordinator (reconnect_step).
  bool lost_ = false;
  Clock::time_point lost_at_, next_try_;
  int backoff_ms_ = 100;
  std::string last_reconnect_error_;
  int tp_ = 1, sp_ = 1;

  bool root() const { return wi_.rank == 0; }
  bool on_gpu() const { return exec_ && exec_->backend() == Backend::kCuda; }
  const char* executor_name() const { return exec_ ? exec_->name() : "none"; }
  void log(const char* fmt, const std::string& s) {
    if (root()) std::fprintf(stderr, fmt, s.c_str());
  }

  // Every rank loads its part; rank 0 computes the fingerprint and shares the contract.
  bool load() {
    std::string err;
    try {
      if (!a_.secret_file.empty()) secret_ = wire::load_secret_file(a_.secret_file);
      if (wi_.size % a_.tp != 0)
        throw std::runtime_error("--tp " + std::to_string(a_.tp) + " does not divide the " +
                                 std::to_string(wi_.size) + " ranks");
      tp_ = a_.tp;
      sp_ = wi_.size / a_.tp;
      ExecutorSpec spec;
      spec.backend = parse_backend(a_.device);
      spec.model = a_.model;
      spec.topo = DistTopology{tp_, sp_};
      spec.device = wi_.local_rank;
      spec.comm_timeout_ms = a_.comm_timeout_ms;
      exec_ = make_executor(spec, world_.get());
      cfg_ = exec_->config();
      if (cfg_.n_kv_heads % tp_ != 0)
        throw std::runtime_error("--tp " + std::to_string(tp_) + " does not divide the " +
                                 std::to_string(cfg_.n_kv_heads) + " KV heads");
      if (root()) {
        // Executors hold only their slices: digest the weight files a chunk at a time.
        const ModelFingerprint fp = model_fingerprint_of_path(a_.model);
        contract_ = make_kv_contract(fp, a_.page_tokens, v1::F32);
      }
    } catch (const std::exception& e) {
      err = e.what();
    }
    try {
      std::string msg;
      const int bad = ctl_->agree(err, &msg);
      if (bad >= 0) {
        if (root()) std::fprintf(stderr, "mprefill-worker: rank %d: %s\n", bad, msg.c_str());
        return false;
      }
      std::string c = root() ? contract_.SerializeAsString() : "";
      ctl_->bcast(&c);
      if (!contract_.ParseFromString(c))
        throw CommFailure("KV contract did not survive the broadcast");
    } catch (const std::exception& e) {
      std::fprintf(stderr, "mprefill-worker: rank %d: %s\n", wi_.rank, e.what());
      return false;
    }
    return true;
  }

  // Rank 0: connects, proves the secret, sends WorkerRegister (every rank's RankInfo from
  // infos_) within timeout_ms each, and sets link_. "" on success, else the reason;
  // *refused when the coordinator said no (retrying cannot help).
  std::string connect_and_register(int timeout_ms, bool* refused) {
    *refused = false;
    if (group_.empty())
      group_ =
          a_.group.empty() ? "worker-" + hostname() + "-" + std::to_string(getpid()) : a_.group;
    const std::string& group = group_;
    try {
      std::string host;
      uint16_t port = 0;
      wire::parse_host_port(a_.coordinator, &host, &port);
      auto conn = wire::Connection::connect(host, port, timeout_ms);
      conn->client_handshake(v1::WORKER, group, secret_, timeout_ms);
      v1::Envelope env;
      auto* r = env.mutable_worker_register();
      r->set_group(group);
      r->set_world(wi_.size);
      r->set_tp(tp_);
      r->set_sp(sp_);
      for (int i = 0; i < wi_.size; ++i) {
        std::vector<std::string> f;
        size_t at = 0;
        for (int k = 0; k < 4; ++k) {
          const size_t nl = infos_[i].find('\n', at);
          f.push_back(infos_[i].substr(at, nl == std::string::npos ? std::string::npos : nl - at));
          at = nl == std::string::npos ? infos_[i].size() : nl + 1;
        }
        auto* ri = r->add_ranks();
        ri->set_rank(i);
        ri->set_hostname(f[0]);
        ri->set_device(f[1]);
        ri->set_free_memory_bytes(std::strtoull(f[2].c_str(), nullptr, 10));
        ri->set_total_memory_bytes(std::strtoull(f[3].c_str(), nullptr, 10));
      }
      *r->mutable_kv() = contract_;
      r->add_kv_transports("tcp");
#ifdef MPREFILL_HAVE_NCCL_KV
      if (exec_->caps().nccl_kv) r->add_kv_transports("nccl");  // NcclKvSink
#endif
      conn->send(env, timeout_ms);
      v1::Envelope ans;
      if (!conn->recv(&ans, timeout_ms))
        throw std::runtime_error("no answer to WorkerRegister within " +
                                 std::to_string(timeout_ms) + " ms");
      if (ans.has_error()) {
        *refused = true;  // auth, fingerprint, a taken name: retrying does not help
        throw std::runtime_error(ans.error().message());
      }
      if (!ans.has_worker_registered()) {
        *refused = true;
        throw std::runtime_error("expected WorkerRegistered, got another message");
      }
      const int hb = ans.worker_registered().heartbeat_ms() > 0
                         ? static_cast<int>(ans.worker_registered().heartbeat_ms())
                         : 1000;
      link_ = std::make_unique<CoordinatorLink>(std::move(conn), hb);
      std::fprintf(stderr,
                   "mprefill-worker: group '%s' registered with %s: %d ranks (tp %d x sp %d), "
                   "model %s, %s executor\n",
                   group.c_str(), a_.coordinator.c_str(), wi_.size, tp_, sp_,
                   contract_.model().name().c_str(), executor_name());
    } catch (const wire::WireError& e) {
      *refused = e.kind() == wire::WireError::Kind::kAuth ||
                 e.kind() == wire::WireError::Kind::kBadVersion;
      return std::string("coordinator ") + a_.coordinator + ": " + e.what();
    } catch (const std::exception& e) {
      return std::string("coordinator ") + a_.coordinator + ": " + e.what();
    }
    return "";
  }

  bool register_group() {
    // Every rank's RankInfo, gathered on rank 0.
    const std::string info = hostname() + "\n" + a_.device + "\n" +
                             std::to_string(meminfo_bytes("MemAvailable:")) + "\n" +
                             std::to_string(meminfo_bytes("MemTotal:"));
    try {
      infos_ = ctl_->all_gather(info);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "mprefill-worker: rank %d: %s\n", wi_.rank, e.what());
      return false;
    }
    std::string result;  // rank 0: "" on success, else the reason
    if (root()) {
      bool refused = false;
      result = connect_and_register(a_.connect_timeout_ms, &refused);
    }
    try {
      ctl_->bcast(&result);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "mprefill-worker: rank %d: %s\n", wi_.rank, e.what());
      return false;
    }
    if (!result.empty()) {
      log("mprefill-worker: %s\n", result);
      return false;
    }
    return true;
  }

  // Rank 0, its link closed (coordinator crash / restart): one bounded re-registration
  // attempt per call, so that the other ranks keep meeting it in the command broadcast
  // (each call well inside --comm-timeout-ms). kTick to go on, kExitFailed to give up.
  int64_t reconnect_step() {
    const auto now = Clock::now();
    if (!lost_) {
      lost_ = true;
      lost_at_ = now;
      backoff_ms_ = 100;
      next_try_ = now;
      std::fprintf(stderr,
                   "mprefill-worker: coordinator gone; group '%s' re-registering with %s within "
                   "%d s\n",
                   group_.c_str(), a_.coordinator.c_str(), a_.reconnect_s);
    }
    const auto deadline = lost_at_ + std::chrono::seconds(a_.reconnect_s);
    if (now >= deadline) {
      std::fprintf(stderr,
                   "mprefill-worker: error: coordinator %s did not come back within %d s (last "
                   "attempt: %s); exiting\n",
                   a_.coordinator.c_str(), a_.reconnect_s,
                   last_reconnect_error_.empty() ? "none" : last_reconnect_error_.c_str());
      return kExitFailed;
    }
    if (now < next_try_) {
      std::this_thread::sleep_for(
          std::min<Clock::duration>(next_try_ - now, std::chrono::milliseconds(200)));
      return kTick;
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count();
    const int timeout = static_cast<int>(
        std::min<int64_t>({left, a_.connect_timeout_ms, a_.comm_timeout_ms / 4, 5000}));
    link_.reset();
    bool refused = false;
    const std::string err = connect_and_register(std::max(timeout, 100), &refused);
    if (err.empty()) {
      std::fprintf(stderr, "mprefill-worker: group '%s' re-registered after %.1f s\n",
                   group_.c_str(), std::chrono::duration<double>(Clock::now() - lost_at_).count());
      lost_ = false;
      last_reconnect_error_.clear();
      return kTick;
    }
    last_reconnect_error_ = err;
    if (refused) {
      std::fprintf(stderr, "mprefill-worker: error: %s; exiting\n", err.c_str());
      return kExitFailed;
    }
    next_try_ = Clock::now() + std::chrono::milliseconds(backoff_ms_);
    backoff_ms_ = std::min(backoff_ms_ * 2, 2000);
    return kTick;
  }

  // Rank 0 turns coordinator messages into group commands; every rank follows them.
  int serve() {
    for (;;) {
      std::string cmd, payload;
      if (root()) {
        int64_t c = kTick;
        if (g_stop) {
          c = kExit;
        } else if (!link_ || link_->closed()) {  // no link_: between reconnect attempts
          c = reconnect_step();
        } else if (auto env = link_->next(500)) {
          if (env->has_assignment()) {
            c = kJob;
            payload = env->assignment().SerializeAsString();
          } else if (env->has_error()) {
            std::fprintf(stderr, "mprefill-worker: coordinator error: %s\n",
                         env->error().message().c_str());
          }  // CancelJob of a job not running, duplicates: nothing to do
        }
        cmd = std::to_string(c);
      }
      try {
        ctl_->bcast(&cmd);
        const int64_t c = std::stoll(cmd);
        if (c == kExit) {
          log("mprefill-worker: %s\n", "stopping (signal)");
          return 0;
        }
        if (c == kExitFailed) return 1;  // rank 0 said why
        if (c == kJob) {
          ctl_->bcast(&payload);
          v1::Assignment job;
          if (!job.ParseFromString(payload))
            throw CommFailure("assignment did not survive the broadcast");
          run_job(job);
        }
      } catch (const CommFailure& e) {
        std::fprintf(stderr, "mprefill-worker: rank %d: group out of step: %s\n", wi_.rank,
                     e.what());
        if (root() && link_) {
          v1::Envelope f;
          f.mutable_worker_failed()->set_job_id(0);
          f.mutable_worker_failed()->set_rank(wi_.rank);
          f.mutable_worker_failed()->set_message(std::string("group failed: ") + e.what());
          link_->send(f);
          link_.reset();
        }
        comm::abort_world(1);  // peers may be blocked in a collective: end them all
      }
    }
  }

  void send_failed(uint64_t job, int rank, const std::string& msg) {
    if (!root()) return;
    std::fprintf(stderr, "mprefill-worker: job %llu failed on rank %d: %s\n",
                 static_cast<unsigned long long>(job), rank, msg.c_str());
    v1::Envelope f;
    f.mutable_worker_failed()->set_job_id(job);
    f.mutable_worker_failed()->set_rank(rank);
    f.mutable_worker_failed()->set_message(msg);
    link_->send(f);
  }

  void run_job(const v1::Assignment& job) {
    const uint64_t id = job.job_id();
    if (root()) link_->set_running(id);
    struct Idle {
      CoordinatorLink* l;
      ~Idle() {
        if (l) l->set_running(0);
      }
    } idle{root() ? link_.get() : nullptr};
    const auto t0 = Clock::now();
    const std::vector<int> ids(job.token_ids().begin(), job.token_ids().end());
    const v1::JobOptions& o = job.options();

    // 1. Policy and handoff streams (errors here leave the group in step: keep serving).
    std::string err;
    SparsePolicy policy;
    AuditOptions audit;
    std::unique_ptr<Handoff> sink;
    try {
      check_prompt_ids(cfg_, ids);
      const bool nccl = o.kv_transport() == "nccl";
#ifdef MPREFILL_HAVE_NCCL_KV
      if (nccl && !exec_->caps().nccl_kv)
        throw std::runtime_error(std::string("KV transport 'nccl' is not served by this group's ") +
                                 exec_->name() +
                                 " executor (one --device cuda rank); it hands KV off over tcp");
#else
      if (nccl)
        throw std::runtime_error(
            "KV transport 'nccl' is not in this build of mprefill-worker "
            "(CUDA builds with NCCL)");
#endif
      if (!o.kv_transport().empty() && o.kv_transport() != "tcp" && !nccl)
        throw std::runtime_error("KV transport '" + o.kv_transport() +
                                 "' is not served by this group (tcp or nccl)");
      policy = load_sparse_policy(o.sparse().empty() ? "dense" : o.sparse(), cfg_,
                                  o.dense_below() > 0 ? o.dense_below() : kDefaultDenseBelow);
      policy.check_model(cfg_);
      audit.heads_per_layer = std::max(0, o.audit_heads());  // same on every rank
      PrefillRequest probe;
      probe.ids = &ids;
      probe.audit = audit;
      check_request(*exec_, probe);  // refused features: one message, before any work
      KvHandoffOptions ho;
      ho.job_id = id;
      ho.rank = wi_.rank;
      ho.host = job.decoder().host();
      ho.port = static_cast<uint16_t>(job.decoder().port());
      ho.secret = secret_;
      ho.name = "worker-rank-" + std::to_string(wi_.rank);
      ho.contract = contract_;
      ho.timeout_ms = job.handoff_timeout_ms() > 0 ? static_cast<int>(job.handoff_timeout_ms())
                                                   : a_.handoff_timeout_ms;
      ho.streams = a_.streams;
      ho.defer_errors = true;  // keep the layer loop in step with the other ranks
#ifdef MPREFILL_HAVE_NCCL_KV
      if (nccl)
        sink = std::make_unique<Handoff>(std::make_unique<gpu::NcclKvSink>(ho, wi_.local_rank));
      else
#endif
        sink = std::make_unique<Handoff>(std::make_unique<TcpKvHandoff>(ho));
    } catch (const std::exception& e) {
      err = e.what();
    }
    std::string msg;
    int bad = ctl_->agree(err, &msg);
    if (bad >= 0) return send_failed(id, bad, msg);

    // 2. Prefill with the KV handed off layer by layer; progress and cancel checks at
    // every layer boundary (collective on the control channel, so all ranks stop at
    // the same layer; a CUDA executor finishes the prefill first, engine/executor.h).
    std::vector<float> logits;
    PrefillStats stats;
    std::string prefill_err;
    bool fatal = false;
    // A cancelled job, or one whose handoff failed on any rank, stops at this boundary
    // on every rank (the failure itself is reported after the agreement below).
    auto progress = [&](int layer, int n_layers) {
      const int64_t stop = ctl_->max(sink->failed() ? 2 : (root() && link_->cancelled(id) ? 1 : 0));
      if (stop == 2) throw HandoffStop("KV handoff failed on some rank");
      if (stop == 1)
        throw Cancelled("job " + std::to_string(id) + " cancelled at layer " +
                        std::to_string(layer + 1) + " of " + std::to_string(n_layers));
      if (root()) {
        v1::Envelope p;
        p.mutable_worker_progress()->set_job_id(id);
        p.mutable_worker_progress()->set_layer(layer + 1);
        p.mutable_worker_progress()->set_n_layers(n_layers);
        link_->send(p);
      }
    };
    double kv_export_ms = 0;
    try {
      PrefillRequest req;
      req.ids = &ids;
      req.policy = &policy;
      req.audit = audit;
      req.progress = progress;
      PrefillResult r = exec_->prefill(req, sink.get());  // calls sink->finish()
      logits = std::move(r.logits);
      stats.tokens = r.tokens;
      stats.all_dense = r.all_dense;
      stats.total_ms = r.total_ms;
      stats.gemm_ms = r.gemm_ms;
      stats.attention_ms = r.attention_ms;
      stats.estimate_ms = r.estimate_ms;
      stats.audit = std::move(r.audit);
      kv_export_ms = r.kv_export_ms;
    } catch (const HandoffStop&) {
      // The ranks whose handoff failed report why (below); the others report nothing.
    } catch (const Cancelled& e) {
      prefill_err = e.what();
    } catch (const CommFailure&) {
      throw;
    } catch (const std::exception& e) {
      prefill_err = e.what();
      // A throw that is not the handoff's own (deferred) failure came from inside the
      // collective prefill: peers may be stuck or out of step.
      const bool collective = exec_->backend() == Backend::kCpu || wi_.size > 1;
      fatal = collective && !sink->failed();
    }
    if (sink->failed()) prefill_err = sink->error();  // the cause, where it happened
    const KvHandoffStats hs = sink->stats();
    sink.reset();  // streams closed

    bad = ctl_->agree(prefill_err, &msg);
    const int64_t any_fatal = ctl_->max(fatal ? 1 : 0);
    if (bad >= 0) {
      send_failed(id, bad, msg);
      if (any_fatal) throw CommFailure("prefill failed inside a collective: " + msg);
      return;
    }

    // 3. Totals over ranks, the first token, WorkerDone.
    const double kv_bytes = ctl_->sum(static_cast<double>(hs.bytes));
    // handoff_ms: the busiest rank's busy send time (kv_bytes / handoff_ms is the rate the
    // group's transport sustained; the sends themselves overlap the layers' compute).
    const double handoff_ms = ctl_->max(static_cast<int64_t>(hs.send_ms * 1000)) / 1000.0;
    const double tail_ms = ctl_->max(static_cast<int64_t>(hs.tail_ms * 1000)) / 1000.0;
    char line[512];
    std::snprintf(line, sizeof line, "%.3f %.3f %.3f %.3f %.3f", stats.total_ms, stats.gemm_ms,
                  stats.attention_ms, stats.estimate_ms, kv_export_ms + hs.copy_ms);
    const auto per_rank = ctl_->all_gather(line);
    if (!root()) return;
    SamplerOptions so;
    so.temperature = o.sampling().temperature();
    so.top_p = o.sampling().top_p() > 0.f ? o.sampling().top_p() : 1.f;
    so.seed = o.sampling().seed();
    v1::Envelope d;
    auto* done = d.mutable_worker_done();
    try {
      Sampler sampler(so);
      const SampledToken tok = sampler.sample(logits.data(), static_cast<int>(logits.size()));
      done->set_first_token_id(tok.id);
      done->set_first_token_logit(tok.logit);
    } catch (const std::exception& e) {
      return send_failed(id, 0, std::string("sampling the first token: ") + e.what());
    }
    done->set_job_id(id);
    for (const HeadAuditResult& h : stats.audit) {
      auto* m = done->add_audit();
      m->set_layer(h.layer);
      m->set_head(h.head);
      m->set_pattern(to_string(h.pattern.kind));
      m->set_recall(h.recall);
      m->set_output_rel_error(h.output_rel_error);
    }
    done->set_kv_bytes(static_cast<uint64_t>(kv_bytes));
    done->set_handoff_ms(handoff_ms);
    done->set_prefill_ms(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    for (const std::string& r : per_rank) {
      double v[5] = {};
      std::sscanf(r.c_str(), "%lf %lf %lf %lf %lf", &v[0], &v[1], &v[2], &v[3], &v[4]);
      auto* b = done->add_ranks();
      b->set_total_ms(v[0]);
      b->set_gemm_ms(v[1]);
      b->set_attention_ms(v[2]);
      b->set_estimate_ms(v[3]);
      b->set_kv_export_ms(v[4]);
    }
    link_->send(d);
    std::fprintf(stderr,
                 "mprefill-worker: job %llu done: %.0f KV bytes handed off, %.1f ms busy "
                 "sending, %.1f ms exposed after the last layer\n",
                 static_cast<unsigned long long>(id), kv_bytes, handoff_ms, tail_ms);
  }
};

}  // namespace

int main(int argc, char** argv) {
  Args a;
  try {
    a = parse_args(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "mprefill-worker: error: %s\n", e.what());
    return 2;
  }
  if (a.help) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  comm::MpiRuntime mpi(&argc, &argv);
  const comm::WorldInfo wi = comm::world_info();
  signal(SIGINT, on_signal);
  signal(SIGTERM, on_signal);
  signal(SIGPIPE, SIG_IGN);
  if (a.threads > 0) cpu::set_num_threads(a.threads);
  try {
    Worker w(a, wi);
    return w.run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mprefill-worker: rank %d: %s\n", wi.rank, e.what());
    return 1;
  }
}
