// Prometheus text exposition (format 0.0.4) of the coordinator's counters. The
// coordinator fills a MetricsSnapshot under its state lock; render() formats it.
#pragma once
#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace mprefill::coord {

// Cumulative histogram with fixed upper bounds (seconds).
class Histogram {
 public:
  static constexpr std::array<double, 13> kBounds = {0.05, 0.1, 0.25, 0.5, 1,   2.5, 5,
                                                     10,   30,  60,   120, 300, 900};
  void observe(double v);
  // Appends "# TYPE name histogram" and its _bucket / _sum / _count lines.
  void render(const std::string& name, const std::string& help, std::string* out) const;
  uint64_t count() const { return count_; }

 private:
  std::array<uint64_t, kBounds.size()> buckets_{};  // non-cumulative per bound
  uint64_t count_ = 0;
  double sum_ = 0;
};

struct MetricsSnapshot {
  // Jobs now in each active state, and jobs that ended in each terminal state.
  int64_t queued = 0, running = 0, handing_off = 0, decoding = 0;
  uint64_t done = 0, failed = 0, cancelled = 0, refused = 0;
  uint64_t kv_bytes_handed_off = 0;
  uint64_t bad_frames = 0;
  int64_t groups_alive = 0, groups_busy = 0, decoders_alive = 0;
  int64_t connections = 0;
  uint64_t refused_connections = 0;  // over --max-connections
  int64_t pre_hello = 0;             // connections before their hello
  uint64_t pre_hello_closed = 0;     // closed before their hello (any reason)
  int64_t large_frame_bytes = 0;     // granted to partial large client frames
  uint64_t log_suppressed = 0;       // refusal log lines over 1/s
  bool insecure = false;             // beyond loopback without TLS or credentials
  Histogram ttft, prefill, handoff;
  // Online head audit (JobOptions.audit_heads): totals over all audited heads, the
  // lowest recall of the last audited job, and the last value per (layer, head).
  uint64_t audit_heads = 0;
  double audit_recall_sum = 0, audit_error_sum = 0;
  double audit_min_recall_last = 1.0;
  struct HeadAuditValue {
    std::string pattern;
    double recall = 1.0, output_rel_error = 0.0;
  };
  std::map<std::pair<int, int>, HeadAuditValue> audit_last;  // (layer, head)
};

std::string render_metrics(const MetricsSnapshot& m);

}  // namespace mprefill::coord
