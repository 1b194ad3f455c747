#include <algorithm>
#include <cstdio>
#include <iostream>
#include <vector>

#include "tools/generate_report.h"
#include "tools/service_client.h"

namespace mprefill::cli {

namespace {

std::string gbps(uint64_t bytes, double ms) {
  if (ms <= 0) return "n/a";
  char b[32];
  std::snprintf(b, sizeof(b), "%.3f", static_cast<double>(bytes) / (ms * 1e6));
  return b;
}

nlohmann::json outcome_json(const Outcome& o, const ServiceArgs& a, const PromptInput& p) {
  nlohmann::json j = {{"job_id", o.job_id}, {"status", o.status}};
  if (o.status != "DONE") {
    j["error_code"] = v1::ErrorCode_Name(o.code);
    j["error"] = o.error;
    return j;
  }
  const auto& r = o.result;
  std::vector<int> gen(r.generated_ids().begin(), r.generated_ids().end());
  j["prompt_tokens"] = r.prompt_tokens();
  j["first_token_id"] = r.first_token_id();
  j["generated_ids"] = gen;
  j["stopped_by"] = r.stopped_by();
  j["ttft_ms"] = r.ttft_ms();
  j["prefill_ms"] = r.prefill_ms();
  j["decode_ms"] = r.decode_ms();
  j["queue_ms"] = r.queue_ms();
  j["kv_bytes_handed_off"] = r.kv_bytes_handed_off();
  j["handoff_ms"] = r.handoff_ms();
  j["handoff_gbps"] = r.handoff_ms() > 0 ? r.kv_bytes_handed_off() / (r.handoff_ms() * 1e6) : 0.0;
  j["kv_transport"] = r.kv_transport();
  j["prefill_end_ms"] = r.prefill_end_ms();
  j["kv_ready_ms"] = r.kv_ready_ms();
  j["exposed_handoff_ms"] = r.exposed_handoff_ms();
  j["worker_peak_device_bytes"] = r.worker_peak_device_bytes();
  j["decoder_peak_device_bytes"] = r.decoder_peak_device_bytes();
  j["sparse"] = {{"source", a.sparse}};
  if (r.heads_run_size() == 4)  // what ran, as generate --json reports it
    j["sparse"]["heads_run"] = {{"dense", r.heads_run(0)},
                                {"a_shape", r.heads_run(1)},
                                {"vertical_slash", r.heads_run(2)},
                                {"block_sparse", r.heads_run(3)}};
  // The work split the group ran: the coordinator's token layout, unless the sparse-aware
  // re-balance replaced it.
  j["sp_rebalanced"] = r.sp_rebalanced();
  j["sp_imbalance"] = r.sp_imbalance();
  j["tp_imbalance"] = r.tp_imbalance();
  j["tp_replaced"] = r.tp_replaced();
  j["tp_replace_ms"] = r.tp_replace_ms();
  if (r.audit_size() > 0) {
    nlohmann::json audit = nlohmann::json::array();
    for (const auto& h : r.audit())
      audit.push_back({{"layer", h.layer()},
                       {"head", h.head()},
                       {"pattern", h.pattern()},
                       {"recall", h.recall()},
                       {"output_rel_error", h.output_rel_error()}});
    j["audit"] = audit;
  }
  if (!r.text().empty() || !p.text.empty()) j["text"] = r.text();
  nlohmann::json ranks = nlohmann::json::array();
  for (const auto& b : r.ranks())
    ranks.push_back({{"total_ms", b.total_ms()},
                     {"gemm_ms", b.gemm_ms()},
                     {"attention_ms", b.attention_ms()},
                     {"estimate_ms", b.estimate_ms()},
                     {"comm_ms", b.comm_ms()},
                     {"kv_export_ms", b.kv_export_ms()},
                     {"sp_imbalance", b.sp_imbalance()},
                     {"tp_imbalance", b.tp_imbalance()}});
  j["rank_breakdown"] = ranks;
  return j;
}

// What ran over the group, as generate says it.
std::string heads_ran(const v1::JobResult& r) {
  if (r.heads_run_size() != 4) return "?";
  const std::string s =
      heads_summary({r.heads_run(0), r.heads_run(1), r.heads_run(2), r.heads_run(3)});
  return s.empty() ? "?" : s;
}

}  // namespace

int print_outcome(const Outcome& o, const ServiceArgs& a, const PromptInput& p,
                  const std::optional<Tokenizer>& tok, const nlohmann::json& extra) {
  if (a.json) {
    nlohmann::json j = outcome_json(o, a, p);
    if (o.status == "DONE" && tok && j.value("text", std::string()).empty()) {
      std::string text;
      int prev = p.ids.empty() ? 1 : p.ids.back();
      for (int id : o.result.generated_ids()) {
        text += tok->decode_token(prev, id);
        prev = id;
      }
      j["text"] = text;
    }
    if (extra.is_object())
      for (auto it = extra.begin(); it != extra.end(); ++it) j[it.key()] = it.value();
    std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
  }
  if (o.status == "QUEUED") {
    if (!a.json) std::cout << o.job_id << std::endl;
    return 0;
  }
  if (o.status != "DONE") {
    std::fprintf(stderr, "mprefill: error: job %llu %s: %s%s%s\n",
                 static_cast<unsigned long long>(o.job_id), o.status.c_str(),
                 o.code != v1::ERROR_CODE_UNSPECIFIED ? v1::ErrorCode_Name(o.code).c_str() : "",
                 o.code != v1::ERROR_CODE_UNSPECIFIED ? ": " : "", one_line(o.error).c_str());
    return o.status == "INTERRUPTED" ? 130 : 1;
  }
  if (a.json) return 0;
  const auto& r = o.result;
  std::string text = r.text();
  if (text.empty() && tok) {
    int prev = p.ids.empty() ? 1 : p.ids.back();
    for (int id : r.generated_ids()) {
      text += tok->decode_token(prev, id);
      prev = id;
    }
  }
  if (!p.text.empty() && (!text.empty() || tok)) {
    std::cout << p.text << text << std::endl;
  } else {
    for (int i = 0; i < r.generated_ids_size(); ++i)
      std::cout << (i ? "," : "") << r.generated_ids(i);
    std::cout << std::endl;
  }
  std::fprintf(stderr,
               "mprefill: job %llu DONE: %lld prompt tokens, ttft %.1f ms (queue %.1f, prefill "
               "%.1f), KV %llu bytes handed off over %s in %.1f ms (%s GB/s; exposed %.1f ms after "
               "the prefill), %d decoded in %.1f ms, stop: %s, heads: %s\n",
               static_cast<unsigned long long>(o.job_id), static_cast<long long>(r.prompt_tokens()),
               r.ttft_ms(), r.queue_ms(), r.prefill_ms(),
               static_cast<unsigned long long>(r.kv_bytes_handed_off()),
               r.kv_transport().empty() ? "?" : r.kv_transport().c_str(), r.handoff_ms(),
               gbps(r.kv_bytes_handed_off(), r.handoff_ms()).c_str(), r.exposed_handoff_ms(),
               std::max(0, r.generated_ids_size() - 1), r.decode_ms(), r.stopped_by().c_str(),
               heads_ran(r).c_str());
  double sum = 0, lo = 1;
  for (const auto& h : r.audit()) {
    std::fprintf(stderr, "mprefill: audit layer %d head %d (%s): recall %.4f, output error %.3g\n",
                 h.layer(), h.head(), h.pattern().c_str(), h.recall(), h.output_rel_error());
    sum += h.recall();
    lo = std::min(lo, h.recall());
  }
  if (r.audit_size() > 0)
    std::fprintf(stderr, "mprefill: audit of job %llu: %d heads, recall mean %.4f, min %.4f\n",
                 static_cast<unsigned long long>(o.job_id), r.audit_size(), sum / r.audit_size(),
                 lo);
  return 0;
}

}  // namespace mprefill::cli
