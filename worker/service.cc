#include "worker/service.h"

#include <mpi.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "comm/mpi_comm.h"
#include "engine/executor.h"
#include "kv/kv_handoff.h"
#include "model/fingerprint.h"
#include "worker/control.h"
#include "worker/coordinator_link.h"
#include "worker/handoff.h"
#include "worker/job_runner.h"

namespace mprefill::worker {

namespace {

using Clock = std::chrono::steady_clock;

std::atomic<bool> g_stop{false};
void on_signal(int) { g_stop = true; }

class Service {
 public:
  Service(const WorkerOptions& o, const comm::WorldInfo& wi) : o_(o), wi_(wi) {}

  int run() {
    world_ = comm::make_mpi_communicator(MPI_COMM_WORLD, {o_.comm_timeout_ms});
    ctl_ = std::make_unique<Control>(
        comm::make_mpi_communicator(MPI_COMM_WORLD, {o_.comm_timeout_ms}));
    if (!load()) return 1;
    if (!register_ranks()) return 1;
    return serve();
  }

 private:
  WorkerOptions o_;
  comm::WorldInfo wi_;
  std::unique_ptr<comm::Communicator> world_;
  std::unique_ptr<Control> ctl_;
  std::unique_ptr<Executor> exec_;
  v1::KvContract contract_;
  std::string secret_;
  DistTopology topo_;
  std::unique_ptr<CoordinatorLink> link_;  // rank 0
  std::vector<std::string> infos_;         // every rank's RankInfo record (rank 0 registers)
  std::string group_;
  // Rank 0 after losing the coordinator (reconnect_step).
  bool lost_ = false;
  Clock::time_point lost_at_, next_try_;
  int backoff_ms_ = 100;
  std::string last_reconnect_error_;

  bool root() const { return wi_.rank == 0; }
  void log(const std::string& s) {
    if (root()) std::fprintf(stderr, "mprefill-worker: %s\n", s.c_str());
  }

