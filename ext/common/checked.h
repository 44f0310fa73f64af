// Overflow-checked size arithmetic. Every element or byte count that comes from
// a caller is computed with these before anything is multiplied, allocated or
// indexed: a count that does not fit in int64 is a MemoryRequestError (the
// request is larger than any machine), never a wrapped-around small number.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "common/errors.h"

namespace cnuma {

[[noreturn]] inline void size_overflow(const char* what) {
  throw MemoryRequestError(std::string("cannot size ") + what + ": the count overflows 64 bits, more than any "
                           "machine's memory");
}

// a * b for non-negative counts.
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r)) size_overflow(what);
  return r;
}

// The product of several non-negative counts.
inline int64_t checked_mul(std::initializer_list<int64_t> factors, const char* what) {
  int64_t r = 1;
  for (const int64_t f : factors) r = checked_mul(r, f, what);
  return r;
}

// a + b for non-negative counts.
inline int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t r;
  if (a < 0 || b < 0 || __builtin_add_overflow(a, b, &r)) size_overflow(what);
  return r;
}

// n rounded up to a multiple of m (m > 0).
inline int64_t checked_round_up(int64_t n, int64_t m, const char* what) {
  return checked_add(n, (m - n % m) % m, what);
}

// The same for byte counts held in size_t.
inline size_t checked_round_up(size_t n, size_t m, const char* what) {
  size_t r;
  if (__builtin_add_overflow(n, (m - n % m) % m, &r)) size_overflow(what);
  return r;
}

// A non-negative int64 count as size_t (always representable on 64-bit Linux).
inline size_t to_size(int64_t n, const char* what) {
  if (n < 0) size_overflow(what);
  return static_cast<size_t>(n);
}

}  // namespace cnuma
