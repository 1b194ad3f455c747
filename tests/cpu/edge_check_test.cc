// The one edge check (kernels/edge_check.h): status, rank, device, file:line and the
// backend's text all reach the exception; kOk throws nothing.
#include "kernels/edge_check.h"

#include <gtest/gtest.h>

#include <string>

namespace mprefill {
namespace {

std::string message_of(Status s, const std::string& backend) {
  try {
    MPREFILL_EDGE_CHECK(s, "flash attention at layer 7", backend);
  } catch (const StatusError& e) {
    EXPECT_EQ(e.status(), s);
    return e.what();
  }
  return "";
}

TEST(EdgeCheck, OkThrowsNothing) {
  set_edge_context(-1, -1);
  EXPECT_NO_THROW(MPREFILL_EDGE_CHECK(Status::kOk, "x", std::string("never read")));
}

TEST(EdgeCheck, MessageCarriesRankDeviceBackendTextAndLocation) {
  set_edge_context(3, 1);
  const std::string m = message_of(Status::kCudaError, "cudaMemcpyAsync: illegal address");
  set_edge_context(-1, -1);
  EXPECT_EQ(m.rfind("rank 3 (cuda:1): flash attention at layer 7 failed: CUDA error "
                    "(cudaMemcpyAsync: illegal address) [tests/cpu/edge_check_test.cc:",
                    0),
            0u)
      << m;
  EXPECT_EQ(m.back(), ']') << m;
}

TEST(EdgeCheck, ContextPartsLeftOutWhenUnset) {
  set_edge_context(-1, -1);
  EXPECT_EQ(
      message_of(Status::kTimeout, "").rfind("flash attention at layer 7 failed: timeout [", 0),
      0u);
  set_edge_context(2, -1);
  EXPECT_EQ(message_of(Status::kCommError, "").rfind("rank 2: flash", 0), 0u);
  set_edge_context(-1, 0);
  EXPECT_EQ(message_of(Status::kCommError, "").rfind("cuda:0: flash", 0), 0u);
  set_edge_context(-1, -1);
}

// The decoder has a role and a device but no rank (tools/mprefill_decoder_main.cc).
TEST(EdgeCheck, RoleNamedBeforeRankAndDevice) {
  set_edge_context(-1, -1, "decoder");
  EXPECT_EQ(message_of(Status::kTimeout, "").rfind("decoder: flash attention at layer 7", 0), 0u);
  set_edge_context(-1, 2, "decoder");
  EXPECT_EQ(message_of(Status::kCudaError, "").rfind("decoder (cuda:2): flash", 0), 0u);
  set_edge_context(1, 0, "worker");
  EXPECT_EQ(message_of(Status::kCommError, "").rfind("worker rank 1 (cuda:0): flash", 0), 0u);
  EXPECT_STREQ(edge_role(), "worker");
  set_edge_context(-1, -1);
  EXPECT_EQ(edge_role(), nullptr);
}

}  // namespace
}  // namespace mprefill