  // Every rank loads its part; rank 0 computes the fingerprint and shares the contract.
  bool load() {
    std::string err;
    try {
      if (!o_.secret_file.empty()) secret_ = wire::load_secret_file(o_.secret_file);
      if (wi_.size % o_.tp != 0)
        throw std::runtime_error("--tp " + std::to_string(o_.tp) + " does not divide the " +
                                 std::to_string(wi_.size) + " ranks");
      topo_ = DistTopology{o_.tp, wi_.size / o_.tp};
      ExecutorSpec spec;
      spec.backend = parse_backend(o_.device);
      spec.model = o_.model;
      spec.topo = topo_;
      spec.device = wi_.local_rank;
      spec.comm_timeout_ms = o_.comm_timeout_ms;
      exec_ = make_executor(spec, world_.get());
      const ModelConfig& cfg = exec_->config();
      if (cfg.n_kv_heads % topo_.tp != 0)
        throw std::runtime_error("--tp " + std::to_string(topo_.tp) + " does not divide the " +
                                 std::to_string(cfg.n_kv_heads) + " KV heads");
      if (root()) {
        // Executors hold only their slices: digest the weight files a chunk at a time.
        const ModelFingerprint fp = model_fingerprint_of_path(o_.model);
        contract_ = make_kv_contract(fp, o_.page_tokens);  // the model's KV dtype
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

  // Rank 0: connects and registers within timeout_ms, setting link_. "" on success,
  // else the reason; *refused when the coordinator said no (retrying cannot help).
  std::string connect_and_register(int timeout_ms, bool* refused) {
    *refused = false;
    if (group_.empty()) {
      char host[256] = {};
      gethostname(host, sizeof host - 1);
      group_ = o_.group.empty() ? "worker-" + std::string(host) + "-" + std::to_string(getpid())
                                : o_.group;
    }
    v1::WorkerRegister r;
    r.set_group(group_);
    r.set_world(wi_.size);
    r.set_tp(topo_.tp);
    r.set_sp(topo_.sp);
    for (int i = 0; i < wi_.size; ++i) *r.add_ranks() = parse_rank_info(i, infos_[i]);
    *r.mutable_kv() = contract_;
    for (const std::string& t : served_kv_transports(*exec_)) r.add_kv_transports(t);
    r.set_tp_any_placement(exec_->caps().any_tp_placement);
    try {
      link_ = register_group(o_.coordinator, secret_, r, timeout_ms, o_.tls_ca);
    } catch (const RegisterRefused& e) {
      *refused = true;
      return e.what();
    } catch (const std::exception& e) {
      return e.what();
    }
    std::fprintf(stderr,
                 "mprefill-worker: group '%s' registered with %s: %d ranks (tp %d x sp %d), "
                 "model %s, %s executor\n",
                 group_.c_str(), o_.coordinator.c_str(), wi_.size, topo_.tp, topo_.sp,
                 contract_.model().name().c_str(), exec_->name());
    return "";
  }

  bool register_ranks() {
    std::string result;  // rank 0: "" on success, else the reason
    try {
      infos_ = ctl_->all_gather(rank_info_record(o_.device));
      if (root()) {
        bool refused = false;
        result = connect_and_register(o_.connect_timeout_ms, &refused);
      }
      ctl_->bcast(&result);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "mprefill-worker: rank %d: %s\n", wi_.rank, e.what());
      return false;
    }
    if (!result.empty()) log(result);
    return result.empty();
  }

  int64_t reconnect_step();
  int64_t next_command(std::string* payload);
  void fail_group(const CommFailure& e);

  int serve() {
    for (;;) {
      std::string cmd, payload;
      if (root()) cmd = std::to_string(next_command(&payload));
      try {
        ctl_->bcast(&cmd);
        const int64_t c = std::stoll(cmd);
        if (c == kExit) {
          log("stopping (signal)");
          return 0;
        }
        if (c == kExitFailed) return 1;  // rank 0 said why
        if (c == kJob) {
          ctl_->bcast(&payload);
          v1::Assignment job;
          if (!job.ParseFromString(payload))
            throw CommFailure("assignment did not survive the broadcast");
          GroupContext g;
          g.opt = &o_;
          g.wi = wi_;
          g.topo = topo_;
          g.ctl = ctl_.get();
          g.exec = exec_.get();
          g.contract = &contract_;
          g.secret = secret_;
          g.link = root() ? link_.get() : nullptr;
          run_job(g, job);
        }
      } catch (const CommFailure& e) {
        fail_group(e);
      }
    }
  }
};

// Rank 0, its link closed (coordinator crash / restart): one bounded re-registration
// attempt per call, so that the other ranks keep meeting it in the command broadcast
// (each call well inside --comm-timeout-ms). kTick to go on, kExitFailed to give up.
int64_t Service::reconnect_step() {
  const auto now = Clock::now();
  if (!lost_) {
    lost_ = true;
    lost_at_ = now;
    backoff_ms_ = 100;
    next_try_ = now;
    std::fprintf(stderr,
                 "mprefill-worker: coordinator gone; group '%s' re-registering with %s within "
                 "%d s\n",
                 group_.c_str(), o_.coordinator.c_str(), o_.reconnect_s);
  }
  const auto deadline = lost_at_ + std::chrono::seconds(o_.reconnect_s);
  if (now >= deadline) {
    std::fprintf(stderr,
                 "mprefill-worker: error: coordinator %s did not come back within %d s (last "
                 "attempt: %s); exiting\n",
                 o_.coordinator.c_str(), o_.reconnect_s,
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
      std::min<int64_t>({left, o_.connect_timeout_ms, o_.comm_timeout_ms / 4, 5000}));
  link_.reset();
  bool refused = false;
  const std::string err = connect_and_register(std::max(timeout, 100), &refused);
  if (err.empty()) {
    std::fprintf(stderr, "mprefill-worker: group '%s' re-registered after %.1f s\n", group_.c_str(),
                 std::chrono::duration<double>(Clock::now() - lost_at_).count());
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

// Rank 0 turns coordinator messages into group commands.
int64_t Service::next_command(std::string* payload) {
  if (g_stop) return kExit;
  if (!link_ || link_->closed()) return reconnect_step();  // no link_: between attempts
  if (auto env = link_->next(500)) {
    if (env->has_assignment()) {
      *payload = env->assignment().SerializeAsString();
      return kJob;
    }
    if (env->has_error())
      std::fprintf(stderr, "mprefill-worker: coordinator error: %s\n",
                   env->error().message().c_str());
    // CancelJob of a job not running, duplicates: nothing to do
  }
  return kTick;
}

// The group is out of step: rank 0 tells the coordinator, then every rank ends (peers may
// be blocked in a collective).
void Service::fail_group(const CommFailure& e) {
  std::fprintf(stderr, "mprefill-worker: rank %d: group out of step: %s\n", wi_.rank, e.what());
  if (root() && link_) {
    v1::Envelope f;
    f.mutable_worker_failed()->set_job_id(0);
    f.mutable_worker_failed()->set_rank(wi_.rank);
    f.mutable_worker_failed()->set_message(std::string("group failed: ") + e.what());
    link_->send(f);
    link_.reset();
  }
  comm::abort_world(1);
}

}  // namespace

int run_service(const WorkerOptions& opt, int* argc, char*** argv) {
  comm::MpiRuntime mpi(argc, argv);
  const comm::WorldInfo wi = comm::world_info();
  signal(SIGINT, on_signal);
  signal(SIGTERM, on_signal);
  signal(SIGPIPE, SIG_IGN);
  try {
    // Every edge error of this process names its rank (and GPU: the node-local rank).
    set_edge_context(wi.rank, parse_backend(opt.device) == Backend::kCuda ? wi.local_rank : -1);
    Service s(opt, wi);
    return s.run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mprefill-worker: rank %d: %s\n", wi.rank, e.what());
    return 1;
  }
}

}  // namespace mprefill::worker
