# GPU engine test (tests/gpu/engine_test.cc, registered by tests/gpu/CMakeLists.txt as
# gpu_engine_test): it also needs the engine library.
if(TARGET gpu_engine_test AND TARGET mprefill_engine_cuda)
  target_link_libraries(gpu_engine_test PRIVATE mprefill_engine_cuda)
endif()
