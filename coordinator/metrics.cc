#include "coordinator/metrics.h"

#include <cstdio>

namespace mprefill::coord {

void Histogram::observe(double v) {
  for (size_t i = 0; i < kBounds.size(); ++i) {
    if (v <= kBounds[i]) {
      ++buckets_[i];
      break;
    }
  }
  ++count_;
  sum_ += v;
}

namespace {

std::string num(double v) {
  char b[64];
  std::snprintf(b, sizeof(b), "%.17g", v);
  return b;
}

void line(std::string* out, const std::string& name, const std::string& labels, double v) {
  *out += name;
  if (!labels.empty()) *out += "{" + labels + "}";
  *out += " " + num(v) + "\n";
}

void head(std::string* out, const std::string& name, const std::string& type,
          const std::string& help) {
  *out += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
}

}  // namespace

void Histogram::render(const std::string& name, const std::string& help, std::string* out) const {
  head(out, name, "histogram", help);
  uint64_t cum = 0;
  for (size_t i = 0; i < kBounds.size(); ++i) {
    cum += buckets_[i];
    char le[32];
    std::snprintf(le, sizeof(le), "%g", kBounds[i]);  // bounds print exactly with %g
    line(out, name + "_bucket", std::string("le=\"") + le + "\"", static_cast<double>(cum));
  }
  line(out, name + "_bucket", "le=\"+Inf\"", static_cast<double>(count_));
  line(out, name + "_sum", "", sum_);
  line(out, name + "_count", "", static_cast<double>(count_));
}

std::string render_metrics(const MetricsSnapshot& m) {
  std::string o;
  head(&o, "mprefill_jobs", "gauge", "Jobs now in an active state.");
  line(&o, "mprefill_jobs", "state=\"queued\"", static_cast<double>(m.queued));
  line(&o, "mprefill_jobs", "state=\"running\"", static_cast<double>(m.running));
  line(&o, "mprefill_jobs", "state=\"handing_off\"", static_cast<double>(m.handing_off));
  line(&o, "mprefill_jobs", "state=\"decoding\"", static_cast<double>(m.decoding));
  head(&o, "mprefill_jobs_finished_total", "counter", "Jobs that reached a terminal state.");
  line(&o, "mprefill_jobs_finished_total", "state=\"done\"", static_cast<double>(m.done));
  line(&o, "mprefill_jobs_finished_total", "state=\"failed\"", static_cast<double>(m.failed));
  line(&o, "mprefill_jobs_finished_total", "state=\"cancelled\"", static_cast<double>(m.cancelled));
  head(&o, "mprefill_jobs_refused_total", "counter",
       "Submissions refused before queueing (validation, admission, queue full).");
  line(&o, "mprefill_jobs_refused_total", "", static_cast<double>(m.refused));
  head(&o, "mprefill_queue_length", "gauge", "Jobs waiting for a worker group or decoder.");
  line(&o, "mprefill_queue_length", "", static_cast<double>(m.queued));
  head(&o, "mprefill_kv_bytes_handed_off_total", "counter",
       "KV bytes handed off to decoders by finished prefills.");
  line(&o, "mprefill_kv_bytes_handed_off_total", "", static_cast<double>(m.kv_bytes_handed_off));
  head(&o, "mprefill_bad_frames_total", "counter", "Connections closed for a bad frame.");
  line(&o, "mprefill_bad_frames_total", "", static_cast<double>(m.bad_frames));
  head(&o, "mprefill_worker_groups", "gauge", "Registered live worker groups.");
  line(&o, "mprefill_worker_groups", "busy=\"true\"", static_cast<double>(m.groups_busy));
  line(&o, "mprefill_worker_groups", "busy=\"false\"",
       static_cast<double>(m.groups_alive - m.groups_busy));
  head(&o, "mprefill_decoders", "gauge", "Registered live decoders.");
  line(&o, "mprefill_decoders", "", static_cast<double>(m.decoders_alive));
  head(&o, "mprefill_connections", "gauge", "Open TCP connections (all roles).");
  line(&o, "mprefill_connections", "", static_cast<double>(m.connections));
  head(&o, "mprefill_connections_refused_total", "counter",
       "Connections refused over --max-connections.");
  line(&o, "mprefill_connections_refused_total", "", static_cast<double>(m.refused_connections));
  head(&o, "mprefill_pre_hello_connections", "gauge",
       "Connections that have not finished their hello (--max-pre-hello).");
  line(&o, "mprefill_pre_hello_connections", "", static_cast<double>(m.pre_hello));
  head(&o, "mprefill_pre_hello_closed_total", "counter",
       "Connections closed before their hello: deadline, pool full, refused hello.");
  line(&o, "mprefill_pre_hello_closed_total", "", static_cast<double>(m.pre_hello_closed));
  head(&o, "mprefill_large_frame_bytes", "gauge",
       "Bytes granted to partially received large client frames (--max-large-frame-bytes).");
  line(&o, "mprefill_large_frame_bytes", "", static_cast<double>(m.large_frame_bytes));
  head(&o, "mprefill_insecure", "gauge",
       "1: listening beyond loopback without TLS or credentials (--insecure).");
  line(&o, "mprefill_insecure", "", m.insecure ? 1.0 : 0.0);
  head(&o, "mprefill_log_lines_suppressed_total", "counter",
       "Refusal log lines left out by the 1 line/s limit.");
  line(&o, "mprefill_log_lines_suppressed_total", "", static_cast<double>(m.log_suppressed));
  m.ttft.render("mprefill_ttft_seconds", "Submit to first token known.", &o);
  m.prefill.render("mprefill_prefill_seconds", "Prefill time reported by the worker group.", &o);
  m.handoff.render("mprefill_handoff_seconds", "KV handoff time reported by the worker group.", &o);
  if (m.audit_heads > 0) {
    head(&o, "mprefill_audit_recall", "summary",
         "Attention mass captured by the sparse mask, over every audited head.");
    line(&o, "mprefill_audit_recall_sum", "", m.audit_recall_sum);
    line(&o, "mprefill_audit_recall_count", "", static_cast<double>(m.audit_heads));
    head(&o, "mprefill_audit_output_rel_error", "summary",
         "max|sparse - dense| / max|dense| of audited heads' outputs.");
    line(&o, "mprefill_audit_output_rel_error_sum", "", m.audit_error_sum);
    line(&o, "mprefill_audit_output_rel_error_count", "", static_cast<double>(m.audit_heads));
    head(&o, "mprefill_audit_min_recall", "gauge", "Lowest head recall of the last audited job.");
    line(&o, "mprefill_audit_min_recall", "", m.audit_min_recall_last);
    head(&o, "mprefill_audit_head_recall", "gauge", "Last audited recall per head.");
    for (const auto& [lh, v] : m.audit_last)
      line(&o, "mprefill_audit_head_recall",
           "layer=\"" + std::to_string(lh.first) + "\",head=\"" + std::to_string(lh.second) +
               "\",pattern=\"" + v.pattern + "\"",
           v.recall);
    head(&o, "mprefill_audit_head_output_rel_error", "gauge",
         "Last audited output error per head.");
    for (const auto& [lh, v] : m.audit_last)
      line(&o, "mprefill_audit_head_output_rel_error",
           "layer=\"" + std::to_string(lh.first) + "\",head=\"" + std::to_string(lh.second) +
               "\",pattern=\"" + v.pattern + "\"",
           v.output_rel_error);
  }
  return o;
}

}  // namespace mprefill::coord
