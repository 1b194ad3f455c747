// Exit status of a GoogleTest run as ctest reads it. Every entry of tests/ carries
// SKIP_RETURN_CODE 77 (tests/CMakeLists.txt), so a binary whose tests skipped shows as
// "Skipped", never "Passed":
//   0   every selected test ran and none failed or skipped
//   1   a test failed, or no test was selected (a --gtest_filter that matches nothing)
//   77  none failed and at least one skipped
// A skip outranks the passes beside it: one ctest entry is one verdict, and an entry
// that skipped part of its tests did not check everything it names. Used by the mains
// (test_main.cc; mpi/mpi_test_main.cc combines the ranks).
#pragma once
#include <gtest/gtest.h>

#include <cstdio>
#include <string>

namespace mprefill::test {

constexpr int kSkipExit = 77;

struct RunOutcome {
  bool listing = false;  // --gtest_list_tests: nothing ran, the status is gtest's
  bool failed = false;
  int selected = 0, skipped = 0;
  std::string skipped_names;  // "Suite.Test Suite.Test2"
};

inline RunOutcome run_outcome(int gtest_status) {
  RunOutcome o;
#ifdef GTEST_FLAG_GET
  o.listing = GTEST_FLAG_GET(list_tests);
#else
  o.listing = ::testing::GTEST_FLAG(list_tests);
#endif
  const testing::UnitTest& u = *testing::UnitTest::GetInstance();
  o.failed = gtest_status != 0 || u.failed_test_count() > 0 || u.ad_hoc_test_result().Failed();
  o.selected = u.test_to_run_count();
  o.skipped = u.skipped_test_count();
  for (int i = 0; i < u.total_test_suite_count(); ++i) {
    const testing::TestSuite& s = *u.GetTestSuite(i);
    for (int j = 0; j < s.total_test_count(); ++j) {
      const testing::TestInfo& t = *s.GetTestInfo(j);
      if (t.should_run() && t.result()->Skipped()) {
        if (!o.skipped_names.empty()) o.skipped_names += ' ';
        o.skipped_names += std::string(s.name()) + "." + t.name();
      }
    }
  }
  return o;
}

// The status above; with `print`, one line saying why it is not 0 (on stdout, after
// GoogleTest's summary).
inline int exit_status(const RunOutcome& o, bool print) {
  if (o.listing) return o.failed ? 1 : 0;
  if (o.failed) return 1;
  if (o.selected == 0) {
    if (print) std::printf("MPREFILL-NO-TESTS: no test selected (check --gtest_filter)\n");
    return 1;
  }
  if (o.skipped > 0) {
    if (print)
      std::printf("MPREFILL-SKIPPED: %d of %d test(s) skipped: %s\n", o.skipped, o.selected,
                  o.skipped_names.c_str());
    return kSkipExit;
  }
  return 0;
}

}  // namespace mprefill::test
