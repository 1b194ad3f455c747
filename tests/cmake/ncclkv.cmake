# Issue 6 GPU acceptance (label gpu2: 2 GPUs, run with ctest -L gpu2 on a 2-GPU machine):
# `mprefill run --device cuda --decoder-device cuda:1` over --kv-transport tcp and nccl
# (tests/gpu2/nccl_handoff_test.sh). Needs MPREFILL_STORIES15M_HF (the bf16 HF conversion of
# stories15M: mprefill-convert --in .../stories15M.bin --out DIR --dtype bf16); exits 77
# (skipped) without it or without 2 GPUs. "gpu2" also matches -LE gpu: CI never runs it.
if(TARGET mprefill_nccl_kv AND TARGET mprefill-worker AND TARGET mprefill-decoder AND
   TARGET mprefill)
  add_test(NAME gpu2_service_nccl_handoff
           COMMAND ${CMAKE_SOURCE_DIR}/tests/gpu2/nccl_handoff_test.sh ${CMAKE_BINARY_DIR}/bin
                   ${MPREFILL_SHARED_DIR}/models/stories15M/tokenizer.bin)
  set_tests_properties(gpu2_service_nccl_handoff PROPERTIES TIMEOUT 900 LABELS "gpu2;mpi"
    SKIP_RETURN_CODE 77 ENVIRONMENT "NCCL_NVLS_ENABLE=0" RESOURCE_LOCK gpu)
endif()

# CPU side of the same transport (CI): a decoder without --device cuda refuses an NCCL KV
# stream at once; bad --device / --decoder-device values; an nccl job with no GPU decoder
# is refused by the coordinator with one line.
if(TARGET mprefill_decode)
  add_executable(ncclkv_cpu_test gpu2/ncclkv_cpu_test.cc)
  target_link_libraries(ncclkv_cpu_test PRIVATE mprefill_decode mprefill_test_main)
  add_test(NAME ncclkv_cpu_test COMMAND ncclkv_cpu_test)
  set_tests_properties(ncclkv_cpu_test PROPERTIES TIMEOUT 60 LABELS cpu)
endif()
if(TARGET mprefill-decoder AND TARGET mprefill_decode)
  add_test(NAME ncclkv_decoder_bad_device
    COMMAND sh -c "$<TARGET_FILE:mprefill-decoder> --coordinator 127.0.0.1:1 --model x --device gpu; echo rc=$?")
  set_tests_properties(ncclkv_decoder_bad_device PROPERTIES TIMEOUT 30 LABELS cpu
    PASS_REGULAR_EXPRESSION "error: --device must be cpu, cuda or cuda:N, got 'gpu'\nrc=2")
  add_test(NAME ncclkv_decoder_device_absent
    COMMAND sh -c "$<TARGET_FILE:mprefill-decoder> --coordinator 127.0.0.1:1 --model random:tiny:1 --device cuda:63; echo rc=$?")
  set_tests_properties(ncclkv_decoder_device_absent PROPERTIES TIMEOUT 30 LABELS cpu
    PASS_REGULAR_EXPRESSION "mprefill-decoder: error: (CUDA device 63 is not visible|--device cuda: this build).*\nrc=1")
endif()
if(TARGET mprefill AND TARGET mprefill-worker AND TARGET mprefill-decoder AND TARGET mprefill_decode)
  add_test(NAME ncclkv_run_bad_decoder_device
    COMMAND sh -c "$<TARGET_FILE:mprefill> run --model random:tiny:1 --prompt-ids 1,2 --decoder-device tpu; echo rc=$?")
  set_tests_properties(ncclkv_run_bad_decoder_device PROPERTIES TIMEOUT 30 LABELS cpu
    PASS_REGULAR_EXPRESSION "--decoder-device must be cpu, cuda or cuda:N, got 'tpu'.*rc=2")
  add_test(NAME ncclkv_run_nccl_without_gpu_decoder
    COMMAND sh -c "$<TARGET_FILE:mprefill> run --model random:tiny:1 --prompt-ids 1,2,3 --decode 1 --kv-transport nccl --json 2>/dev/null; echo rc=$?")
  set_tests_properties(ncclkv_run_nccl_without_gpu_decoder PROPERTIES TIMEOUT 120
    LABELS "cpu;mpi" ENVIRONMENT "${MPREFILL_MPI_ENV}"
    PASS_REGULAR_EXPRESSION "\"error\":\"no registered decoder takes KV over nccl\".*\"status\":\"REFUSED\".*\nrc=1")
endif()
