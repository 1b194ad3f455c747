# KV handoff and decoder tests (issue 6): tests/cpu/handoff_test.cc, tests/cpu/decoder_test.cc
# link the handoff sender and the decoder service on top of mprefill_testutil.
foreach(t handoff_test decoder_test)
  if(TARGET ${t})
    if(TARGET mprefill_decode)
      target_link_libraries(${t} PRIVATE mprefill_decode)
    else()
      set_target_properties(${t} PROPERTIES EXCLUDE_FROM_ALL ON)
    endif()
  endif()
endforeach()

# The service binaries on their own: --help, bad arguments (exit 2 with one error line),
# a group whose coordinator is not there (bounded: exits 1 naming it), --tp that does not
# divide the ranks. The end-to-end runs (`mprefill run`) are the service tests.
if(TARGET mprefill-worker AND TARGET mprefill-decoder AND TARGET mprefill_decode)
  string(REPLACE ";" " " handoff_mpirun "${MPREFILL_MPIRUN}")
  add_test(NAME handoff_worker_help COMMAND mprefill-worker --help)
  set_tests_properties(handoff_worker_help PROPERTIES TIMEOUT 30 LABELS cpu
    PASS_REGULAR_EXPRESSION "mpirun -np N mprefill-worker --coordinator HOST:PORT")
  add_test(NAME handoff_decoder_help COMMAND mprefill-decoder --help)
  set_tests_properties(handoff_decoder_help PROPERTIES TIMEOUT 30 LABELS cpu
    PASS_REGULAR_EXPRESSION "usage: mprefill-decoder --coordinator HOST:PORT")
  add_test(NAME handoff_decoder_bad_args
    COMMAND sh -c "$<TARGET_FILE:mprefill-decoder> --coordinator 127.0.0.1:1 --model x --max-jobs 0; echo rc=$?")
  set_tests_properties(handoff_decoder_bad_args PROPERTIES TIMEOUT 30 LABELS cpu
    PASS_REGULAR_EXPRESSION "error: --max-jobs must be in \\[1, 65536\\], got 0\nrc=2")
  add_test(NAME handoff_decoder_no_coordinator
    COMMAND sh -c "$<TARGET_FILE:mprefill-decoder> --coordinator 127.0.0.1:1 --model random:tiny:1; echo rc=$?")
  set_tests_properties(handoff_decoder_no_coordinator PROPERTIES TIMEOUT 60 LABELS cpu
    PASS_REGULAR_EXPRESSION "mprefill-decoder: coordinator 127.0.0.1:1: .*\nrc=1")
  add_test(NAME handoff_worker_no_coordinator_np2
    COMMAND sh -c "${handoff_mpirun} -np 2 $<TARGET_FILE:mprefill-worker> --coordinator 127.0.0.1:1 --model random:tiny:1 --connect-timeout-ms 2000; echo rc=$?")
  set_tests_properties(handoff_worker_no_coordinator_np2 PROPERTIES TIMEOUT 120
    LABELS "cpu;mpi" ENVIRONMENT "${MPREFILL_MPI_ENV}"
    PASS_REGULAR_EXPRESSION "mprefill-worker: coordinator 127.0.0.1:1: .*\nrc=1")
  add_test(NAME handoff_worker_bad_tp_np2
    COMMAND sh -c "${handoff_mpirun} -np 2 $<TARGET_FILE:mprefill-worker> --coordinator 127.0.0.1:1 --model random:tiny:1 --tp 3; echo rc=$?")
  set_tests_properties(handoff_worker_bad_tp_np2 PROPERTIES TIMEOUT 120
    LABELS "cpu;mpi" ENVIRONMENT "${MPREFILL_MPI_ENV}"
    PASS_REGULAR_EXPRESSION "rank 0: --tp 3 does not divide the 2 ranks\n.*rc=1")
endif()

# DistEngine ranks -> TCP handoff -> the decoder's store, under mpirun (tp x sp: 1x2, 2x2).
if(TARGET mprefill_decode)
  add_executable(mpi_dist_handoff_test handoff/dist_handoff_test.cc mpi/mpi_test_main.cc)
  target_link_libraries(mpi_dist_handoff_test PRIVATE mprefill_decode mprefill_comm GTest::gtest)
  foreach(topo "1;2" "2;2")
    list(GET topo 0 tp)
    list(GET topo 1 sp)
    math(EXPR np "${tp} * ${sp}")
    add_test(NAME mpi_dist_handoff_tp${tp}_sp${sp}
      COMMAND ${MPREFILL_MPIRUN} -np ${np} $<TARGET_FILE:mpi_dist_handoff_test>)
    set_tests_properties(mpi_dist_handoff_tp${tp}_sp${sp} PROPERTIES TIMEOUT 180
      LABELS "cpu;mpi" ENVIRONMENT "${MPREFILL_MPI_ENV};MPREFILL_TEST_TP=${tp};MPREFILL_THREADS=1")
  endforeach()
endif()
