# GPU distributed prefill (engine/cuda/cuda_backend.h over NCCL) under mpirun, one rank per GPU
# (labels gpu2 / gpu4: need 2 / 4 GPUs; ctest -L gpu2 on a 2-GPU machine). NVLink
# multicast off (launch/DEVICE.md).
if(TARGET mprefill_engine_cuda AND TARGET mprefill_comm_nccl)
  add_executable(gpu_dist_engine_test mpi/gpu_dist_engine_test.cc mpi/mpi_test_main.cc)
  target_link_libraries(gpu_dist_engine_test PRIVATE mprefill_engine_cuda mprefill_comm_nccl
    mprefill_comm GTest::gtest)
  foreach(np 2 4)
    add_test(NAME gpu${np}_dist_engine_np${np}
      COMMAND ${MPREFILL_MPIRUN} -np ${np} $<TARGET_FILE:gpu_dist_engine_test>)
    set_tests_properties(gpu${np}_dist_engine_np${np} PROPERTIES TIMEOUT 300
      LABELS "gpu${np};mpi" ENVIRONMENT "${MPREFILL_MPI_ENV};NCCL_NVLS_ENABLE=0")
  endforeach()
endif()

# `mprefill run --device cuda --ranks 2` (CudaBackend over NCCL behind mprefill-worker, tp1 x sp2
# and tp2 x sp1) against `mprefill generate --device cuda`: same greedy ids on stories15M
# (env MPREFILL_STORIES15M_HF; exits 77 = skipped without it or without 2 GPUs).
if(TARGET mprefill_engine_cuda AND TARGET mprefill_comm_nccl AND TARGET mprefill-worker AND
   TARGET mprefill-decoder AND TARGET mprefill AND TARGET mprefill_decode)
  add_test(NAME gpu2_service_dist_cuda
           COMMAND ${CMAKE_SOURCE_DIR}/tests/mpi/gpu_dist_service_test.sh ${CMAKE_BINARY_DIR}/bin
                   ${MPREFILL_SHARED_DIR}/models/stories15M/tokenizer.bin)
  set_tests_properties(gpu2_service_dist_cuda PROPERTIES TIMEOUT 900 LABELS "gpu2;mpi"
    SKIP_RETURN_CODE 77 ENVIRONMENT "NCCL_NVLS_ENABLE=0" RESOURCE_LOCK gpu)
endif()
