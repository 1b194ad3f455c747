// main() of every single-process GoogleTest binary of tests/ (in place of gtest_main):
// the exit status tells ctest about skips (tests/exit_status.h).
#include <gtest/gtest.h>

#include <cstdio>

#include "tests/exit_status.h"

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  const int rc = RUN_ALL_TESTS();
  std::fflush(stdout);
  return mprefill::test::exit_status(mprefill::test::run_outcome(rc), true);
}
