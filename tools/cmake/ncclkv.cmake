# KV transport "nccl" (issue 6): the worker's NcclKvSink (worker/cuda/nccl_kv_sink.cc,
# compiled into mprefill_worker_cuda, empty without MPREFILL_HAVE_NCCL_KV) and the
# decoder's receiver (mprefill_nccl_kv, decode/CMakeLists.txt).
if(TARGET mprefill_nccl_kv AND TARGET mprefill_worker_cuda)
  target_link_libraries(mprefill_worker_cuda PUBLIC mprefill_nccl_kv)
endif()
if(TARGET mprefill_nccl_kv AND TARGET mprefill-decoder)
  target_link_libraries(mprefill-decoder PRIVATE mprefill_nccl_kv)
endif()
