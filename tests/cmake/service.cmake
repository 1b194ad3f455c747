# Service tests (issue 6): wire protocol, coordinator (tests/cpu/*_test.cc, auto-registered;
# extra link deps here) and end to end with the real binaries (tests/service/).
if(TARGET wire_test AND TARGET mprefill_proto)
  target_link_libraries(wire_test PRIVATE mprefill_proto)
endif()
if(TARGET coordinator_test AND TARGET mprefill_coordinator)
  target_link_libraries(coordinator_test PRIVATE mprefill_coordinator)
endif()
# The worker service library (worker/): the Assignment checks (tests/cpu), and a real
# worker group running plans this process sends as the coordinator (tests/service).
if(TARGET worker_assignment_test)
  if(TARGET mprefill_worker AND TARGET mprefill_coordinator)
    target_link_libraries(worker_assignment_test PRIVATE mprefill_worker mprefill_coordinator)
  else()
    set_target_properties(worker_assignment_test PROPERTIES EXCLUDE_FROM_ALL ON)
  endif()
endif()
if(TARGET mprefill_hardening_harness AND TARGET mprefill_coordinator)
  add_executable(worker_plan_test ${CMAKE_CURRENT_SOURCE_DIR}/service/worker_plan_test.cc)
  target_link_libraries(worker_plan_test PRIVATE mprefill_hardening_harness mprefill_coordinator
                        mprefill_kv_tcp mprefill_test_main)
  add_dependencies(worker_plan_test mprefill-worker)
  add_test(NAME ServiceE2E.WorkerRunsTheCoordinatorsPlan COMMAND worker_plan_test)
  set_tests_properties(ServiceE2E.WorkerRunsTheCoordinatorsPlan PROPERTIES TIMEOUT 300
                       LABELS "cpu;mpi;service" ENVIRONMENT "${MPREFILL_MPI_ENV}")
endif()

# A python3 that imports google.protobuf (Debian python3-protobuf is installed for
# /usr/bin/python3; a pyenv python3 first on PATH may lack it).
set(MPREFILL_PYTHON3 "")
foreach(py /usr/bin/python3 python3)
  execute_process(COMMAND ${py} -c "import google.protobuf"
                  RESULT_VARIABLE _py_rc OUTPUT_QUIET ERROR_QUIET)
  if(_py_rc EQUAL 0)
    set(MPREFILL_PYTHON3 ${py})
    break()
  endif()
endforeach()
if(NOT MPREFILL_PYTHON3)
  message(STATUS "mprefill: no python3 with google.protobuf: the Python client test skips")
endif()

if(TARGET mprefill-worker AND TARGET mprefill-decoder AND TARGET mprefill-coordinator
   AND TARGET mprefill_coordinator)
  add_executable(service_e2e_test ${CMAKE_CURRENT_SOURCE_DIR}/service/service_e2e_test.cc)
  target_link_libraries(service_e2e_test PRIVATE mprefill_testutil mprefill_test_main
                        nlohmann_json::nlohmann_json)
  target_compile_definitions(service_e2e_test PRIVATE
    MPREFILL_MPIEXEC="${MPIEXEC_EXECUTABLE}" MPREFILL_PYTHON3="${MPREFILL_PYTHON3}")
  add_dependencies(service_e2e_test mprefill mprefill-convert mprefill-worker mprefill-decoder
                   mprefill-coordinator)
  # One ctest test per TEST (explicit: list-valued properties do not pass through
  # gtest_discover_tests).
  foreach(t RunRanks2MatchesGenerate RunRanks4Tp2MatchesGenerate
            ConcurrentSubmissionsQueueAndAllFinish CancelMidRunThenTheServiceStillWorks
            PythonClientRunsAJob AuditHeadsComeBackInTheResult Bf16ModelHandsOffBf16Kv)
    add_test(NAME ServiceE2E.${t}
             COMMAND service_e2e_test --gtest_filter=ServiceE2E.${t})
    set_tests_properties(ServiceE2E.${t} PROPERTIES TIMEOUT 300 LABELS "cpu;mpi;service"
                         ENVIRONMENT "${MPREFILL_MPI_ENV}"
                         SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]")
  endforeach()
endif()
