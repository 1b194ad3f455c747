# Pattern search (issue 8): the test runs the mprefill-search binary for its CLI cases.
if(TARGET pattern_search_test AND TARGET mprefill-search)
  add_dependencies(pattern_search_test mprefill-search)
endif()
# The committed probe model (models/probe-kv32k): its test runs mprefill-search too.
if(TARGET probe_model_test AND TARGET mprefill-search)
  add_dependencies(probe_model_test mprefill-search)
endif()
# The probe's torch-free Python tools: task generators, Wilson interval, eval CSV (python/probe/).
find_package(Python3 COMPONENTS Interpreter QUIET)
if(Python3_Interpreter_FOUND)
  add_test(NAME probe_python_test COMMAND ${Python3_EXECUTABLE} -m unittest -v test_probe_tools
           WORKING_DIRECTORY ${CMAKE_SOURCE_DIR}/python/probe)
  set_tests_properties(probe_python_test PROPERTIES TIMEOUT 60 LABELS cpu)
  # Smoke training of train_probe.py (~40 s of one core; skipped without a torch Python).
  add_test(NAME probe_train_smoke_test COMMAND ${Python3_EXECUTABLE} -m unittest -v test_probe_train
           WORKING_DIRECTORY ${CMAKE_SOURCE_DIR}/python/probe)
  set_tests_properties(probe_train_smoke_test PROPERTIES TIMEOUT 240 LABELS cpu)
endif()
