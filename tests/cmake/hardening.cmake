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
    target_link_libraries(${exe} PRIVATE mprefill_hardening_harness GTest::gtest_main)
    add_dependencies(${exe} mprefill mprefill-worker mprefill-decoder mprefill-coordinator)
    # One label: gtest_discover_tests (CMake 3.25) writes PROPERTIES out word by word, so
    # a list value ("cpu;mpi") would set only its first element. The harness gives
    # mpirun the root / oversubscribe environment itself.
    gtest_discover_tests(${exe} DISCOVERY_TIMEOUT 60 TEST_PREFIX "hardening."
      PROPERTIES TIMEOUT ${tmo} LABELS hardening)
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
