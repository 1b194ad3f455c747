# Online accuracy audit (engine/audit.h) of the DistEngine against the single-process
# Engine, CPU ranks under mpirun; topology through MPREFILL_TEST_TP (sp = ranks / tp).
# tests/cpu/audit_test.cc is registered with the cpu suites.
add_executable(mpi_audit_dist_test mpi/audit_dist_test.cc mpi/mpi_test_main.cc)
target_link_libraries(mpi_audit_dist_test PRIVATE mprefill_comm mprefill_engine
  mprefill_testutil GTest::gtest)
# tp x sp: 1x1, 2x1, 1x2, 2x2. The stories15M case is an entry of its own: without the
# model it skips, and the random-model entries still pass.
foreach(topo "1;1" "2;1" "1;2" "2;2")
  list(GET topo 0 tp)
  list(GET topo 1 sp)
  math(EXPR np "${tp} * ${sp}")
  foreach(part "tp;Tiny" "stories_tp;Stories")
    list(GET part 0 prefix)
    list(GET part 1 suite)
    set(name mpi_audit_dist_${prefix}${tp}_sp${sp})
    add_test(NAME ${name} COMMAND ${MPREFILL_MPIRUN} -np ${np}
      $<TARGET_FILE:mpi_audit_dist_test> --gtest_filter=DistAudit.${suite}*)
    set_tests_properties(${name} PROPERTIES TIMEOUT 120 LABELS "cpu;mpi"
      ENVIRONMENT "${MPREFILL_MPI_ENV};MPREFILL_TEST_TP=${tp};MPREFILL_THREADS=1")
  endforeach()
endforeach()
