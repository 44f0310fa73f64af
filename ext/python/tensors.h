// Checks of tensors arriving through DLPack (nanobind ndarray): device,
// contiguity, dtype and element counts, each a one-line ValueError naming the
// argument, so no kernel ever sees a tensor it would index out of bounds.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace cnuma::python {

namespace nb = nanobind;
using Array = nb::ndarray<>;

inline bool is_dtype(const Array& a, nb::dlpack::dtype_code code, int bits) {
  const nb::dlpack::dtype d = a.dtype();
  return d.lanes == 1 && d.bits == bits && d.code == static_cast<uint8_t>(code);
}

inline std::string dtype_name(const nb::dlpack::dtype& d) {
  const char* kind = d.code == (uint8_t)nb::dlpack::dtype_code::Float    ? "float"
                     : d.code == (uint8_t)nb::dlpack::dtype_code::Bfloat ? "bfloat"
                     : d.code == (uint8_t)nb::dlpack::dtype_code::Int    ? "int"
                     : d.code == (uint8_t)nb::dlpack::dtype_code::UInt   ? "uint"
                     : d.code == (uint8_t)nb::dlpack::dtype_code::Bool   ? "bool"
                                                                         : "other";
  return std::string(kind) + std::to_string(d.bits);
}

// CPU and C-contiguous (size-1 dimensions may have any stride), or ValueError.
inline void check_cpu_contiguous(const Array& a, const std::string& where, const std::string& name) {
  if (a.device_type() != nb::device::cpu::value)
    throw std::invalid_argument(where + ": " + name + " must be a CPU tensor (got DLPack device " +
                                std::to_string(a.device_type()) + ":" + std::to_string(a.device_id()) + ")");
  if (a.size() == 0) return;  // nothing is read or written
  int64_t expected = 1;
  for (size_t i = a.ndim(); i-- > 0;) {
    if (a.shape(i) != 1 && a.stride(i) != expected)
      throw std::invalid_argument(where + ": " + name + " must be contiguous");
    expected *= static_cast<int64_t>(a.shape(i));
  }
}

}  // namespace cnuma::python
