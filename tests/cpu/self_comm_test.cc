// The one-rank group (comm/self_comm.h) that the single-process Engine runs DistEngine on:
// collectives copy, a peer does not exist, splits stay one rank.
#include "comm/self_comm.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

namespace mprefill::comm {
namespace {

TEST(SelfComm, CollectivesCopyAndPeersDoNotExist) {
  auto c = make_self_communicator();
  EXPECT_EQ(c->rank(), 0);
  EXPECT_EQ(c->size(), 1);
  EXPECT_STREQ(c->backend(), "self");
  const std::vector<int64_t> send = {15, -225, int64_t{1} << 40};
  std::vector<int64_t> recv(3, 0);
  ASSERT_EQ(c->all_reduce(send.data(), recv.data(), 3, DType::kI64, ReduceOp::kSum, nullptr),
            Status::kOk);
  EXPECT_EQ(recv, send);
  std::vector<int32_t> g(2, 0);
  const int32_t mine[2] = {7, -9};
  ASSERT_EQ(c->all_gather(mine, g.data(), 2, DType::kI32, nullptr), Status::kOk);
  EXPECT_EQ(g, (std::vector<int32_t>{7, -9}));
  float inplace[2] = {4.f, 5.f};
  ASSERT_EQ(c->all_reduce(inplace, inplace, 2, DType::kF32, ReduceOp::kMax, nullptr), Status::kOk);
  EXPECT_EQ(inplace[1], 5.f);
  EXPECT_EQ(c->broadcast(inplace, 2, DType::kF32, 0, nullptr), Status::kOk);
  EXPECT_EQ(c->broadcast(inplace, 2, DType::kF32, 1, nullptr), Status::kInvalidArgument);
  EXPECT_EQ(c->send(inplace, 2, DType::kF32, 1, nullptr), Status::kInvalidArgument);
  EXPECT_NE(c->last_error().find("send to peer 1 in a one-rank group"), std::string::npos)
      << c->last_error();
  EXPECT_EQ(c->recv(inplace, 2, DType::kF32, 0, nullptr), Status::kInvalidArgument);
  EXPECT_EQ(c->all_reduce(nullptr, inplace, 2, DType::kF32, ReduceOp::kSum, nullptr),
            Status::kInvalidArgument);
  auto sub = c->split(3, 0);
  ASSERT_TRUE(sub);
  EXPECT_EQ(sub->size(), 1);
  EXPECT_EQ(sub->rank(), 0);
}

}  // namespace
}  // namespace mprefill::comm
