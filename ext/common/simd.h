// The SIMD target attributes and the instruction-set enum every kernel dispatches on.
//
// Kernels are compiled for the baseline ISA; functions that use wider vectors
// carry one of the CNUMA_TARGET_* attributes and are only called after
// active_isa() (common/cpu_features.h) said the CPU has them, so one build
// runs on any x86-64 CPU. On aarch64 NEON is the baseline; the BF16 and I8MM
// instructions carry target attributes in the same way. Elsewhere only the
// scalar paths exist.
#pragma once

#if defined(__x86_64__)
#define CNUMA_X86 1
// GCC 12 reports its own _mm512_undefined_* helpers as (maybe-)uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#define CNUMA_X86 0
#endif

#if defined(__aarch64__)
#define CNUMA_ARM64 1
#include <arm_neon.h>
// BFDOT/BFMMLA (FEAT_BF16) and SMMLA/USDOT (FEAT_I8MM): chosen only when
// cpu_features() reports them (getauxval AT_HWCAP2).
#define CNUMA_TARGET_NEON_BF16 __attribute__((target("arch=armv8.2-a+bf16")))
#define CNUMA_TARGET_NEON_I8MM __attribute__((target("arch=armv8.2-a+dotprod+i8mm")))
#else
#define CNUMA_ARM64 0
#endif

#if CNUMA_X86
// Each path names exactly the features active_isa() checks before choosing it.
#define CNUMA_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define CNUMA_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define CNUMA_TARGET_BF16DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))
#define CNUMA_TARGET_AMX \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))
#endif

// Generic code written once and compiled into each target's function by inlining.
#define CNUMA_INLINE inline __attribute__((always_inline))

namespace cnuma {

// Vector width of a kernel path, ordered within one architecture: a wider
// path is a larger value (Scalar < Avx2 < Avx512 on x86; Scalar < Neon on aarch64).
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Neon = 3 };

// The name COMPOSER_NUMA_SIMD and simd_level() use for it: "scalar", "avx2", "avx512", "neon".
inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Neon: return "neon";
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    case Isa::Scalar: break;
  }
  return "scalar";
}

// One iteration of a spin-wait: tells the core (and an SMT sibling) we are waiting.
inline void cpu_relax() {
#if CNUMA_X86
  _mm_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

}  // namespace cnuma
