// main() of the GoogleTest suites that run under mpirun: every rank runs every test and
// checks itself (tests agree on results through MPI); rank 0 alone prints. The exit
// status is the worst over ranks, so one failing rank fails the ctest entry.
#include <gtest/gtest.h>
#include <mpi.h>

#include "comm/mpi_comm.h"

int main(int argc, char** argv) {
  mprefill::comm::MpiRuntime mpi(&argc, &argv);
  testing::InitGoogleTest(&argc, argv);
  if (mprefill::comm::world_info().rank != 0) {
    auto& listeners = testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  const int rc = RUN_ALL_TESTS();
  int worst = 0;
  MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return worst;
}
