# mprefill-worker (the worker group service under mpirun) and mprefill-decoder (the
# reference decoder): the KV handoff, the decoder service, MPI.
foreach(exe mprefill-worker mprefill-decoder)
  if(TARGET ${exe})
    if(TARGET mprefill_decode)
      target_link_libraries(${exe} PRIVATE mprefill_decode mprefill_comm)
    else()
      # proto/ not configured (no Protobuf): the service binaries cannot be built.
      set_target_properties(${exe} PROPERTIES EXCLUDE_FROM_ALL ON)
    endif()
  endif()
endforeach()
