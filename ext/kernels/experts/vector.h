// Generic 16-lane vectors (one packed block of 16 output rows), written once
// with GCC vector extensions. They are always inlined, so each use compiles
// for the target of the kernel that calls it (AVX2, AVX-512; see generic.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/bf16.h"
#include "common/simd.h"

// The vectors never cross a call boundary (always inlined), so GCC's notes on
// the vector-argument ABI do not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace cnuma {
namespace experts {

typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

CNUMA_INLINE float sigmoid(float g) { return 1.0f / (1.0f + std::exp(-g)); }

CNUMA_INLINE vf splat(float x) { return vf{} + x; }
CNUMA_INLINE vf ldf(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
CNUMA_INLINE void stf(float* p, const vf& v) { std::memcpy(p, &v, sizeof v); }
CNUMA_INLINE vu ldpairs(const uint16_t* p) {  // 16 rows x 2 k of bf16
  vu v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
CNUMA_INLINE vf pair_lo(const vu& w) { return reinterpret_cast<vf>(w << 16); }
CNUMA_INLINE vf pair_hi(const vu& w) { return reinterpret_cast<vf>(w & 0xffff0000u); }
CNUMA_INLINE vu vbf16_bits(const vf& x) { return bf16_bits(reinterpret_cast<vu>(x)); }
CNUMA_INLINE vf vround_bf16(const vf& x) { return reinterpret_cast<vf>(vbf16_bits(x) << 16); }
CNUMA_INLINE void st_bf16(uint16_t* p, const vf& x) {
  const vh h = __builtin_convertvector(vbf16_bits(x), vh);
  std::memcpy(p, &h, sizeof h);
}
CNUMA_INLINE float hsum(const vf& v) {  // fixed order, so results never depend on the ISA's shuffles
  float s = 0.0f;
  for (int l = 0; l < 16; ++l) s += v[l];
  return s;
}

// exp for the SwiGLU gate: range reduction by ln 2, degree-6 polynomial (~1 ulp
// on the clamped range, which keeps 2^n normal).
CNUMA_INLINE vf vexp(const vf& in) {
  vf x = in > splat(88.0f) ? splat(88.0f) : in;
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (x * 1.44269504088896341f + magic) - magic;
  const vf r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  vf p = splat(1.0f / 720);
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  return p * reinterpret_cast<vf>(e);
}

}  // namespace experts
}  // namespace cnuma
