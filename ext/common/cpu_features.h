// Run-time CPU feature detection, shared by every SIMD kernel's dispatcher.
#pragma once

#include <string>

#include "common/simd.h"

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

// What the running CPU and the OS (XCR0) support; all false off x86.
const CpuFeatures& cpu_features();

// The widest path the CPU supports, capped by COMPOSER_NUMA_SIMD (read at every
// call, so tests can force each path in turn).
Isa active_isa();

// isa_name(active_isa()): "avx512", "avx2" or "scalar".
std::string simd_level();

}  // namespace cnuma
