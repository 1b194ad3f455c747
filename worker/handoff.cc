#include "worker/handoff.h"

#include <stdexcept>
#include <utility>

namespace mprefill::worker {

namespace {

kv::SenderSite site_of(const Executor& exec, int local_rank) {
  kv::SenderSite s;
  s.device_kv = exec.caps().nccl_kv;
  s.device = exec.backend() == Backend::kCuda ? local_rank : -1;
  return s;
}

}  // namespace

std::vector<std::string> served_kv_transports(const Executor& exec) {
  return kv::sender_transports(site_of(exec, 0));
}

void check_kv_transport(const v1::Assignment& job, const Executor& exec) {
  const std::string why = kv::sender_refusal(job.options().kv_transport(), site_of(exec, 0));
  if (!why.empty()) throw std::runtime_error(why);
}

std::unique_ptr<Handoff> make_handoff(const v1::Assignment& job, const HandoffParams& p,
                                      const Executor& exec) {
  KvHandoffOptions ho;
  ho.job_id = job.job_id();
  ho.rank = p.rank;
  ho.host = job.decoder().host();
  ho.port = static_cast<uint16_t>(job.decoder().port());
  ho.secret = p.secret;
  ho.tls.enabled = job.decoder().tls();
  ho.tls.ca_file = p.tls_ca;
  ho.name = "worker-rank-" + std::to_string(p.rank);
  ho.contract = p.contract;
  ho.timeout_ms = job.handoff_timeout_ms() > 0 ? static_cast<int>(job.handoff_timeout_ms())
                                               : p.default_timeout_ms;
  ho.streams = p.streams;
  ho.defer_errors = true;  // keep the layer loop in step with the other ranks
  return kv::make_sender(job.options().kv_transport(), std::move(ho), site_of(exec, p.local_rank));
}

}  // namespace mprefill::worker
