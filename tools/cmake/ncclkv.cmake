# KV transport "nccl" (issue 6): the worker's NcclKvSink comes with mprefill_kv_cuda
# (kv/CMakeLists.txt); the decoder's receiver is mprefill_nccl_kv.
if(TARGET mprefill_nccl_kv AND TARGET mprefill-decoder)
  target_link_libraries(mprefill-decoder PRIVATE mprefill_nccl_kv)
endif()
