# Distributed prefill engine (DistEngine) against the single-process Engine, CPU ranks
# under mpirun. One ctest entry per (topology, test); the topology goes in through
# MPREFILL_TEST_TP (sp = ranks / tp). One kernel thread per rank: CI oversubscribes 4
# ranks on 2 cores.
add_executable(mpi_dist_engine_test mpi/dist_engine_test.cc mpi/mpi_test_main.cc)
target_link_libraries(mpi_dist_engine_test PRIVATE mprefill_comm mprefill_engine
  mprefill_testutil GTest::gtest)
set(MPREFILL_DIST_TESTS TinyDenseFixed TinySparseFixed TinySparseEstimated TinyHfQwen2SparseFixed
  StoriesDenseFixed
  StoriesSparseFixed StoriesSparseEstimated StoriesGreedyDecode BadTopologyIsAClearError)
# tp x sp: 1x2, 2x1, 2x2, 1x3
foreach(topo "1;2" "2;1" "2;2" "1;3")
  list(GET topo 0 tp)
  list(GET topo 1 sp)
  math(EXPR np "${tp} * ${sp}")
  foreach(t ${MPREFILL_DIST_TESTS})
    set(name mpi_dist_${t}_tp${tp}_sp${sp})
    add_test(NAME ${name}
      COMMAND ${MPREFILL_MPIRUN} -np ${np} $<TARGET_FILE:mpi_dist_engine_test>
        --gtest_filter=DistEngine.${t})
    set_tests_properties(${name} PROPERTIES TIMEOUT 120 LABELS "cpu;mpi"
      ENVIRONMENT "${MPREFILL_MPI_ENV};MPREFILL_TEST_TP=${tp};MPREFILL_THREADS=1")
  endforeach()
endforeach()

# Parts: sparse ring vs single process, mask_tiles vs brute force, distributed
# block-sparse estimation, weighted zigzag, KV gather.
add_executable(mpi_dist_parts_test mpi/dist_parts_test.cc mpi/mpi_test_main.cc)
target_link_libraries(mpi_dist_parts_test PRIVATE mprefill_comm mprefill_engine GTest::gtest)
foreach(np 1 2 3 4)
  add_test(NAME mpi_dist_parts_np${np}
    COMMAND ${MPREFILL_MPIRUN} -np ${np} $<TARGET_FILE:mpi_dist_parts_test>)
  set_tests_properties(mpi_dist_parts_np${np} PROPERTIES TIMEOUT 120 LABELS "cpu;mpi"
    ENVIRONMENT "${MPREFILL_MPI_ENV};MPREFILL_THREADS=1")
endforeach()

# The executor contract (engine/executor.h): make_executor() + the CPU backend at
# tp x sp 1x1, 1x2, 2x1 against the single-process Engine; refusals from one place.
add_executable(mpi_executor_test mpi/executor_test.cc mpi/mpi_test_main.cc)
target_link_libraries(mpi_executor_test PRIVATE mprefill_executor mprefill_testutil GTest::gtest)
foreach(topo "1;1" "1;2" "2;1")
  list(GET topo 0 tp)
  list(GET topo 1 sp)
  math(EXPR np "${tp} * ${sp}")
  set(name mpi_executor_tp${tp}_sp${sp})
  add_test(NAME ${name} COMMAND ${MPREFILL_MPIRUN} -np ${np} $<TARGET_FILE:mpi_executor_test>)
  set_tests_properties(${name} PROPERTIES TIMEOUT 120 LABELS "cpu;mpi"
    ENVIRONMENT "${MPREFILL_MPI_ENV};MPREFILL_TEST_TP=${tp};MPREFILL_THREADS=1")
endforeach()

# One layer forward for every CPU path: Engine::prefill, DistEngine tp 1 x sp 1 and the
# search's capture bit-identical on one rank (engine/cpu_layer.h).
add_executable(mpi_dist_engine_one_rank_test mpi/dist_engine_one_rank_test.cc
  mpi/mpi_test_main.cc)
target_link_libraries(mpi_dist_engine_one_rank_test PRIVATE mprefill_comm mprefill_engine
  mprefill_search mprefill_testutil GTest::gtest)
add_test(NAME mpi_dist_engine_one_rank
  COMMAND ${MPREFILL_MPIRUN} -np 1 $<TARGET_FILE:mpi_dist_engine_one_rank_test>)
set_tests_properties(mpi_dist_engine_one_rank PROPERTIES TIMEOUT 120 LABELS "cpu;mpi"
  ENVIRONMENT "${MPREFILL_MPI_ENV};MPREFILL_THREADS=1")
