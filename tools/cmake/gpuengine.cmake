# `mprefill generate --device cuda` (issue 5): the GPU engine, in CUDA builds only.
if(TARGET mprefill_engine_cuda AND TARGET mprefill)
  target_link_libraries(mprefill PRIVATE mprefill_engine_cuda)
  target_compile_definitions(mprefill PRIVATE MPREFILL_HAVE_GPU_ENGINE=1)
endif()
