// The composer_numa._C module. The kernels and the pool know nothing of Python;
// the files in this directory convert arguments, validate tensors coming in
// through DLPack (nanobind ndarray), release the GIL around kernels and map C++
// exceptions to Python ones: MemoryRequestError -> MemoryError,
// std::invalid_argument -> ValueError, std::out_of_range -> IndexError.
#include <Python.h>
#include <nanobind/nanobind.h>

#include "common/errors.h"
#include "python/module.h"

namespace nb = nanobind;

NB_MODULE(_C, m) {
  m.doc() = "composer-numa native kernels";
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const cnuma::MemoryRequestError& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    }
  });
  // A pool or layer still referenced when the interpreter exits (a model in a
  // script's globals) is not a leak worth a warning at shutdown.
  nb::set_leak_warnings(false);
  cnuma::python::register_cpu(m);
  cnuma::python::register_pool(m);
  cnuma::python::register_memory(m);
  cnuma::python::register_adamw(m);
  cnuma::python::register_bandwidth(m);
  cnuma::python::register_experts(m);
}
