// Jobs: submission, the FIFO queue and its dispatch onto a free group + decoder, the
// state machine (QUEUED -> RUNNING -> HANDING_OFF -> DECODING -> DONE / FAILED / CANCELLED, see
// coordinator.h), cancel and status, progress events, the per-state deadlines, the job
// events of groups (WorkerProgress / WorkerDone / WorkerFailed) and decoders (Ready /
// DecodeDone / DecodeFailed), and the JobResult.
#include <algorithm>

#include "coordinator/session.h"
#include "coordinator/state.h"
#include "model/sparse_policy.h"
#include "model/tokenizer.h"

namespace mprefill::coord {

// ---- states and client-facing reports

void Coordinator::Impl::count_state(v1::JobState s, int delta) {
  switch (s) {
    case v1::QUEUED:
      metrics.queued += delta;
      break;
    case v1::RUNNING:
      metrics.running += delta;
      break;
    case v1::HANDING_OFF:
      metrics.handing_off += delta;
      break;
    case v1::DECODING:
      metrics.decoding += delta;
      break;
    case v1::DONE:
      metrics.done += delta > 0 ? 1 : 0;
      break;
    case v1::FAILED:
      metrics.failed += delta > 0 ? 1 : 0;
      break;
    case v1::CANCELLED:
      metrics.cancelled += delta > 0 ? 1 : 0;
      break;
    default:
      break;
  }
}

void Coordinator::Impl::set_state(Job& j, v1::JobState s) {
  count_state(j.state, -1);
  count_state(s, +1);
  j.state = s;
}

void Coordinator::Impl::fill_status(const Job& j, v1::JobStatus* st) const {
  st->set_job_id(j.id);
  st->set_state(j.state);
  st->set_layer(j.layer);
  st->set_n_layers(j.n_layers);
  st->set_prompt_tokens(j.prompt_tokens);
  st->set_group(j.group);
  st->set_decoder(j.decoder);
  st->set_error(j.error);
}

void Coordinator::Impl::progress(Job& j) {
  if (!j.options.want_progress()) return;
  auto env = envelope();
  auto* p = env.mutable_progress();
  p->set_job_id(j.id);
  p->set_state(j.state);
  p->set_layer(j.layer);
  p->set_n_layers(j.n_layers);
  if (j.state == v1::HANDING_OFF || j.state == v1::DECODING) {  // prefill's final rate
    const double ms = j.worker_done.prefill_ms();
    p->set_elapsed_ms(ms);
    if (ms > 0) p->set_tokens_per_s(static_cast<double>(j.prompt_tokens) / (ms / 1000.0));
  } else if (j.state == v1::RUNNING && j.ready) {
    const double ms = ms_between(j.prefill_started, Clock::now());
    p->set_elapsed_ms(ms);
    if (ms > 0 && j.n_layers > 0)
      p->set_tokens_per_s(static_cast<double>(j.prompt_tokens) * j.layer / j.n_layers /
                          (ms / 1000.0));
  }
  send_to(j.client, env);
}

// ---- submit, dispatch, end of a job

void Coordinator::Impl::handle_submit(const SessionPtr& s, const v1::SubmitJob& m,
                                      PreparedJob&& p) {
  uint64_t kv = 0;
  v1::ErrorCode code = v1::INVALID_ARGUMENT;
  std::string why = admit_locked(p, &kv, &code);
  if (why.empty()) why = client_limit_reason(s.get(), static_cast<int64_t>(p.tokens.size()), &code);
  if (!why.empty()) return refuse_submit(s, code, why);
  Job j;
  j.id = next_job_id++;
  j.client = s;
  j.client_raw = s.get();
  j.client_name = s->name();
  j.owner = s->owner();
  j.tokens = std::move(p.tokens);
  j.prompt_tokens = static_cast<int64_t>(j.tokens.size());
  j.options = std::move(p.options);
  j.policy = std::move(p.policy);
  j.client_tag = m.client_tag();
  j.detached = m.detach();
  j.kv_bytes = kv;
  j.n_layers = contract->model().n_layers();
  j.submitted = Clock::now();
  j.state = v1::QUEUED;
  count_state(v1::QUEUED, +1);
  const uint64_t id = j.id;
  const int64_t n = j.prompt_tokens;
  jobs[id] = std::move(j);
  queue.push_back(id);
  auto env = envelope();
  auto* a = env.mutable_accepted();
  a->set_job_id(id);
  a->set_queue_position(static_cast<int32_t>(queue.size() - 1));
  a->set_prompt_tokens(n);
  a->set_client_tag(m.client_tag());
  s->send(env);
  log("job %llu accepted from client '%s'%s (%s): %lld tokens, %s KV, queue position %zu",
      static_cast<unsigned long long>(id), (s->owner().empty() ? s->name() : s->owner()).c_str(),
      s->owner().empty() ? " (name not proved)" : "", s->peer().c_str(), static_cast<long long>(n),
      format_bytes(kv).c_str(), queue.size() - 1);
  progress(jobs[id]);
  dispatch();
}

void Coordinator::Impl::dispatch() {
  if (stopping) return;
  for (auto it = queue.begin(); it != queue.end();) {
    Job& j = jobs[*it];
    Group* g = pick_group(j);
    std::string transport;
    Decoder* d = g ? pick_decoder(j, *g, &transport) : nullptr;
    if (!g || !d) {
      ++it;  // a later job may fit another group / decoder
      continue;
    }
    it = queue.erase(it);
    const auto now = Clock::now();
    j.group = g->name;
    j.decoder = d->name;
    j.kv_transport = transport;
    g->job = j.id;
    d->reserved_bytes += j.kv_bytes;
    d->jobs.insert(j.id);
    set_state(j, v1::RUNNING);
    j.started = now;
    j.queue_ms = ms_between(j.submitted, now);
    j.deadline = now + std::chrono::milliseconds(opt.ready_timeout_ms);
    auto env = envelope();
    auto* e = env.mutable_expect();
    e->set_job_id(j.id);
    e->set_prompt_tokens(j.prompt_tokens);
    e->set_n_layers(j.n_layers);
    e->set_kv_bytes(j.kv_bytes);
    e->set_senders(g->reg.tp() * g->reg.sp());
    e->set_decode_tokens(j.options.decode_tokens());
    *e->mutable_sampling() = j.options.sampling();
    *e->mutable_stop_ids() = j.options.stop_ids();
    e->set_timeout_ms(static_cast<uint32_t>(opt.handoff_timeout_ms));
    send_to(d->session, env);
    log("job %llu: RUNNING on group '%s', decoder '%s', KV over %s (waited %.1f ms)",
        static_cast<unsigned long long>(j.id), g->name.c_str(), d->name.c_str(),
        j.kv_transport.c_str(), j.queue_ms);
    progress(j);
  }
}

void Coordinator::Impl::send_assignment(Job& j) {
  Group& g = groups.at(j.group);
  Decoder& d = decoders.at(j.decoder);
  auto env = envelope();
  auto* a = env.mutable_assignment();
  a->set_job_id(j.id);
  *a->mutable_token_ids() = {j.tokens.begin(), j.tokens.end()};
  *a->mutable_options() = j.options;
  a->mutable_options()->set_kv_transport(j.kv_transport.empty() ? "tcp" : j.kv_transport);
  *a->mutable_plan() =
      make_shard_plan(contract->model(), *j.policy, static_cast<int64_t>(j.tokens.size()),
                      g.reg.tp(), g.reg.sp(), &g.placement, g.reg.tp_any_placement(), &g.placement);
  // The policy as resolved here: the worker never opens the path a client named.
  *a->mutable_policy() = policy_table(*j.policy);
  auto* de = a->mutable_decoder();
  de->set_name(d.name);
  de->set_host(d.host);
  de->set_port(d.reg.kv_port());
  de->set_transport(a->options().kv_transport());
  de->set_tls(d.reg.kv_tls());
  a->set_handoff_timeout_ms(static_cast<uint32_t>(opt.handoff_timeout_ms));
  j.prefill_started = Clock::now();
  send_to(g.session, env);
}

void Coordinator::Impl::release_decoder_of(Job& j, bool send_release) {
  auto it = decoders.find(j.decoder);
  if (it == decoders.end() || !it->second.jobs.count(j.id)) return;
  Decoder& d = it->second;
  d.jobs.erase(j.id);
  d.reserved_bytes -= std::min(d.reserved_bytes, j.kv_bytes);
  if (send_release) {
    auto env = envelope();
    env.mutable_release()->set_job_id(j.id);
    send_to(d.session, env);
  }
}

void Coordinator::Impl::free_group_of(Job& j, bool cancel) {
  auto it = groups.find(j.group);
  if (it == groups.end() || it->second.job != j.id) return;
  Group& g = it->second;
  g.job = 0;
  if (cancel && j.ready) {  // the Assignment went out: the group must stop the job
    auto env = envelope();
    env.mutable_cancel()->set_job_id(j.id);
    send_to(g.session, env);
    g.cancelled_job = j.id;
    g.cancel_time = Clock::now();
    g.cancel_deadline = g.cancel_time + std::chrono::milliseconds(opt.cancel_grace_ms);
  }
}

void Coordinator::Impl::finish(Job& j, v1::JobState state, v1::ErrorCode code,
                               const std::string& message) {
  if (terminal(j.state)) return;
  if (j.state == v1::QUEUED)
    queue.erase(std::remove(queue.begin(), queue.end(), j.id), queue.end());
  free_group_of(j, state != v1::DONE);
  release_decoder_of(j, state != v1::DONE);
  set_state(j, state);
  j.error = message;
  if (state != v1::DONE) send_to(j.client, wire::make_error(j.id, code, message));
  log("job %llu: %s%s%s", static_cast<unsigned long long>(j.id), state_name(state),
      message.empty() ? "" : ": ", message.c_str());
  // The record keeps counts and short strings: what grew with the client's input goes.
  std::vector<int32_t>().swap(j.tokens);
  std::string().swap(j.client_tag);
  v1::JobOptions().Swap(&j.options);
  v1::WorkerDone().Swap(&j.worker_done);
  j.policy.reset();
  finished.push_back(j.id);
  while (static_cast<int>(finished.size()) > opt.keep_finished) {
    jobs.erase(finished.front());
    finished.pop_front();
  }
  dispatch();
}

bool Coordinator::Impl::may_see(const Session& s, const Job& j) const {
  return s.admin() || j.owner == s.owner();
}

// Another client's job is answered exactly as a job that does not exist.
void Coordinator::Impl::handle_cancel(const SessionPtr& s, uint64_t job_id) {
  auto it = jobs.find(job_id);
  if (it == jobs.end() || !may_see(*s, it->second)) {
    s->send(wire::make_error(job_id, v1::NOT_FOUND, "no job " + std::to_string(job_id)));
    return;
  }
  Job& j = it->second;
  if (!terminal(j.state))
    finish(j, v1::CANCELLED, v1::CANCELLED_BY_CLIENT,
           "cancelled by client '" + s->name() + "' (" + s->peer() + ")");
  auto env = envelope();
  fill_status(j, env.mutable_status_reply()->add_jobs());
  s->send(env);
}

void Coordinator::Impl::handle_status(const SessionPtr& s, uint64_t job_id) {
  auto env = envelope();
  auto* r = env.mutable_status_reply();
  if (job_id != 0) {
    auto it = jobs.find(job_id);
    if (it == jobs.end() || !may_see(*s, it->second)) {
      s->send(wire::make_error(job_id, v1::NOT_FOUND, "no job " + std::to_string(job_id)));
      return;
    }
    fill_status(it->second, r->add_jobs());
  } else {
    for (const auto& [id, j] : jobs)
      if (may_see(*s, j)) fill_status(j, r->add_jobs());
  }
  for (const auto& [name, g] : groups) {
    auto* gs = r->add_groups();
    gs->set_name(name);
    gs->set_tp(g.reg.tp());
    gs->set_sp(g.reg.sp());
    gs->set_device(g.reg.ranks_size() > 0 ? g.reg.ranks(0).device() : "");
    gs->set_busy(g.job != 0 || g.cancelled_job != 0);
    gs->set_alive(g.alive);
  }
  for (const auto& [name, d] : decoders) {
    auto* ds = r->add_decoders();
    ds->set_name(name);
    if (s->admin())
      ds->set_endpoint((d.reg.kv_tls() ? wire::kTlsScheme : "") + d.host + ":" +
                       std::to_string(d.reg.kv_port()));
    ds->set_active_jobs(static_cast<int32_t>(d.jobs.size()));
    ds->set_alive(d.alive);
  }
  s->send(env);
}

void Coordinator::Impl::expire_deadlines(Clock::time_point now) {
  std::vector<uint64_t> late;
  for (auto& [id, j] : jobs)
    if ((j.state == v1::RUNNING && !j.ready) || j.state == v1::HANDING_OFF ||
        j.state == v1::DECODING)
      if (now > j.deadline) late.push_back(id);
  for (uint64_t id : late) {
    Job& j = jobs.at(id);
    if (j.state == v1::RUNNING)
      finish(j, v1::FAILED, v1::DECODER_FAILED,
             "decoder '" + j.decoder + "' did not answer Expect within " +
                 std::to_string(opt.ready_timeout_ms) + " ms");
    else
      finish(j, v1::FAILED, v1::DECODER_FAILED,
             "decoder '" + j.decoder + "' did not finish decoding within " +
                 std::to_string(opt.decode_timeout_ms) + " ms");
  }
}

// ---- job events of a worker group

// The job g runs now, if id names it (a late message about an ended job gives nullptr).
Job* Coordinator::Impl::running_job_of(Group& g, uint64_t id) {
  auto it = jobs.find(id);
  if (it == jobs.end() || it->second.group != g.name || it->second.state != v1::RUNNING ||
      g.job != id)
    return nullptr;
  return &it->second;
}

// The group reports the end of the job it was told to cancel: it is free again.
void Coordinator::Impl::end_cancelled(Group& g, uint64_t id) {
  if (g.cancelled_job != 0 && g.cancelled_job == id) {
    g.cancelled_job = 0;
    dispatch();
  }
}

void Coordinator::Impl::on_worker_progress(const SessionPtr& s, Group& g,
                                           const v1::WorkerProgress& p) {
  if (Job* j = running_job_of(g, p.job_id())) {
    if (p.layer() < 0 || p.layer() > j->n_layers)
      return protocol_error(s, "WorkerProgress layer " + std::to_string(p.layer()) +
                                   " outside [0, " + std::to_string(j->n_layers) + "]");
    j->layer = p.layer();
    progress(*j);
  }
}

void Coordinator::Impl::on_worker_done(Group& g, const v1::WorkerDone& m) {
  Job* j = running_job_of(g, m.job_id());
  if (!j) return end_cancelled(g, m.job_id());
  if (m.first_token_id() < 0 || m.first_token_id() >= contract->model().vocab()) {
    finish(*j, v1::FAILED, v1::WORKER_FAILED,
           "worker group '" + g.name + "' returned first token " +
               std::to_string(m.first_token_id()) + " outside the vocabulary");
    return;
  }
  const auto now = Clock::now();
  j->worker_done = m;
  j->layer = j->n_layers;
  j->ttft_ms = ms_between(j->submitted, now);
  metrics.kv_bytes_handed_off += m.kv_bytes();
  metrics.ttft.observe(j->ttft_ms / 1000.0);
  metrics.prefill.observe(m.prefill_ms() / 1000.0);
  metrics.handoff.observe(m.handoff_ms() / 1000.0);
  if (m.audit_size() > 0) record_audit(m);
  set_state(*j, v1::HANDING_OFF);
  g.job = 0;
  j->deadline = now + std::chrono::milliseconds(opt.decode_timeout_ms);
  auto sd = envelope();
  sd.mutable_start_decode()->set_job_id(j->id);
  sd.mutable_start_decode()->set_first_token_id(m.first_token_id());
  sd.mutable_start_decode()->set_first_token_logit(m.first_token_logit());
  auto dit = decoders.find(j->decoder);
  if (dit != decoders.end()) send_to(dit->second.session, sd);
  log("job %llu: prefill done in %.1f ms (ttft %.1f ms, %s handed off in %.1f ms); HANDING_OFF",
      static_cast<unsigned long long>(j->id), m.prefill_ms(), j->ttft_ms,
      format_bytes(m.kv_bytes()).c_str(), m.handoff_ms());
  progress(*j);
  dispatch();
}

void Coordinator::Impl::record_audit(const v1::WorkerDone& m) {
  double lo = 1.0;
  const auto& model = contract->model();
  for (const v1::HeadAudit& h : m.audit()) {
    // Entries come from the worker: keep only valid heads and known pattern names
    // (they become metric labels).
    const std::string& pat = h.pattern();
    if (h.layer() < 0 || h.layer() >= model.n_layers() || h.head() < 0 ||
        h.head() >= model.n_heads() ||
        (pat != "a_shape" && pat != "vertical_slash" && pat != "block_sparse" && pat != "dense"))
      continue;
    ++metrics.audit_heads;
    metrics.audit_recall_sum += h.recall();
    metrics.audit_error_sum += h.output_rel_error();
    lo = std::min(lo, h.recall());
    metrics.audit_last[{h.layer(), h.head()}] = {h.pattern(), h.recall(), h.output_rel_error()};
  }
  metrics.audit_min_recall_last = lo;
}

void Coordinator::Impl::on_worker_failed(Group& g, const v1::WorkerFailed& m) {
  const std::string what =
      "worker group '" + g.name + "' rank " + std::to_string(m.rank()) + ": " + m.message();
  if (m.job_id() == 0) {
    fail_group(g, what);
    return;
  }
  if (Job* j = running_job_of(g, m.job_id()))
    finish(*j, v1::FAILED, v1::WORKER_FAILED, what);
  else
    end_cancelled(g, m.job_id());
}

// ---- job events of a decoder

// An unfinished job placed on d, if id names one.
Job* Coordinator::Impl::live_job_of(Decoder& d, uint64_t id) {
  auto it = jobs.find(id);
  if (it == jobs.end() || it->second.decoder != d.name || terminal(it->second.state))
    return nullptr;
  return &it->second;
}

void Coordinator::Impl::on_ready(Decoder& d, uint64_t job_id) {
  Job* j = live_job_of(d, job_id);
  if (j && j->state == v1::RUNNING && !j->ready) {
    j->ready = true;
    send_assignment(*j);
  }
}

void Coordinator::Impl::on_decode_started(Decoder& d, uint64_t job_id) {
  Job* j = live_job_of(d, job_id);
  if (!j || j->state != v1::HANDING_OFF) return;  // late, or a second one: ignored
  set_state(*j, v1::DECODING);
  log("job %llu: KV complete on decoder '%s'; DECODING", static_cast<unsigned long long>(j->id),
      d.name.c_str());
  progress(*j);
}

void Coordinator::Impl::on_decode_done(Decoder& d, const v1::DecodeDone& m) {
  Job* j = live_job_of(d, m.job_id());
  // DecodeDone may overtake nothing (one connection, in order), but a decoder that never
  // says DecodeStarted (an older one) still finishes its job from HANDING_OFF.
  if (!j || (j->state != v1::HANDING_OFF && j->state != v1::DECODING)) return;
  for (int id : m.generated_ids())
    if (id < 0 || id >= contract->model().vocab()) {
      finish(*j, v1::FAILED, v1::DECODER_FAILED,
             "decoder '" + d.name + "' returned token " + std::to_string(id) +
                 " outside the vocabulary");
      return;
    }
  const v1::WorkerDone& wd = j->worker_done;
  auto out = envelope();
  auto* r = out.mutable_result();
  r->set_job_id(j->id);
  r->set_state(v1::DONE);
  r->set_prompt_tokens(j->prompt_tokens);
  r->set_first_token_id(wd.first_token_id());
  *r->mutable_generated_ids() = m.generated_ids();
  if (tokenizer && tokenizer->vocab_size() == contract->model().vocab()) {
    int prev = j->tokens.back();
    std::string text;
    for (int id : m.generated_ids()) {
      text += tokenizer->decode_token(prev, id);
      prev = id;
    }
    r->set_text(valid_utf8(text));
  }
  r->set_stopped_by(m.stopped_by());
  r->set_ttft_ms(j->ttft_ms);
  r->set_prefill_ms(wd.prefill_ms());
  r->set_kv_bytes_handed_off(wd.kv_bytes());
  r->set_handoff_ms(wd.handoff_ms());
  r->set_kv_transport(wd.kv_transport());
  r->set_kv_gbps(wd.kv_gbps());
  r->set_prefill_end_ms(wd.prefill_end_ms());
  r->set_kv_ready_ms(wd.kv_ready_ms());
  r->set_exposed_handoff_ms(wd.exposed_handoff_ms());
  r->set_decode_ms(m.decode_ms());
  r->set_worker_peak_device_bytes(wd.peak_device_bytes());
  r->set_decoder_peak_device_bytes(m.peak_device_bytes());
  *r->mutable_ranks() = wd.ranks();
  *r->mutable_audit() = wd.audit();
  r->set_queue_ms(j->queue_ms);
  r->set_client_tag(j->client_tag);
  r->set_sp_rebalanced(wd.sp_rebalanced());
  r->set_sp_imbalance(wd.sp_imbalance());
  r->set_tp_imbalance(wd.tp_imbalance());
  r->set_tp_replaced(wd.tp_replaced());
  r->set_tp_replace_ms(wd.tp_replace_ms());
  *r->mutable_heads_run() = wd.heads_run();
  finish(*j, v1::DONE, v1::ERROR_CODE_UNSPECIFIED, "");
  send_to(j->client, out);
}

void Coordinator::Impl::on_decode_failed(Decoder& d, const v1::DecodeFailed& m) {
  if (Job* j = live_job_of(d, m.job_id())) {
    // A KV stream that broke off (a rank died or gave up) is the group's failure.
    if (m.sender_failed())
      finish(*j, v1::FAILED, v1::WORKER_FAILED,
             "worker group '" + j->group + "' (KV handoff, seen by decoder '" + d.name +
                 "'): " + m.message());
    else
      finish(*j, v1::FAILED, v1::DECODER_FAILED, "decoder '" + d.name + "': " + m.message());
  }
}

}  // namespace mprefill::coord
