// Exceptions the Python bindings translate to a specific Python type.
#pragma once

#include <stdexcept>

namespace cnuma {

// A request that cannot be satisfied because it is too large: for the node,
// the machine or the address space. The bindings raise MemoryError.
class MemoryRequestError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace cnuma
