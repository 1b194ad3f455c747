# mprefill-search --device cuda[:N] (issue 8): retrieval evaluation on the GPU engine, in
# CUDA builds only.
if(TARGET mprefill_engine_cuda AND TARGET mprefill-search)
  target_link_libraries(mprefill-search PRIVATE mprefill_engine_cuda)
  target_compile_definitions(mprefill-search PRIVATE MPREFILL_HAVE_GPU_ENGINE=1)
endif()
