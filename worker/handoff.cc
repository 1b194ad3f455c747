#include "worker/handoff.h"

#include <stdexcept>
#include <utility>
#ifdef MPREFILL_HAVE_NCCL
#include "kv/cuda/nccl_kv_sink.h"
#endif

namespace mprefill::worker {

namespace {

// Sink S (TcpKvHandoff, NcclKvSink) behind the Handoff interface.
template <class S>
class HandoffOf final : public Handoff {
 public:
  explicit HandoffOf(std::unique_ptr<S> s) : s_(std::move(s)) {}
  void put(const KvSlice& slice) override { s_->put(slice); }
  void finish() override { s_->finish(); }
  bool takes_device_slices() const override { return s_->takes_device_slices(); }
  bool failed() const override { return s_->failed(); }
  std::string error() const override { return s_->error(); }
  KvHandoffStats stats() const override { return s_->stats(); }

 private:
  std::unique_ptr<S> s_;
};

}  // namespace

std::vector<std::string> served_kv_transports(const Executor& exec) {
  std::vector<std::string> t{"tcp"};
#ifdef MPREFILL_HAVE_NCCL
  if (exec.caps().nccl_kv) t.push_back("nccl");  // NcclKvSink
#else
  (void)exec;
#endif
  return t;
}

void check_kv_transport(const v1::Assignment& job, const Executor& exec) {
  const std::string& t = job.options().kv_transport();
  const bool nccl = t == "nccl";
#ifdef MPREFILL_HAVE_NCCL
  if (nccl && !exec.caps().nccl_kv)
    throw std::runtime_error(std::string("KV transport 'nccl' is not served by this group's ") +
                             exec.name() +
                             " executor (one --device cuda rank); it hands KV off over tcp");
#else
  (void)exec;
  if (nccl)
    throw std::runtime_error(
        "KV transport 'nccl' is not in this build of mprefill-worker (CUDA builds with NCCL)");
#endif
  if (!t.empty() && t != "tcp" && !nccl)
    throw std::runtime_error("KV transport '" + t + "' is not served by this group (tcp or nccl)");
}

std::unique_ptr<Handoff> make_handoff(const v1::Assignment& job, const HandoffParams& p) {
  KvHandoffOptions ho;
  ho.job_id = job.job_id();
  ho.rank = p.rank;
  ho.host = job.decoder().host();
  ho.port = static_cast<uint16_t>(job.decoder().port());
  ho.secret = p.secret;
  ho.name = "worker-rank-" + std::to_string(p.rank);
  ho.contract = p.contract;
  ho.timeout_ms = job.handoff_timeout_ms() > 0 ? static_cast<int>(job.handoff_timeout_ms())
                                               : p.default_timeout_ms;
  ho.streams = p.streams;
  ho.defer_errors = true;  // keep the layer loop in step with the other ranks
#ifdef MPREFILL_HAVE_NCCL
  if (job.options().kv_transport() == "nccl")
    return std::make_unique<HandoffOf<gpu::NcclKvSink>>(
        std::make_unique<gpu::NcclKvSink>(ho, p.local_rank));
#endif
  return std::make_unique<HandoffOf<TcpKvHandoff>>(std::make_unique<TcpKvHandoff>(ho));
}

}  // namespace mprefill::worker
