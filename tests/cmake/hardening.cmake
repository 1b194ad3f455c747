# Service hardening (issue 7): bad input, security, faults and load against the real
# binaries over 127.0.0.1 (tests/hardening/), and the libFuzzer campaigns (fuzz/,
# launch/fuzz.sh) when clang with libFuzzer is installed.
if(TARGET mprefill-worker AND TARGET mprefill-decoder AND TARGET mprefill-coordinator
   AND TARGET mprefill_proto AND TARGET mprefill)
  add_library(mprefill_hardening_harness STATIC ${CMAKE_CURRENT_SOURCE_DIR}/hardening/harness.cc)
  target_link_libraries(mprefill_hardening_harness PUBLIC mprefill_proto mprefill_testutil
                        GTest::gtest)
  target_compile_definitions(mprefill_hardening_harness PUBLIC
    MPREFILL_MPIEXEC="${MPIEXEC_EXECUTABLE}")
  # name -> per-test timeout (s). Each TEST is its own ctest entry.
  foreach(spec "bad_input;240" "security;300" "fault;300" "load;600")
    list(GET spec 0 t)
    list(GET spec 1 tmo)
    set(exe hardening_${t}_test)
    add_executable(${exe} ${CMAKE_CURRENT_SOURCE_DIR}/hardening/${t}_test.cc)
    target_link_libraries(${exe} PRIVATE mprefill_hardening_harness mprefill_test_main)
    add_dependencies(${exe} mprefill mprefill-worker mprefill-decoder mprefill-coordinator)
    # One label: gtest_discover_tests (CMake 3.25) writes PROPERTIES out word by word, so
    # a list value ("cpu;mpi") would set only its first element. The harness gives
    # mpirun the root / oversubscribe environment itself.
    gtest_discover_tests(${exe} DISCOVERY_TIMEOUT 60 TEST_PREFIX "hardening."
      PROPERTIES TIMEOUT ${tmo} LABELS hardening SKIP_RETURN_CODE ${MPREFILL_SKIP_EXIT})
  endforeach()
endif()

