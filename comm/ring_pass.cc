#include "comm/ring_pass.h"

#include <algorithm>
#include <chrono>
#include <exception>

namespace mprefill::comm {
namespace {

double ms_between(std::chrono::steady_clock::time_point a,
                  std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

Status fail(std::string* error, Status s, const std::string& what) {
  if (error) *error = what;
  return s;
}

}  // namespace

int64_t RingPlan::rows(int rank) const {
  int64_t n = 0;
  for (auto [b, e] : layout[rank]) n += e - b;
  return n;
}

int64_t RingPlan::max_rows() const {
  int64_t m = 0;
  for (int r = 0; r < size(); ++r) m = std::max(m, rows(r));
  return m;
}

int64_t RingPlan::sent_rows(int sender, int owner) const {
  if (!skip_causal) return rows(owner);
  const int n = size();
  int64_t lim = -1;
  for (int r = (sender + 1) % n; r != owner; r = (r + 1) % n)
    for (auto [b, e] : layout[r]) lim = std::max(lim, e - 1);
  int64_t cnt = 0;
  for (auto [b, e] : layout[owner]) cnt += std::max<int64_t>(0, std::min(e, lim + 1) - b);
  return cnt;
}

int64_t RingPlan::key_end(int rank) const {
  int64_t end = 0;
  if (!skip_causal) {
    for (const RingRanges& r : layout)
      for (auto [b, e] : r) end = std::max(end, e);
    return end;
  }
  for (auto [b, e] : layout[rank]) end = std::max(end, e);
  return end;
}

Status ring_pass(int rank, const RingPlan& plan, RingTransport& transport,
                 const std::function<Status(const RingStep&)>& compute, RingPassStats* stats,
                 std::string* error, const std::string& who) {
  using Clock = std::chrono::steady_clock;
  const int size = plan.size();
  if (rank < 0 || rank >= size)
    return fail(
        error, Status::kInvalidArgument,
        who + "rank " + std::to_string(rank) + " is not in a ring of " + std::to_string(size));
  const int next = (rank + 1) % size, prev = (rank + size - 1) % size;
  RingPassStats local;
  RingPassStats& st = stats ? *stats : local;
  for (int step = 0; step < size; ++step) {
    RingStep s;
    s.step = step;
    s.owner = (rank - step + size) % size;
    s.slot = step % 2;
    const bool moving = step + 1 < size;
    Status xfer = Status::kOk;
    if (moving) {
      // Post the transfer of this shard (and the receive of the next) before computing.
      const int incoming = (s.owner + size - 1) % size;
      const int64_t out_rows = plan.sent_rows(rank, s.owner);
      xfer = transport.post(s, out_rows, plan.sent_rows(prev, incoming));
      if (xfer == Status::kOk) st.rows_sent += out_rows;
    }
    const auto tc = Clock::now();
    Status comp = Status::kOk;
    try {
      comp = compute(s);
    } catch (...) {
      if (moving && xfer == Status::kOk) transport.complete(s);
      throw;
    }
    const auto tw = Clock::now();
    st.compute_ms += ms_between(tc, tw);
    if (moving && xfer == Status::kOk) xfer = transport.complete(s);
    st.wait_ms += ms_between(tw, Clock::now());
    if (comp != Status::kOk)
      return fail(error, comp,
                  who + "step " + std::to_string(step) + ": attention of the shard of rank " +
                      std::to_string(s.owner) + " failed: " + to_string(comp));
    if (xfer != Status::kOk)
      return fail(error, xfer,
                  who + "step " + std::to_string(step) + ": ring transfer (send to " +
                      std::to_string(next) + ", recv from " + std::to_string(prev) +
                      ") failed: " + transport.last_error());
  }
  return Status::kOk;
}

// ---------------------------------------------------------------- host transport

HostRingTransport::HostRingTransport(Communicator& sp, const float* k, const float* v,
                                     int64_t kv_row, int64_t max_rows)
    : sp_(sp), k0_(k), v0_(v), kv_row_(kv_row) {
  if (sp.size() > 1)
    for (int i = 0; i < 2; ++i) {
      kbuf_[i].resize(static_cast<size_t>(max_rows * kv_row));
      vbuf_[i].resize(static_cast<size_t>(max_rows * kv_row));
    }
}

HostRingTransport::~HostRingTransport() {
  if (xfer_.joinable()) xfer_.join();
}

namespace {

// One ring transfer, posted as a group: send (k, v) of send_count values to `to`, receive
// recv_count values into (rk, rv) from `from`. Zero-size messages are skipped on both
// sides (both derive the counts from the same plan). On failure `err` holds last_error().
Status exchange(Communicator& c, const float* k, const float* v, size_t send_count, float* rk,
                float* rv, size_t recv_count, int to, int from, std::string* err) {
  Status first = c.group_start();
  if (first != Status::kOk) {
    *err = c.last_error();
    return first;
  }
  auto keep = [&](Status s) {
    if (s != Status::kOk && first == Status::kOk) {
      first = s;
      *err = c.last_error();
    }
  };
  if (send_count > 0) {
    keep(c.send(k, send_count, DType::kF32, to, nullptr));
    keep(c.send(v, send_count, DType::kF32, to, nullptr));
  }
  if (recv_count > 0) {
    keep(c.recv(rk, recv_count, DType::kF32, from, nullptr));
    keep(c.recv(rv, recv_count, DType::kF32, from, nullptr));
  }
  keep(c.group_end());  // always closes the group, even after a failed post
  return first;
}

}  // namespace

Status HostRingTransport::post(const RingStep& s, int64_t send_rows, int64_t recv_rows) {
  const int size = sp_.size(), rank = sp_.rank();
  const int to = (rank + 1) % size, from = (rank + size - 1) % size;
  const float* ck = k(s.step);
  const float* cv = v(s.step);
  float* nk = kbuf_[(s.step + 1) % 2].data();
  float* nv = vbuf_[(s.step + 1) % 2].data();
  const size_t sc = static_cast<size_t>(send_rows * kv_row_);
  const size_t rc = static_cast<size_t>(recv_rows * kv_row_);
  status_ = Status::kOk;
  error_.clear();
  try {
    xfer_ = std::thread([this, ck, cv, sc, nk, nv, rc, to, from] {
      status_ = exchange(sp_, ck, cv, sc, nk, nv, rc, to, from, &error_);
    });
  } catch (const std::exception&) {  // thread creation failed: run it inline
    status_ = exchange(sp_, ck, cv, sc, nk, nv, rc, to, from, &error_);
  }
  return Status::kOk;
}

Status HostRingTransport::complete(const RingStep&) {
  if (xfer_.joinable()) xfer_.join();
  return status_;
}

}  // namespace mprefill::comm
