# Pattern search (issue 8): the test runs the mprefill-search binary for its CLI cases.
if(TARGET pattern_search_test AND TARGET mprefill-search)
  add_dependencies(pattern_search_test mprefill-search)
endif()
# The committed probe model (models/probe-kv32k): its test runs mprefill-search too.
if(TARGET probe_model_test AND TARGET mprefill-search)
  add_dependencies(probe_model_test mprefill-search)
endif()
