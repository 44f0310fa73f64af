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
  bool amd = false;  // AuthenticAMD or HygonGenuine (Zen): kernels that tune per vendor read this
  bool amx_tile = false;
  bool amx_bf16 = false;
  bool amx_int8 = false;    // quantized experts' AMX path
  bool avx512vnni = false;  // quantized experts' int16 dot products (vpdpwssd)
  // aarch64 (getauxval AT_HWCAP/AT_HWCAP2, named as /proc/cpuinfo's Features line does)
  bool asimd = false;    // NEON
  bool asimddp = false;  // SDOT/UDOT
  bool bf16 = false;     // BFDOT, BFMMLA, BFCVT
  bool i8mm = false;     // SMMLA, USDOT
  bool sve = false;
  bool sve2 = false;
};

// What the running CPU and the OS (XCR0 on x86, the kernel's hwcaps on aarch64)
// support; the other architecture's fields stay false.
const CpuFeatures& cpu_features();

// The widest path the CPU supports, capped by COMPOSER_NUMA_SIMD (read at every
// call, so tests can force each path in turn).
Isa active_isa();

// isa_name(active_isa()): "avx512", "avx2", "neon" or "scalar".
std::string simd_level();

}  // namespace cnuma
