#include "worker/job_runner.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <stdexcept>

#include "model/sampler.h"
#include "proto/shard_plan.h"
#include "worker/assignment.h"
#include "worker/handoff.h"

namespace mprefill::worker {

namespace {

using Clock = std::chrono::steady_clock;

struct Cancelled : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct HandoffStop : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void send_failed(const GroupContext& g, uint64_t job, int rank, const std::string& msg) {
  if (!g.root()) return;
  std::fprintf(stderr, "mprefill-worker: job %llu failed on rank %d: %s\n",
               static_cast<unsigned long long>(job), rank, msg.c_str());
  v1::Envelope f;
  f.mutable_worker_failed()->set_job_id(job);
  f.mutable_worker_failed()->set_rank(rank);
  f.mutable_worker_failed()->set_message(msg);
  g.link->send(f);
}

// 1. The request and the handoff streams. false: reported (the group stays in step).
bool prepare(const GroupContext& g, const v1::Assignment& job, JobSpec* spec,
             std::unique_ptr<Handoff>* sink) {
  std::string err;
  try {
    *spec = decode_assignment(job, g.exec->config(), g.topo);
    check_kv_transport(job, *g.exec);
    PrefillRequest probe;
    probe.ids = &spec->ids;
    probe.audit = spec->audit;
    probe.sp_layout = spec->sp_layout;
    probe.tp_placement = spec->tp_placement;
    check_request(*g.exec, probe);  // refused features: one message, before any work
    HandoffParams hp;
    hp.rank = g.wi.rank;
    hp.local_rank = g.wi.local_rank;
    hp.secret = g.secret;
    hp.tls_ca = g.opt->tls_ca;
    hp.contract = *g.contract;
    hp.default_timeout_ms = g.opt->handoff_timeout_ms;
    hp.streams = g.opt->streams;
    *sink = make_handoff(job, hp, *g.exec);
  } catch (const std::exception& e) {
    err = e.what();
  }
  std::string msg;
  const int bad = g.ctl->agree(err, &msg);
  if (bad >= 0) send_failed(g, job.job_id(), bad, msg);
  return bad < 0;
}

// 2. The prefill, its KV handed off layer by layer; progress and cancel checks at every
// layer boundary (collective on the control channel, so all ranks stop at the same
// layer; a CUDA executor finishes the prefill first, engine/executor.h). false: reported.
bool prefill(const GroupContext& g, const JobSpec& spec, std::unique_ptr<Handoff> sink,
             PrefillResult* out, KvHandoffStats* hs, std::string* transport) {
  const uint64_t id = spec.id;
  // A cancelled job, or one whose handoff failed on any rank, stops at this boundary on
  // every rank (the failure itself is reported after the agreement below).
  auto progress = [&](int layer, int n_layers) {
    const int64_t stop =
        g.ctl->max(sink->failed() ? 2 : (g.root() && g.link->cancelled(id) ? 1 : 0));
    if (stop == 2) throw HandoffStop("KV handoff failed on some rank");
    if (stop == 1)
      throw Cancelled("job " + std::to_string(id) + " cancelled at layer " +
                      std::to_string(layer + 1) + " of " + std::to_string(n_layers));
    if (g.root()) {
      v1::Envelope p;
      p.mutable_worker_progress()->set_job_id(id);
      p.mutable_worker_progress()->set_layer(layer + 1);
      p.mutable_worker_progress()->set_n_layers(n_layers);
      g.link->send(p);
    }
  };
  std::string err;
  bool fatal = false;
  try {
    PrefillRequest req;
    req.ids = &spec.ids;
    req.policy = &spec.policy;
    req.audit = spec.audit;
    req.progress = progress;
    req.sp_layout = spec.sp_layout;
    req.tp_placement = spec.tp_placement;
    *out = g.exec->prefill(req, sink.get());  // calls sink->finish()
  } catch (const HandoffStop&) {
    // The ranks whose handoff failed report why (below); the others report nothing.
  } catch (const Cancelled& e) {
    err = e.what();
  } catch (const CommFailure&) {
    throw;
  } catch (const std::exception& e) {
    err = e.what();
    // A throw that is not the handoff's own (deferred) failure came from inside the
    // collective prefill: peers may be stuck or out of step.
    const bool collective = g.exec->backend() == Backend::kCpu || g.wi.size > 1;
    fatal = collective && !sink->failed();
  }
  if (sink->failed()) err = sink->error();  // the cause, where it happened
  *hs = sink->stats();
  *transport = sink->transport();
  sink.reset();  // streams closed

  std::string msg;
  const int bad = g.ctl->agree(err, &msg);
  const int64_t any_fatal = g.ctl->max(fatal ? 1 : 0);
  if (bad < 0) return true;
  send_failed(g, id, bad, msg);
  if (any_fatal) throw CommFailure("prefill failed inside a collective: " + msg);
  return false;
}

// The work split the group ran, as WorkerDone reports it.
void set_split(const GroupContext& g, const JobSpec& spec, const PrefillResult& r,
               double tp_replace_ms, v1::WorkerDone* done) {
  *done->mutable_executed_plan() = wire::encode_shard_layout(
      r.sp_layout.empty() ? spec.sp_layout : r.sp_layout, g.topo.tp, g.topo.sp);
  wire::encode_tp_heads(r.tp_placement.kv_heads, done->mutable_executed_plan());
  done->set_tp_replaced(r.tp_replaced);
  done->set_tp_replace_ms(tp_replace_ms);
  done->set_sp_rebalanced(r.sp_rebalanced);
  done->set_sp_imbalance(r.sp_imbalance);
  done->set_tp_imbalance(r.tp_imbalance);
  done->set_sp_imbalance_planned(r.sp_imbalance_planned);
}

// 3. Totals over ranks, the first token, WorkerDone (rank 0).
void report(const GroupContext& g, const JobSpec& spec, const PrefillResult& r,
            const KvHandoffStats& hs, const std::string& transport, Clock::time_point t0) {
  const double kv_bytes = g.ctl->sum(static_cast<double>(hs.bytes));
  // handoff_ms: the busiest rank's busy send time (kv_bytes / handoff_ms is the rate the
  // group's transport sustained; the sends themselves overlap the layers' compute).
  const double handoff_ms = g.ctl->max(static_cast<int64_t>(hs.send_ms * 1000)) / 1000.0;
  // End of prefill and KV ready from each rank's start of the job; the latest rank counts.
  const double t0_ms = std::chrono::duration<double, std::milli>(t0.time_since_epoch()).count();
  auto since_t0 = [&](double at_ms) {
    return g.ctl->max(static_cast<int64_t>(std::max(0.0, at_ms - t0_ms) * 1000)) / 1000.0;
  };
  const int64_t peak_device = g.ctl->max(static_cast<int64_t>(r.peak_device_bytes));
  const double prefill_end_ms = since_t0(hs.last_put_ms);
  const double kv_ready_ms = since_t0(hs.kv_ready_ms);
  // Each rank's times and the heads it ran per pattern kind, in one gather.
  char line[512];
  std::snprintf(line, sizeof line, "%.3f %.3f %.3f %.3f %.3f %d %d %d %d", r.total_ms, r.gemm_ms,
                r.attention_ms, r.estimate_ms, r.kv_export_ms + hs.copy_ms, r.heads_by_kind[0],
                r.heads_by_kind[1], r.heads_by_kind[2], r.heads_by_kind[3]);
  const auto per_rank = g.ctl->all_gather(line);
  const double tp_replace_ms = g.ctl->max(static_cast<int64_t>(r.tp_replace_ms * 1000)) / 1000.0;
  if (!g.root()) return;
  v1::Envelope d;
  auto* done = d.mutable_worker_done();
  try {
    Sampler sampler(spec.sampling);
    const SampledToken tok = sampler.sample(r.logits.data(), static_cast<int>(r.logits.size()));
    done->set_first_token_id(tok.id);
    done->set_first_token_logit(tok.logit);
  } catch (const std::exception& e) {
    return send_failed(g, spec.id, 0, std::string("sampling the first token: ") + e.what());
  }
  done->set_job_id(spec.id);
  for (const HeadAuditResult& h : r.audit) {
    auto* m = done->add_audit();
    m->set_layer(h.layer);
    m->set_head(h.head);
    // Adaptive heads name their threshold ("vertical_slash(1000,6096,tau=0.95)").
    m->set_pattern(h.pattern.adaptive() ? pattern_label(h.pattern) : to_string(h.pattern.kind));
    m->set_recall(h.recall);
    m->set_output_rel_error(h.output_rel_error);
  }
  done->set_kv_bytes(static_cast<uint64_t>(kv_bytes));
  done->set_handoff_ms(handoff_ms);
  done->set_kv_transport(transport);
  done->set_kv_gbps(handoff_ms > 0 ? kv_bytes / (handoff_ms * 1e6) : 0.0);
  done->set_prefill_end_ms(prefill_end_ms);
  done->set_kv_ready_ms(kv_ready_ms);
  done->set_exposed_handoff_ms(std::max(0.0, kv_ready_ms - prefill_end_ms));
  done->set_peak_device_bytes(static_cast<uint64_t>(peak_device));
  done->set_prefill_ms(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  int64_t heads_run[4] = {};  // summed over ranks; the sp ranks of a tp rank count the same
  for (const std::string& rank_line : per_rank) {
    double v[5] = {};
    int h[4] = {};
    std::sscanf(rank_line.c_str(), "%lf %lf %lf %lf %lf %d %d %d %d", &v[0], &v[1], &v[2], &v[3],
                &v[4], &h[0], &h[1], &h[2], &h[3]);
    for (int k = 0; k < 4; ++k) heads_run[k] += h[k];
    auto* b = done->add_ranks();
    b->set_total_ms(v[0]);
    b->set_gemm_ms(v[1]);
    b->set_attention_ms(v[2]);
    b->set_estimate_ms(v[3]);
    b->set_kv_export_ms(v[4]);
    b->set_sp_imbalance(r.sp_imbalance);  // the same on every rank
    b->set_tp_imbalance(r.tp_imbalance);
  }
  for (int64_t h : heads_run) done->add_heads_run(h / g.topo.sp);
  set_split(g, spec, r, tp_replace_ms, done);
  g.link->send(d);
  std::fprintf(stderr,
               "mprefill-worker: job %llu done: %.0f KV bytes handed off over %s, %.1f ms busy "
               "sending (%.2f GB/s); prefill end %.1f ms, KV ready %.1f ms, %.1f ms exposed; "
               "sp imbalance %.3f (plan %.3f%s)\n",
               static_cast<unsigned long long>(spec.id), kv_bytes, transport.c_str(), handoff_ms,
               handoff_ms > 0 ? kv_bytes / (handoff_ms * 1e6) : 0.0, prefill_end_ms, kv_ready_ms,
               std::max(0.0, kv_ready_ms - prefill_end_ms), r.sp_imbalance, r.sp_imbalance_planned,
               r.sp_rebalanced ? ", re-balanced" : "");
}

}  // namespace

void run_job(const GroupContext& g, const v1::Assignment& job) {
  if (g.root()) g.link->set_running(job.job_id());
  struct Idle {
    CoordinatorLink* l;
    ~Idle() {
      if (l) l->set_running(0);
    }
  } idle{g.root() ? g.link : nullptr};
  const auto t0 = Clock::now();
  JobSpec spec;
  std::unique_ptr<Handoff> sink;
  if (!prepare(g, job, &spec, &sink)) return;
  PrefillResult r;
  KvHandoffStats hs;
  std::string transport;
  if (!prefill(g, spec, std::move(sink), &r, &hs, &transport)) return;
  report(g, spec, r, hs, transport, t0);
}

}  // namespace mprefill::worker
