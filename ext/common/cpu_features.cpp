#include "common/cpu_features.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if CNUMA_X86
#include <cpuid.h>
#elif CNUMA_ARM64
#include <sys/auxv.h>
#endif

namespace cnuma {
namespace {

#if CNUMA_X86
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return f;
  f.amd = (b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u)     // "Auth" "enti" "cAMD"
          || (b == 0x6f677948u && d == 0x6e65476eu && c == 0x656e6975u);  // "Hygo" "nGen" "uine"
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  const bool fma = c & (1u << 12);
  if (!osxsave) return f;
  const uint64_t xcr0 = xgetbv0();
  // The OS must save the YMM (bits 1,2), ZMM/opmask (5,6,7) and AMX tile (17,18) state.
  const bool os_avx = (xcr0 & 0x6) == 0x6;
  const bool os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = os_avx && (b & (1u << 5));
  f.fma = os_avx && fma;
  f.avx512f = os_avx512 && (b & (1u << 16));
  f.avx512bw = os_avx512 && (b & (1u << 30));
  f.avx512vl = os_avx512 && (b & (1u << 31));
  f.amx_bf16 = os_amx && (d & (1u << 22));
  f.amx_tile = os_amx && (d & (1u << 24));
  f.amx_int8 = os_amx && (d & (1u << 25));
  f.avx512vnni = os_avx512 && (c & (1u << 11));
  unsigned a1, b1, c1, d1;
  __cpuid_count(7, 1, a1, b1, c1, d1);
  f.avx512bf16 = os_avx512 && (a1 & (1u << 5));
  return f;
}
#elif CNUMA_ARM64
CpuFeatures detect() {
  // The bits of the kernel's uapi asm/hwcap.h (stable ABI), spelled out so the
  // build does not depend on how new the sysroot's headers are.
  constexpr unsigned long kAsimd = 1ul << 1, kAsimdDp = 1ul << 20, kSve = 1ul << 22;
  constexpr unsigned long kSve2 = 1ul << 1, kI8mm = 1ul << 13, kBf16 = 1ul << 14;
  const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
  CpuFeatures f;
  f.asimd = hw & kAsimd;
  f.asimddp = hw & kAsimdDp;
  f.sve = hw & kSve;
  f.sve2 = hw2 & kSve2;
  f.i8mm = hw2 & kI8mm;
  f.bf16 = hw2 & kBf16;
  return f;
}
#else
CpuFeatures detect() { return CpuFeatures{}; }
#endif

// The cap COMPOSER_NUMA_SIMD names; -1 for a name this architecture has no path
// for (it is ignored: composer_numa.offload.native warns about unknown names).
int rank_of(const char* name) {
  if (std::strcmp(name, "scalar") == 0) return static_cast<int>(Isa::Scalar);
#if CNUMA_X86
  if (std::strcmp(name, "avx512") == 0) return static_cast<int>(Isa::Avx512);
  if (std::strcmp(name, "avx2") == 0) return static_cast<int>(Isa::Avx2);
#elif CNUMA_ARM64
  if (std::strcmp(name, "neon") == 0) return static_cast<int>(Isa::Neon);
#endif
  return -1;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();  // immutable facts about the CPU, computed once
  return f;
}

Isa active_isa() {
  const CpuFeatures& f = cpu_features();
  Isa best = Isa::Scalar;
  if (f.avx2 && f.fma) best = Isa::Avx2;
  if (f.avx512f && f.avx512bw && f.avx512vl && f.fma) best = Isa::Avx512;
  if (f.asimd) best = Isa::Neon;
  const char* cap = std::getenv("COMPOSER_NUMA_SIMD");
  if (cap == nullptr || *cap == '\0') return best;
  const int want = rank_of(cap);
  return want >= 0 && want < static_cast<int>(best) ? static_cast<Isa>(want) : best;
}

std::string simd_level() { return isa_name(active_isa()); }

}  // namespace cnuma