# libFuzzer campaigns: launch/fuzz.sh builds fuzz/ with clang in BUILD-fuzz and runs each
# target for 60 s (no crash allowed). Registered only where clang and libFuzzer exist.
find_program(MPREFILL_CLANGXX NAMES clang++ clang++-14)
file(GLOB MPREFILL_LIBFUZZER
  /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a
  /usr/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a
  /usr/lib/llvm-*/lib/clang/*/lib/x86_64-pc-linux-gnu/libclang_rt.fuzzer.a)
if(MPREFILL_CLANGXX AND MPREFILL_LIBFUZZER AND TARGET mprefill_proto)
  add_test(NAME hardening.fuzz
    COMMAND ${CMAKE_SOURCE_DIR}/launch/fuzz.sh --seconds 60 --build-dir ${CMAKE_BINARY_DIR}-fuzz)
  # Both targets run at once for 60 s (plus the clang build on a first run): they take
  # both CI cores, so nothing runs beside them.
  set_tests_properties(hardening.fuzz PROPERTIES TIMEOUT 1500 LABELS "cpu;fuzz" PROCESSORS 2)
else()
  message(STATUS "mprefill: clang++ with libFuzzer not found: the fuzz campaigns (launch/fuzz.sh) "
                 "are not registered (Debian: clang libclang-rt-14-dev)")
endif()

# ---- sanitizer stage of CI (launch/test.sh; issue 7) ------------------------------------
# Instrumented variants of the service code, built in this build directory on demand
# (EXCLUDE_FROM_ALL; targets sanitize-asan, sanitize-tsan) into bin-asan/ and bin-tsan/
# under the usual binary names. Only the service's own code is recompiled (-O1): the
# frame codec and hello (proto/wire.cc, hmac.cc), the coordinator, the decoder, the KV
# handoff and page store, the worker service (worker/) and the three service mains. The
# engine (mprefill_engine, mprefill_kernels), MPI comm, the generated protobuf messages and
# GoogleTest are the objects this directory already built, uninstrumented: with ASan their
# heap blocks are still checked (the allocator is replaced process-wide), their own loads and stores are
# not (launch/sanitize.sh instruments everything, slowly).
#   asan  address,undefined: coordinator, worker (CPU executors), decoder.
#   tsan  thread: the same, and wire_test / coordinator_test compiled with it.
# The tests (label "sanitize") run the ordinary test binaries with MPREFILL_BIN_DIR set to
# bin-asan / bin-tsan through tests/hardening/sanitizer/run.sh, which fails a test when any
# process wrote a sanitizer report, and skips it (77) when the variants are not built.
# (service_e2e_test comes from service.cmake, included after this file: named by path.)
if(TARGET mprefill_proto_msgs AND TARGET mprefill_coordinator AND TARGET mprefill_decode
   AND TARGET mprefill_worker AND TARGET mprefill-worker AND TARGET mprefill-decoder
   AND TARGET wire_test
   AND TARGET coordinator_test)
  set(_src ${CMAKE_SOURCE_DIR})
  set(_run ${CMAKE_CURRENT_SOURCE_DIR}/hardening/sanitizer/run.sh)
  foreach(tag asan tsan)
    set(_opts -fno-omit-frame-pointer -O1 -g1)
    if(tag STREQUAL "asan")
      set(_san address,undefined)
    else()
      set(_san thread)
      # Asio's atomic_thread_fence: gcc warns once per use that TSan does not model it
      # (Asio's own ordering goes through mutexes and atomics TSan sees).
      if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
        list(APPEND _opts -Wno-tsan)
      endif()
    endif()
    list(PREPEND _opts -fsanitize=${_san})
    set(_bindir ${CMAKE_BINARY_DIR}/bin-${tag})
    file(MAKE_DIRECTORY ${_bindir})

    add_library(mprefill_proto_${tag} STATIC EXCLUDE_FROM_ALL ${_src}/proto/wire.cc
                ${_src}/proto/hmac.cc)
    target_include_directories(mprefill_proto_${tag} PUBLIC ${_src})
    target_link_libraries(mprefill_proto_${tag} PUBLIC mprefill_proto_msgs Threads::Threads)
    target_compile_definitions(mprefill_proto_${tag} PUBLIC BOOST_ASIO_NO_DEPRECATED)
    target_compile_options(mprefill_proto_${tag} PRIVATE ${_opts})
    target_link_options(mprefill_proto_${tag} INTERFACE -fsanitize=${_san})

    # The sources of mprefill_coordinator (relative to coordinator/), so the lists agree.
    get_target_property(_coord_src mprefill_coordinator SOURCES)
    list(TRANSFORM _coord_src PREPEND ${_src}/coordinator/)
    add_library(mprefill_coordinator_${tag} STATIC EXCLUDE_FROM_ALL ${_coord_src})
    target_link_libraries(mprefill_coordinator_${tag} PUBLIC mprefill_proto_${tag} mprefill_model)
    target_compile_options(mprefill_coordinator_${tag} PRIVATE ${_opts})

    add_executable(mprefill-coordinator-${tag} EXCLUDE_FROM_ALL
                   ${_src}/tools/mprefill_coordinator_main.cc)
    target_link_libraries(mprefill-coordinator-${tag} PRIVATE mprefill_coordinator_${tag}
                          mprefill_cli)
    target_compile_options(mprefill-coordinator-${tag} PRIVATE ${_opts})
    set(_targets mprefill-coordinator-${tag})

    add_library(mprefill_decode_${tag} STATIC EXCLUDE_FROM_ALL ${_src}/decode/decoder.cc
                ${_src}/kv/kv_receiver.cc ${_src}/kv/kv_handoff.cc ${_src}/kv/kv_store.cc
                ${_src}/kv/crc32c.cc)
    target_link_libraries(mprefill_decode_${tag} PUBLIC mprefill_proto_${tag} mprefill_engine
                          mprefill_kernels)
    target_compile_options(mprefill_decode_${tag} PRIVATE ${_opts})
    # The worker service library (worker/), instrumented; its sources as worker/ lists them.
    get_target_property(_worker_src mprefill_worker SOURCES)
    list(TRANSFORM _worker_src PREPEND ${_src}/worker/)
    add_library(mprefill_worker_${tag} STATIC EXCLUDE_FROM_ALL ${_worker_src})
    target_link_libraries(mprefill_worker_${tag} PUBLIC mprefill_decode_${tag} mprefill_comm
                          mprefill_executor)
    target_compile_options(mprefill_worker_${tag} PRIVATE ${_opts})
    foreach(exe worker decoder)
      add_executable(mprefill-${exe}-${tag} EXCLUDE_FROM_ALL ${_src}/tools/mprefill_${exe}_main.cc)
      target_link_libraries(mprefill-${exe}-${tag} PRIVATE mprefill_decode_${tag} mprefill_comm
                            mprefill_executor mprefill_engine mprefill_cli)
      target_compile_options(mprefill-${exe}-${tag} PRIVATE ${_opts})
      list(APPEND _targets mprefill-${exe}-${tag})
    endforeach()
    target_link_libraries(mprefill-worker-${tag} PRIVATE mprefill_worker_${tag})
    set(_plain mprefill)  # the CLI is a client: not instrumented here
    if(tag STREQUAL "tsan")
      foreach(t wire coordinator)
        add_executable(${t}_test-${tag} EXCLUDE_FROM_ALL ${_src}/tests/cpu/${t}_test.cc)
        target_link_libraries(${t}_test-${tag} PRIVATE mprefill_coordinator_${tag}
                              mprefill_testutil mprefill_test_main)
        target_compile_options(${t}_test-${tag} PRIVATE ${_opts})
        list(APPEND _targets ${t}_test-${tag})
      endforeach()
    endif()
    foreach(t ${_targets})
      string(REGEX REPLACE "-${tag}$" "" _name ${t})
      set_target_properties(${t} PROPERTIES OUTPUT_NAME ${_name}
                            RUNTIME_OUTPUT_DIRECTORY ${_bindir})
      # A link left by an older layout would make the linker write through it into bin/.
      if(IS_SYMLINK ${_bindir}/${_name})
        file(REMOVE ${_bindir}/${_name})
      endif()
    endforeach()
    # The uninstrumented binaries the tests also start, next to the instrumented ones.
    foreach(p ${_plain})
      file(CREATE_LINK ../bin/${p} ${_bindir}/${p} SYMBOLIC)
    endforeach()
    add_custom_target(sanitize-${tag} DEPENDS ${_targets} ${_plain})
  endforeach()
  add_custom_target(sanitize DEPENDS sanitize-asan sanitize-tsan)

  # name | build | test binary | gtest filter | timeout (s)
  set(_san_tests
    "asan|bad_input|bin/hardening_bad_input_test|*|300"
    "asan|security|bin/hardening_security_test|*|300"
    "asan|faults|bin/hardening_fault_test|*|400"
    "asan|load|bin/hardening_load_test|Load.TwoHundredSequentialJobs:Load.EightConcurrentClients|300"
    "asan|service_e2e|bin/service_e2e_test|ServiceE2E.RunRanks2MatchesGenerate:ServiceE2E.ConcurrentSubmissionsQueueAndAllFinish:ServiceE2E.CancelMidRunThenTheServiceStillWorks|300"
    "tsan|wire_test|bin-tsan/wire_test|*|300"
    "tsan|coordinator_test|bin-tsan/coordinator_test|*|300"
    "tsan|bad_input|bin/hardening_bad_input_test|BadInput.*|300"
    "tsan|concurrent_clients|bin/hardening_load_test|Load.EightConcurrentClients|400"
    "tsan|restart|bin/hardening_fault_test|Faults.CoordinatorRestart:Faults.DecoderKilledMidHandoff|400")
  foreach(spec ${_san_tests})
    string(REPLACE "|" ";" spec "${spec}")
    list(GET spec 0 tag)
    list(GET spec 1 name)
    list(GET spec 2 exe)
    list(GET spec 3 filter)
    list(GET spec 4 tmo)
    add_test(NAME sanitize.${tag}.${name}
      COMMAND ${_run} ${tag} ${CMAKE_BINARY_DIR}/bin-${tag}
              ${CMAKE_BINARY_DIR}/san-logs/${tag}.${name} ${CMAKE_BINARY_DIR}/${exe}
              --gtest_filter=${filter} --gtest_brief=1)
    set_tests_properties(sanitize.${tag}.${name} PROPERTIES TIMEOUT ${tmo} LABELS sanitize
      SKIP_RETURN_CODE 77 ENVIRONMENT "${MPREFILL_MPI_ENV}")
  endforeach()
endif()
