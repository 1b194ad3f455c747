// Admission of a prepared SubmitJob (intake.cc did the size caps, the prompt and the
// sparse policy before the lock): the option ranges, then under the lock the named group
// and decoder, capacity (KV bytes against the decoders, the per-rank estimate against the
// groups' free memory), the queue limit and the per-client limit. Every refusal is one line
// with the numbers that decided it; the connection is kept.
#include <algorithm>

#include "coordinator/session.h"
#include "coordinator/state.h"
#include "coordinator/transport_choice.h"

namespace mprefill::coord {

namespace {

// Sets the refusal's code and returns its message: `return bad(code, v1::X, "why")`.
std::string bad(v1::ErrorCode* code, v1::ErrorCode c, std::string why) {
  *code = c;
  return why;
}

}  // namespace

std::string Coordinator::Impl::check_options(const v1::JobOptions& o,
                                             const v1::ModelFingerprint& model, int64_t n,
                                             v1::ErrorCode* code) const {
  if (o.decode_tokens() < 0) return bad(code, v1::INVALID_ARGUMENT, "decode_tokens must be >= 0");
  if (n + o.decode_tokens() > model.max_position())
    return bad(code, v1::INVALID_ARGUMENT,
               "prompt of " + std::to_string(n) + " tokens + " + std::to_string(o.decode_tokens()) +
                   " decoded exceeds the model's max_position " +
                   std::to_string(model.max_position()));
  const auto& smp = o.sampling();
  if (!(smp.temperature() >= 0.0f) || smp.temperature() > 100.0f)
    return bad(code, v1::INVALID_ARGUMENT, "temperature must be in [0, 100]");
  if (!(smp.top_p() >= 0.0f && smp.top_p() <= 1.0f))
    return bad(code, v1::INVALID_ARGUMENT, "top_p must be in [0, 1]");
  for (int id : o.stop_ids())
    if (id < 0 || id >= model.vocab())
      return bad(code, v1::INVALID_ARGUMENT,
                 "stop id " + std::to_string(id) + " is outside [0, " +
                     std::to_string(model.vocab()) + ")");
  if (o.dense_below() < 0) return bad(code, v1::INVALID_ARGUMENT, "dense_below must be >= 0");
  if (o.audit_heads() < 0 || o.audit_heads() > model.n_heads())
    return bad(code, v1::INVALID_ARGUMENT,
               "audit_heads must be in [0, " + std::to_string(model.n_heads()) + "]");
  if (!known_kv_request(o.kv_transport()))
    return bad(code, v1::INVALID_ARGUMENT,
               "kv_transport must be tcp, nccl, ipc or auto, not '" + o.kv_transport() + "'");
  return "";
}

std::string Coordinator::Impl::admit_locked(const PreparedJob& p, uint64_t* kv,
                                            v1::ErrorCode* code) {
  if (groups.empty()) return bad(code, v1::UNAVAILABLE, "no worker group is registered");
  if (decoders.empty()) return bad(code, v1::UNAVAILABLE, "no decoder is registered");
  // The groups and decoders may all have changed while the job was prepared (the checks
  // and the policy were made for p.contract).
  if (!contract || !contract_difference(*contract, p.contract).empty())
    return bad(code, v1::UNAVAILABLE,
               "the service's model changed while the job was prepared; submit it again");
  const v1::JobOptions& o = p.options;
  if (!o.group().empty() && !groups.count(o.group()))
    return bad(code, v1::INVALID_ARGUMENT,
               "no worker group named '" + o.group() + "' is registered");
  if (!o.decoder().empty() && !decoders.count(o.decoder()))
    return bad(code, v1::INVALID_ARGUMENT, "no decoder named '" + o.decoder() + "' is registered");
  return check_capacity(o, static_cast<int64_t>(p.tokens.size()), kv, code);
}

// The KV must fit some eligible decoder's capacity, the per-rank estimate some eligible
// group's free memory.
std::string Coordinator::Impl::check_capacity(const v1::JobOptions& o, int64_t n, uint64_t* kv,
                                              v1::ErrorCode* code) {
  const v1::KvContract& kc = *contract;
  const auto& model = kc.model();
  // "auto" takes any pair (tcp at worst); "ipc" pairs are matched by host at dispatch.
  const std::string transport =
      o.kv_transport().empty() || o.kv_transport() == "auto" ? "tcp" : o.kv_transport();
  auto has = [&](const auto& list) {
    return std::find(list.begin(), list.end(), transport) != list.end();
  };
  if (transport == "ipc") {
    std::string why = "no worker group and decoder are registered for ipc";
    bool pair = false;
    for (const auto& [gn, g] : groups)
      for (const auto& [dn, d] : decoders) {
        if ((!o.group().empty() && gn != o.group()) || (!o.decoder().empty() && dn != o.decoder()))
          continue;
        const KvTransportChoice c = choose_kv_transport("ipc", site_of(g.reg), site_of(d.reg));
        if (!c.transport.empty())
          pair = true;
        else
          why = "group '" + gn + "', decoder '" + dn + "': " + c.why;
      }
    if (!pair) return bad(code, v1::UNAVAILABLE, "no pair for kv_transport ipc: " + why);
  }
  *kv = kv_bytes(kc, n);
  uint64_t best_cap = 0;
  std::string best_dec;
  for (const auto& [name, d] : decoders) {
    if (!o.decoder().empty() && name != o.decoder()) continue;
    if (!has(d.reg.kv_transports())) continue;
    if (d.reg.capacity_bytes() > best_cap) {
      best_cap = d.reg.capacity_bytes();
      best_dec = name;
    }
  }
  if (best_dec.empty())
    return bad(code, v1::UNAVAILABLE, "no registered decoder takes KV over " + transport);
  if (*kv > best_cap)
    return bad(code, v1::RESOURCE_EXHAUSTED,
               "KV of " + std::to_string(n) + " tokens needs " + format_bytes(*kv) + " (2 x " +
                   std::to_string(model.n_layers()) + " layers x " +
                   std::to_string(model.n_kv_heads()) + " kv heads x " +
                   std::to_string(model.head_dim()) + " x " +
                   std::to_string(dtype_bytes(kc.kv_dtype())) +
                   " bytes per token) but the largest decoder capacity is " +
                   format_bytes(best_cap) + " (decoder '" + best_dec + "')");
  std::string group_why;
  bool group_fits = false;
  for (const auto& [name, g] : groups) {
    if (!o.group().empty() && name != o.group()) continue;
    if (!has(g.reg.kv_transports())) continue;
    const uint64_t need = rank_bytes_estimate(kc, n, g.reg.tp(), g.reg.sp());
    bool fits = true;
    for (const auto& r : g.reg.ranks()) {
      if (r.free_memory_bytes() != 0 && r.free_memory_bytes() < need) {
        fits = false;
        group_why = "needs about " + format_bytes(need) + " per rank (tp " +
                    std::to_string(g.reg.tp()) + " x sp " + std::to_string(g.reg.sp()) +
                    ") but group '" + name + "' rank " + std::to_string(r.rank()) + " has " +
                    format_bytes(r.free_memory_bytes()) + " free";
        break;
      }
    }
    if (fits) {
      group_fits = true;
      break;
    }
  }
  if (!group_fits) {
    if (group_why.empty())
      return bad(code, v1::UNAVAILABLE, "no registered worker group sends KV over " + transport);
    return bad(code, v1::RESOURCE_EXHAUSTED,
               "prompt of " + std::to_string(n) + " tokens " + group_why);
  }
  if (static_cast<int64_t>(queue.size()) >= opt.queue_limit)
    return bad(code, v1::RESOURCE_EXHAUSTED,
               "queue full: " + std::to_string(queue.size()) + " jobs waiting (limit " +
                   std::to_string(opt.queue_limit) + ")");
  return "";
}

std::string Coordinator::Impl::client_limit_reason(const Session* s, int64_t tokens,
                                                   v1::ErrorCode* code) {
  int open = 0;        // this connection's unfinished jobs
  int owned = 0;       // this client key's unfinished jobs (all its connections)
  int64_t queued = 0;  // prompt tokens of this client key's queued jobs
  for (const auto& [id, j] : jobs) {
    if (terminal(j.state)) continue;
    open += j.client_raw == s;
    if (s->owner().empty() || j.owner != s->owner()) continue;
    ++owned;
    if (j.state == v1::QUEUED) queued += j.prompt_tokens;
  }
  *code = v1::RESOURCE_EXHAUSTED;
  if (open >= opt.max_jobs_per_client)
    return "this client has " + std::to_string(open) + " unfinished jobs (limit " +
           std::to_string(opt.max_jobs_per_client) + " per client)";
  if (s->owner().empty()) return "";
  if (owned >= opt.client_max_jobs)
    return "client '" + s->owner() + "' has " + std::to_string(owned) +
           " unfinished jobs (--client-max-jobs " + std::to_string(opt.client_max_jobs) + ")";
  if (queued + tokens > opt.client_max_queued_tokens)
    return "client '" + s->owner() + "' would have " + std::to_string(queued + tokens) +
           " prompt tokens queued (--client-max-queued-tokens " +
           std::to_string(opt.client_max_queued_tokens) + ")";
  return "";
}

}  // namespace mprefill::coord
