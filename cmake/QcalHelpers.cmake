# qcal_add_test(NAME SOURCES... [LABELS l1 l2] [LIBS ...])
# One GoogleTest binary per call, registered with CTest under NAME. Every test
# links the whole engine (which pulls in kernels and common). Labels: `unit`
# (default), `slow`, `e2e`, `gpu`.
function(qcal_add_test name)
  cmake_parse_arguments(T "" "" "SOURCES;LABELS;LIBS" ${ARGN})
  if(NOT T_LABELS)
    set(T_LABELS unit)
  endif()
  add_executable(${name} ${T_SOURCES})
  target_link_libraries(${name} PRIVATE qcal_engine_all GTest::gtest GTest::gtest_main ${T_LIBS})
  foreach(lib qcal_coordinator qcal_worker qcal_cli)
    if(TARGET ${lib})
      target_link_libraries(${name} PRIVATE ${lib})
    endif()
  endforeach()
  target_compile_definitions(${name} PRIVATE QCAL_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
  target_compile_definitions(${name} PRIVATE
    QCAL_BINARY_DIR="${PROJECT_BINARY_DIR}"
    QCAL_MPIRUN="${QCAL_MPIRUN}")
  add_test(NAME ${name} COMMAND ${name})
  set_tests_properties(${name} PROPERTIES LABELS "${T_LABELS}" TIMEOUT 900)
endfunction()
