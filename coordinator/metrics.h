// Prometheus text exposition (format 0.0.4) of the coordinator's counters. The
// coordinator fills a MetricsSnapshot under its state lock; render() formats it.
#pragma once
#include <array>
#include <cstdint>
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
  int64_t queued = 0, running = 0, handing_off = 0;
  uint64_t done = 0, failed = 0, cancelled = 0, refused = 0;
  uint64_t kv_bytes_handed_off = 0;
  uint64_t bad_frames = 0;
  int64_t groups_alive = 0, groups_busy = 0, decoders_alive = 0;
  int64_t connections = 0;
  Histogram ttft, prefill, handoff;
};

std::string render_metrics(const MetricsSnapshot& m);

}  // namespace mprefill::coord
