// Communicator (MPI backend) under mpirun: every rank runs every test; data encodes
// rank and position so each rank checks itself; failures are summed over ranks.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <vector>

#include "comm/mpi_comm.h"
#include "tests/mpi/mpi_testutil.h"

namespace mprefill::comm {
namespace {

using test::mpi::expect_all_ranks_ok;
using test::mpi::world;

float encode(int rank, size_t i) { return static_cast<float>(rank * 1000003 + (i % 9973)) * 0.5f; }

TEST(MpiComm, AllReduceSumAndMax) {
  auto c = world();
  const int n = c->size(), r = c->rank();
  for (size_t count : {size_t{1}, size_t{1000}, size_t{(1 << 20) + 3}}) {
    std::vector<float> x(count), sum(count), mx(count);
    for (size_t i = 0; i < count; ++i) x[i] = encode(r, i);
    ASSERT_EQ(c->all_reduce(x.data(), sum.data(), count, DType::kF32, ReduceOp::kSum, nullptr),
              Status::kOk);
    ASSERT_EQ(c->all_reduce(x.data(), mx.data(), count, DType::kF32, ReduceOp::kMax, nullptr),
              Status::kOk);
    bool ok = true;
    for (size_t i = 0; i < count && ok; ++i) {
      double want = 0;
      for (int k = 0; k < n; ++k) want += encode(k, i);
      ok &= std::fabs(sum[i] - want) <= 1e-6 * std::fabs(want) + 1e-3;
      ok &= mx[i] == encode(n - 1, i);
    }
    // In place.
    std::vector<float> y = x;
    ASSERT_EQ(c->all_reduce(y.data(), y.data(), count, DType::kF32, ReduceOp::kSum, nullptr),
              Status::kOk);
    ok &= y == sum;
    expect_all_ranks_ok(*c, ok);
  }
}

TEST(MpiComm, AllGatherAndBroadcast) {
  auto c = world();
  const int n = c->size(), r = c->rank();
  const size_t count = 4099;
  std::vector<int64_t> mine(count), all(count * n);
  for (size_t i = 0; i < count; ++i) mine[i] = int64_t{r} << 40 | static_cast<int64_t>(i);
  ASSERT_EQ(c->all_gather(mine.data(), all.data(), count, DType::kI64, nullptr), Status::kOk);
  bool ok = true;
  for (int k = 0; k < n; ++k)
    for (size_t i = 0; i < count; ++i) ok &= all[k * count + i] == (int64_t{k} << 40 | int64_t(i));
  for (int root = 0; root < n; ++root) {
    std::vector<float> b(777);
    for (size_t i = 0; i < b.size(); ++i) b[i] = r == root ? encode(root, i) : -1.f;
    ASSERT_EQ(c->broadcast(b.data(), b.size(), DType::kF32, root, nullptr), Status::kOk);
    for (size_t i = 0; i < b.size(); ++i) ok &= b[i] == encode(root, i);
  }
  expect_all_ranks_ok(*c, ok);
}

// One ring step as the ring pass-KV does it: send to the next rank, receive from the
// previous one, both posted in one group; repeated size-1 times the data goes round.
TEST(MpiComm, RingSendRecvInGroups) {
  auto c = world();
  const int n = c->size(), r = c->rank();
  const size_t count = 65537;
  std::vector<uint16_t> cur(count), next(count);
  for (size_t i = 0; i < count; ++i) cur[i] = static_cast<uint16_t>(r * 31 + i);
  bool ok = true;
  for (int step = 1; step < n; ++step) {
    ASSERT_EQ(c->group_start(), Status::kOk);
    ASSERT_EQ(c->send(cur.data(), count, DType::kBF16, (r + 1) % n, nullptr), Status::kOk);
    ASSERT_EQ(c->recv(next.data(), count, DType::kBF16, (r - 1 + n) % n, nullptr), Status::kOk);
    ASSERT_EQ(c->group_end(), Status::kOk) << c->last_error();
    const int src = ((r - step) % n + n) % n;
    for (size_t i = 0; i < count; ++i) ok &= next[i] == static_cast<uint16_t>(src * 31 + i);
    cur.swap(next);
  }
  expect_all_ranks_ok(*c, ok);
}

TEST(MpiComm, SplitIntoTensorAndSequenceGroups) {
  auto c = world();
  const int n = c->size(), r = c->rank();
  const int tp = n % 2 == 0 ? 2 : 1, sp = n / tp;
  auto tp_comm = c->split(r / tp, r % tp);  // ranks of one sp slot share a tp group
  auto sp_comm = c->split(r % tp, r / tp);
  ASSERT_TRUE(tp_comm && sp_comm);
  bool ok = tp_comm->size() == tp && sp_comm->size() == sp && tp_comm->rank() == r % tp &&
            sp_comm->rank() == r / tp;
  int32_t x = r, s = 0;
  ASSERT_EQ(sp_comm->all_reduce(&x, &s, 1, DType::kI32, ReduceOp::kSum, nullptr), Status::kOk);
  int32_t want = 0;
  for (int k = 0; k < sp; ++k) want += k * tp + r % tp;
  ok &= s == want;
  expect_all_ranks_ok(*c, ok);
}

// A receive whose peer never sends ends with kTimeout naming rank and peer, and the
// communicator stays usable afterwards.
TEST(MpiComm, ReceiveFromSilentPeerTimesOut) {
  auto c = world(300);
  if (c->size() < 2) GTEST_SKIP() << "needs 2 ranks";
  bool ok = true;
  if (c->rank() == 1) {
    float buf[4];
    const Status s = c->recv(buf, 4, DType::kF32, 0, nullptr);
    ok &= s == Status::kTimeout;
    ok &= c->last_error().find("rank 1") != std::string::npos;
    ok &= c->last_error().find("peer 0") != std::string::npos;
    ok &= c->last_error().find("timed out after 300 ms") != std::string::npos;
    EXPECT_EQ(s, Status::kTimeout);
    EXPECT_NE(c->last_error().find("peer 0"), std::string::npos) << c->last_error();
  }
  auto c2 = world();
  expect_all_ranks_ok(*c2, ok);
}

TEST(MpiComm, BadArgumentsAreRejected) {
  auto c = world();
  float x = 1.f;
  EXPECT_EQ(c->send(&x, 1, DType::kF32, c->size(), nullptr), Status::kInvalidArgument);
  EXPECT_EQ(c->broadcast(&x, 1, DType::kF32, -1, nullptr), Status::kInvalidArgument);
  uint16_t h = 0;
  EXPECT_EQ(c->all_reduce(&h, &h, 1, DType::kBF16, ReduceOp::kSum, nullptr), Status::kUnsupported);
  EXPECT_EQ(c->group_end(), Status::kInvalidArgument);
}

}  // namespace
}  // namespace mprefill::comm
