// A SubmitJob before the service lock (issue 17): the work that grows with what a client
// sends is done here, never under mu. In this order (the first failure is the one
// reported, one line, the connection kept):
//   1. sizes, before anything else: text <= --max-prompt-bytes, client_tag <=
//      --max-tag-bytes, sparse_config <= --max-config-bytes, model / group / decoder /
//      kv_transport <= kMaxOptionBytes, stop ids <= kMaxStopIds, the sparse name's form;
//   2. a registered group and decoder, and a copy of the service's KV contract (mu, briefly);
//   3. the model name, ids xor text, the tokenizer, the length limit (a text is refused
//      when even its fewest possible tokens exceed it: no tokenizing for that answer);
//   4. the ids (a text tokenized), their range, the option ranges and the sparse policy
//      (a config read and parsed): on the prep pool when there is a text to tokenize or a
//      config to read or parse, else here on the session's strand;
//   5. under mu: admission (admission.cc) and the job's creation (jobs.cc handle_submit).
#include <memory>
#include <utility>

#include "coordinator/session.h"
#include "coordinator/state.h"
#include "model/prompt.h"

namespace mprefill::coord {

namespace {

constexpr size_t kMaxOptionBytes = 256;  // model, group and decoder names, kv_transport
constexpr int kMaxStopIds = 1024;

std::string bad(v1::ErrorCode* code, v1::ErrorCode c, std::string why) {
  *code = c;
  return why;
}

// A built-in policy costs nothing; a named or inline config is read and parsed.
bool needs_prep(const v1::SubmitJob& m) {
  const v1::JobOptions& o = m.options();
  return !m.text().empty() || !o.sparse_config().empty() ||
         (!o.sparse().empty() && o.sparse() != "dense" && o.sparse() != "auto");
}

// The prompt limit in tokens and where it comes from.
int64_t prompt_limit(const CoordinatorOptions& opt, const v1::ModelFingerprint& model,
                     std::string* source) {
  if (opt.max_prompt > 0 && opt.max_prompt < model.max_position()) {
    *source = "the coordinator's --max-prompt " + std::to_string(opt.max_prompt);
    return opt.max_prompt;
  }
  *source = "the model's max_position " + std::to_string(model.max_position());
  return model.max_position();
}

std::string over_limit(int64_t n, int64_t limit, const std::string& source) {
  return "prompt of " + std::to_string(n) + " tokens exceeds the limit of " +
         std::to_string(limit) + " (" + source + ")";
}

}  // namespace

bool Coordinator::Impl::on_submit(const SessionPtr& s, v1::Envelope& env) {
  const v1::SubmitJob& m = env.submit();
  v1::ErrorCode code = v1::INVALID_ARGUMENT;
  PreparedJob p;
  std::string why = check_sizes(m, &code);
  if (why.empty()) why = snapshot_contract(&p.contract, &code);
  if (why.empty()) why = check_prompt_form(m, p.contract, &code);
  if (!why.empty() || !needs_prep(m)) {
    if (why.empty()) why = prepare(m, &p, &code);
    complete_submit(s, m, std::move(p), why, code);
    return true;
  }
  // Off the io threads: the session reads no further frame until this one is answered, so
  // a client's messages keep their order and it has one job in preparation at a time.
  auto job = std::make_shared<std::pair<v1::SubmitJob, PreparedJob>>(
      std::move(*env.mutable_submit()), std::move(p));
  return !post_prep([this, s, job] {
    if (!stopping) {
      v1::ErrorCode c = v1::INVALID_ARGUMENT;
      std::string w;
      try {
        w = prepare(job->first, &job->second, &c);
      } catch (const std::exception& e) {
        w = std::string("coordinator: ") + e.what();
        c = v1::INTERNAL;
      }
      complete_submit(s, job->first, std::move(job->second), w, c);
    }
    s->resume();
  });  // not posted: the coordinator stops, the message is dropped
}

std::string Coordinator::Impl::check_sizes(const v1::SubmitJob& m, v1::ErrorCode* code) const {
  const v1::JobOptions& o = m.options();
  if (m.text().size() > opt.max_prompt_bytes)
    return bad(code, v1::INVALID_ARGUMENT,
               "text prompt of " + std::to_string(m.text().size()) +
                   " bytes is over the coordinator's limit of " +
                   std::to_string(opt.max_prompt_bytes) +
                   " bytes (--max-prompt-bytes); send token ids or a shorter text");
  if (m.client_tag().size() > opt.max_tag_bytes)
    return bad(code, v1::INVALID_ARGUMENT,
               "client_tag of " + std::to_string(m.client_tag().size()) +
                   " bytes is over the coordinator's limit of " +
                   std::to_string(opt.max_tag_bytes) + " bytes (--max-tag-bytes)");
  const std::pair<const char*, const std::string*> names[] = {{"model", &m.model()},
                                                              {"group", &o.group()},
                                                              {"decoder", &o.decoder()},
                                                              {"kv_transport", &o.kv_transport()}};
  for (const auto& [field, value] : names)
    if (value->size() > kMaxOptionBytes)
      return bad(code, v1::INVALID_ARGUMENT,
                 std::string(field) + " of " + std::to_string(value->size()) +
                     " bytes is over the limit of " + std::to_string(kMaxOptionBytes) + " bytes");
  if (o.stop_ids_size() > kMaxStopIds)
    return bad(code, v1::INVALID_ARGUMENT,
               std::to_string(o.stop_ids_size()) + " stop ids are over the limit of " +
                   std::to_string(kMaxStopIds));
  try {
    check_sparse_option(sparse_source, o);
  } catch (const SparseSourceError& e) {
    return bad(code, v1::INVALID_ARGUMENT, e.what());
  }
  return "";
}

std::string Coordinator::Impl::snapshot_contract(v1::KvContract* kc, v1::ErrorCode* code) {
  std::lock_guard<std::mutex> lk(mu);
  if (groups.empty()) return bad(code, v1::UNAVAILABLE, "no worker group is registered");
  if (decoders.empty() || !contract) return bad(code, v1::UNAVAILABLE, "no decoder is registered");
  *kc = *contract;
  return "";
}

std::string Coordinator::Impl::check_prompt_form(const v1::SubmitJob& m, const v1::KvContract& kc,
                                                 v1::ErrorCode* code) const {
  const auto& model = kc.model();
  if (!m.model().empty() && m.model() != model.name() && m.model() != model.weights_digest())
    return bad(code, v1::MODEL_MISMATCH,
               "job asks for model '" + m.model() + "' but the service runs '" + model.name() +
                   "' (digest " + model.weights_digest() + ")");
  if (!m.text().empty() && m.token_ids_size() > 0)
    return bad(code, v1::INVALID_ARGUMENT, "give token ids or text, not both");
  std::string source;
  const int64_t limit = prompt_limit(opt, model, &source);
  if (m.text().empty()) {
    if (m.token_ids_size() == 0)
      return bad(code, v1::INVALID_ARGUMENT, "prompt is empty (at least one token is needed)");
    if (m.token_ids_size() > limit)
      return bad(code, v1::INVALID_ARGUMENT, over_limit(m.token_ids_size(), limit, source));
    return "";
  }
  if (!tokenizer)
    return bad(code, v1::INVALID_ARGUMENT,
               "text prompts need a tokenizer on the coordinator (--tokenizer); send token ids");
  if (tokenizer->vocab_size() != model.vocab())
    return bad(code, v1::INVALID_ARGUMENT,
               "the coordinator's tokenizer has " + std::to_string(tokenizer->vocab_size()) +
                   " tokens but the model has " + std::to_string(model.vocab()));
  // BOS, then pieces covering " " + text, none longer than max_piece_bytes.
  const int64_t bytes = static_cast<int64_t>(m.text().size());
  const int64_t fewest = 1 + (bytes + 1 + max_piece_bytes - 1) / max_piece_bytes;
  if (fewest > limit)
    return bad(code, v1::INVALID_ARGUMENT,
               "text prompt of " + std::to_string(bytes) + " bytes makes at least " +
                   std::to_string(fewest) + " tokens (no piece of the tokenizer is longer than " +
                   std::to_string(max_piece_bytes) + " bytes), over the limit of " +
                   std::to_string(limit) + " (" + source + ")");
  return "";
}

std::string Coordinator::Impl::prepare(const v1::SubmitJob& m, PreparedJob* p,
                                       v1::ErrorCode* code) const {
  const auto& model = p->contract.model();
  if (!m.text().empty()) {
    try {
      p->tokens = tokenizer->encode(m.text(), true);
    } catch (const std::exception& e) {
      return bad(code, v1::INVALID_ARGUMENT, std::string("text prompt: ") + e.what());
    }
    std::string source;
    const int64_t limit = prompt_limit(opt, model, &source);
    if (static_cast<int64_t>(p->tokens.size()) > limit)
      return bad(code, v1::INVALID_ARGUMENT,
                 over_limit(static_cast<int64_t>(p->tokens.size()), limit, source));
  } else {
    p->tokens.assign(m.token_ids().begin(), m.token_ids().end());
  }
  ModelConfig ids_model;  // the contract's vocabulary is all the id check needs
  ids_model.vocab = static_cast<int>(model.vocab());
  try {
    check_prompt_ids(ids_model, p->tokens);
  } catch (const std::exception& e) {
    return bad(code, v1::INVALID_ARGUMENT, e.what());
  }
  const int64_t n = static_cast<int64_t>(p->tokens.size());
  std::string why = check_options(m.options(), model, n, code);
  if (!why.empty()) return why;
  p->options = m.options();
  p->options.clear_sparse_config();  // resolved into the policy; the record stays small
  const int64_t dense_below =
      m.options().has_dense_below() ? m.options().dense_below() : kDefaultDenseBelow;
  try {
    p->policy = std::make_shared<const SparsePolicy>(
        resolve_sparse(sparse_source, m.options(), config_of(model), dense_below));
  } catch (const SparseSourceError& e) {
    return bad(code, v1::INVALID_ARGUMENT, e.what());
  } catch (const std::exception& e) {
    return bad(code, v1::INVALID_ARGUMENT, std::string("sparse policy: ") + e.what());
  }
  return "";
}

void Coordinator::Impl::complete_submit(const SessionPtr& s, const v1::SubmitJob& m,
                                        PreparedJob&& p, const std::string& why,
                                        v1::ErrorCode code) {
  std::lock_guard<std::mutex> lk(mu);
  if (stopping || !sessions.count(s.get())) return;  // the client left meanwhile
  try {
    if (!why.empty()) return refuse_submit(s, code, why);
    handle_submit(s, m, std::move(p));
  } catch (const std::exception& e) {
    log("%s: internal error while admitting a job: %s", s->peer().c_str(), e.what());
    s->send(wire::make_error(0, v1::INTERNAL, std::string("coordinator: ") + e.what()));
  }
}

void Coordinator::Impl::refuse_submit(const SessionPtr& s, v1::ErrorCode code,
                                      const std::string& why) {
  ++metrics.refused;
  log_job_refusal(s->owner(), "job from %s (client '%s') refused (%s): %s", s->peer().c_str(),
                  (s->owner().empty() ? s->name() : s->owner()).c_str(),
                  v1::ErrorCode_Name(code).c_str(), why.c_str());
  s->send(wire::make_error(0, code, valid_utf8(why)));
}

}  // namespace mprefill::coord
