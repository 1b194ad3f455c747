# Service binaries (issue 6): mprefill-coordinator, and the `mprefill` commands submit /
# status / cancel / run (tools/service_cli.cc).
if(TARGET mprefill_coordinator)
  target_link_libraries(mprefill-coordinator PRIVATE mprefill_coordinator)
  if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/service_cli.cc)
    target_sources(mprefill PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/service_cli.cc)
    target_link_libraries(mprefill PRIVATE mprefill_coordinator)
    target_compile_definitions(mprefill PRIVATE MPREFILL_HAVE_SERVICE=1)
  endif()
endif()
