// Cases for the self-test of skip reporting (tests/selftest/skip_reporting_test.sh),
// linked once with tests/test_main.cc and once with tests/mpi/mpi_test_main.cc. Each
// ctest entry of the self-test runs a --gtest_filter over these; run alone, the binary
// fails on purpose (SkipSelftest.Fails).
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "tests/testutil.h"

namespace mprefill {
namespace {

TEST(SkipSelftest, Passes) {
  const std::string joined = std::string("skip") + "-" + "selftest";
  EXPECT_EQ(joined.size(), 13u);
}

TEST(SkipSelftest, Skips) { GTEST_SKIP() << "self-test: skipped on purpose"; }

TEST(SkipSelftest, Fails) { ADD_FAILURE() << "self-test: fails on purpose"; }

// A skip naming MPREFILL_SELFTEST_PATH as its missing input, whether or not it exists
// (a test that looked in the wrong place): launch/check_skips.py must flag it when the
// path exists.
TEST(SkipSelftest, SkipsNamingAPath) {
  const char* p = std::getenv("MPREFILL_SELFTEST_PATH");
  ASSERT_NE(p, nullptr) << "set MPREFILL_SELFTEST_PATH";
  GTEST_SKIP() << test::missing_file(p, "self-test input");
}

}  // namespace
}  // namespace mprefill
