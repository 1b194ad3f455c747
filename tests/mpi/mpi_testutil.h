// Helpers of the suites that run under mpirun (main: mpi_test_main.cc).
#pragma once
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <random>
#include <vector>

#include "comm/mpi_comm.h"
#include "model/parallel_plan.h"

namespace mprefill::test::mpi {

// A communicator over MPI_COMM_WORLD with a bounded wait.
inline std::unique_ptr<comm::Communicator> world(int timeout_ms = 60000) {
  comm::CommConfig cfg;
  cfg.timeout_ms = timeout_ms;
  return comm::make_mpi_communicator(MPI_COMM_WORLD, cfg);
}

// The tp of a topology test (MPREFILL_TEST_TP, default 1; sp = ranks / tp).
inline int env_tp() {
  const char* e = std::getenv("MPREFILL_TEST_TP");
  return e ? std::max(1, std::atoi(e)) : 1;
}

// Every rank must agree that the test passed on every rank.
inline void expect_all_ranks_ok(comm::Communicator& c, bool ok) {
  int32_t bad = ok ? 0 : 1, total = 0;
  ASSERT_EQ(c.all_reduce(&bad, &total, 1, DType::kI32, comm::ReduceOp::kSum, nullptr), Status::kOk)
      << c.last_error();
  EXPECT_EQ(total, 0) << total << " rank(s) saw a wrong result";
}

// The same uniform(-amp, amp) values on every rank for a seed.
inline std::vector<float> random_tensor(size_t n, uint32_t seed, float amp = 2.f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(-amp, amp);
  std::vector<float> x(n);
  for (auto& e : x) e = dist(gen);
  return x;
}

// Rows of `ranges` gathered from a global [N][width] tensor.
inline std::vector<float> slice(const std::vector<float>& all, const TokenRanges& ranges,
                                int64_t width) {
  std::vector<float> out;
  for (auto [b, e] : ranges)
    out.insert(out.end(), all.begin() + b * width, all.begin() + e * width);
  return out;
}

}  // namespace mprefill::test::mpi
