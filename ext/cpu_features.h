// Run-time CPU feature detection, shared by every SIMD kernel's dispatcher.
#pragma once
#include <string>

namespace cnuma {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512bf16 = false;
  bool amx_tile = false;
  bool amx_bf16 = false;
};

// What the running CPU (and the OS, via XCR0) supports.
const CpuFeatures& cpu_features();

// The widest SIMD path to use: "avx512", "avx2" or "scalar". The environment
// variable COMPOSER_NUMA_SIMD caps it (tests force each path in turn).
std::string simd_level();

}  // namespace cnuma
