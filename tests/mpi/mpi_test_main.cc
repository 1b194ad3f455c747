// main() of the GoogleTest suites that run under mpirun: every rank runs every test and
// checks itself (tests agree on results through MPI); rank 0 alone prints. Every rank
// exits with the same status, combined over ranks (tests/exit_status.h): 1 when any rank
// failed or ran no test, else 77 (ctest: skipped) when any rank skipped a test, else 0.
// mpirun passes that status on.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>

#include "comm/mpi_comm.h"
#include "tests/exit_status.h"

int main(int argc, char** argv) {
  mprefill::comm::MpiRuntime mpi(&argc, &argv);
  testing::InitGoogleTest(&argc, argv);
  const bool rank0 = mprefill::comm::world_info().rank == 0;
  if (!rank0) {
    auto& listeners = testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  const int rc = RUN_ALL_TESTS();
  mprefill::test::RunOutcome mine = mprefill::test::run_outcome(rc);
  const int local[3] = {mine.failed ? 1 : 0, mine.selected == 0 ? 1 : 0, mine.skipped > 0 ? 1 : 0};
  int any[3] = {0, 0, 0};
  MPI_Allreduce(local, any, 3, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  // Rank 0 reports the others' verdicts as its own (its names list only its skips).
  mprefill::test::RunOutcome all = mine;
  all.failed = any[0] != 0;
  if (any[1] != 0) all.selected = 0;
  if (any[2] != 0 && all.skipped == 0) {
    all.skipped = 1;
    all.skipped_names = "(on another rank)";
  }
  std::fflush(stdout);
  return mprefill::test::exit_status(all, rank0);
}
