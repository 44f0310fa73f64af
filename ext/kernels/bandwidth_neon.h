// The bandwidth probe's passes in explicit NEON (aarch64), with the access
// pattern of the NEON AdamW kernel (kernels/adamw_neon.cpp).
#pragma once

#include <cstdint>

namespace cnuma {

using BandwidthPassFn = void (*)(float* const* arrays, int64_t begin, int64_t end, uint64_t* sink);

// kernel: 0 read, 1 copy, 2 triad, 3 adamw (kernels/bandwidth.cpp's numbering).
// Built on aarch64 only (ext/CMakeLists.txt).
BandwidthPassFn bandwidth_neon_pass(int kernel);

}  // namespace cnuma
