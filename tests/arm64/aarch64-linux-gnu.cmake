# CMake toolchain: cross-compile for aarch64 (NVIDIA Grace) on an x86-64 host with
# Debian's g++-aarch64-linux-gnu, against the arm64 root built by tests/arm64/harness.py.
#
#   COMPOSER_NUMA_ARM64_SYSROOT  the arm64 root (default: tests/arm64/.cache/rootfs)
#   COMPOSER_NUMA_ARM64_PYTHON   its Python version (default: 3.11)
#
# The sysroot supplies glibc, libstdc++ and Python's headers; the Python interpreter
# CMake runs (for `python -m nanobind --cmake_dir`) stays the host's.

set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

if(DEFINED ENV{COMPOSER_NUMA_ARM64_SYSROOT})
  set(_arm64_root "$ENV{COMPOSER_NUMA_ARM64_SYSROOT}")
else()
  set(_arm64_root "${CMAKE_CURRENT_LIST_DIR}/.cache/rootfs")
endif()
if(DEFINED ENV{COMPOSER_NUMA_ARM64_PYTHON})
  set(_arm64_py "$ENV{COMPOSER_NUMA_ARM64_PYTHON}")
else()
  set(_arm64_py "3.11")
endif()
if(NOT EXISTS "${_arm64_root}/usr/include/python${_arm64_py}/Python.h")
  message(FATAL_ERROR "no arm64 root with Python ${_arm64_py} headers at ${_arm64_root}: "
                      "run `python tests/arm64/harness.py setup` first")
endif()

set(CMAKE_SYSROOT "${_arm64_root}")
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)

# Programs (the host Python, cmake, ninja) from the host; headers and libraries from the root;
# packages (nanobind's CMake config lives in the host's site-packages) from either.
set(CMAKE_FIND_ROOT_PATH "${_arm64_root}")
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)

# FindPython would take the host interpreter's headers and extension suffix: point it at the
# root's (Debian's /usr/include/python3.X/pyconfig.h includes the aarch64 one from the sysroot).
set(Python_INCLUDE_DIR "${_arm64_root}/usr/include/python${_arm64_py}" CACHE PATH "" FORCE)
string(REPLACE "." "" _arm64_py_nodot "${_arm64_py}")
set(Python_SOABI "cpython-${_arm64_py_nodot}-aarch64-linux-gnu" CACHE STRING "" FORCE)

# Let try_compile() projects see the same root.
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES CMAKE_SYSROOT)
