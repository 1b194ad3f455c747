# mprefill-worker --device cuda with more than one rank: the distributed GPU engine
# (worker/cuda/cuda_dist_engine.h) over an NCCL world communicator, in CUDA builds with NCCL.
if(TARGET mprefill-worker AND TARGET mprefill_worker_cuda AND TARGET mprefill_comm_nccl
   AND TARGET mprefill_decode)
  target_link_libraries(mprefill-worker PRIVATE mprefill_comm_nccl)
  target_compile_definitions(mprefill-worker PRIVATE MPREFILL_HAVE_GPU_DIST=1)
endif()
