#include "worker/control.h"

#include <algorithm>
#include <cstring>

namespace mprefill::worker {

// The edge check, re-thrown as CommFailure: the service tells a broken group by its type.
void Control::check(Status st, const char* what) {
  try {
    MPREFILL_EDGE_CHECK(st, std::string("control ") + what, c_->last_error());
  } catch (const StatusError& e) {
    throw CommFailure(e.what(), e.status());
  }
}

void Control::bcast(std::string* s) {
  int64_t len = rank() == 0 ? static_cast<int64_t>(s->size()) : 0;
  check(c_->broadcast(&len, 1, DType::kI64, 0, nullptr), "broadcast of a length");
  std::vector<int32_t> buf((len + 3) / 4);
  if (rank() == 0 && len > 0) std::memcpy(buf.data(), s->data(), len);
  if (!buf.empty())
    check(c_->broadcast(buf.data(), buf.size(), DType::kI32, 0, nullptr), "broadcast");
  s->assign(reinterpret_cast<const char*>(buf.data()), len);
}

std::vector<std::string> Control::all_gather(const std::string& mine) {
  std::vector<int32_t> rec(kRecord / 4, 0), all(kRecord / 4 * size(), 0);
  std::memcpy(rec.data(), mine.data(), std::min(mine.size(), kRecord - 1));
  check(c_->all_gather(rec.data(), all.data(), rec.size(), DType::kI32, nullptr), "all_gather");
  std::vector<std::string> out;
  for (int r = 0; r < size(); ++r) {
    const char* p = reinterpret_cast<const char*>(all.data() + r * rec.size());
    out.emplace_back(p, strnlen(p, kRecord));
  }
  return out;
}

int Control::agree(const std::string& my_error, std::string* msg) {
  const auto all = all_gather(my_error);
  for (int r = 0; r < size(); ++r)
    if (!all[r].empty()) {
      *msg = all[r];
      return r;
    }
  return -1;
}

int64_t Control::max(int64_t v) {
  int64_t out = 0;
  check(c_->all_reduce(&v, &out, 1, DType::kI64, comm::ReduceOp::kMax, nullptr), "all_reduce");
  return out;
}

double Control::sum(double v) {
  int64_t in = static_cast<int64_t>(v), out = 0;
  check(c_->all_reduce(&in, &out, 1, DType::kI64, comm::ReduceOp::kSum, nullptr), "all_reduce");
  return static_cast<double>(out);
}

}  // namespace mprefill::worker
