// The NEON AdamW kernels (aarch64): kernels/adamw.cpp's reference update,
// 8 lanes at a time, with identical bits (see adamw_neon.cpp).
#pragma once

#include <cstdint>

#include "kernels/adamw.h"

namespace cnuma {

using AdamWRangeFn = void (*)(const AdamWJob&, int64_t, int64_t);

// The kernel for one combination of parameter, gradient and state dtypes, with
// or without fp32 master weights. Built on aarch64 only (ext/CMakeLists.txt).
AdamWRangeFn adamw_neon_kernel(DType param, DType grad, DType state, bool master);

}  // namespace cnuma
