# Layering check (issue 14): every project include against the folder table of
# docs/ARCHITECTURE.md, with docs/layering_allow.txt as the exceptions while code moves; and
# the checker's own test on fabricated trees. Standard-library python3 only.
find_package(Python3 COMPONENTS Interpreter)
if(NOT Python3_Interpreter_FOUND)
  message(FATAL_ERROR "python3 not found: the layering tests (launch/check_layering.py) need it")
endif()
add_test(NAME layering_check
         COMMAND ${Python3_EXECUTABLE} ${CMAKE_SOURCE_DIR}/launch/check_layering.py
                 --root ${CMAKE_SOURCE_DIR} --allow ${CMAKE_SOURCE_DIR}/docs/layering_allow.txt)
add_test(NAME layering_check_selftest
         COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/layering/check_layering_test.py)
set_tests_properties(layering_check layering_check_selftest PROPERTIES TIMEOUT 60 LABELS cpu)
