// bfloat16 <-> float32, the one conversion every kernel uses.
//
// The rule: round to nearest, ties to even (as torch rounds), denormals kept
// (no flush to zero, hence integer rounding rather than vcvtneps2bf16), and
// every NaN becomes the quiet NaN 0x7fc0. Widening is exact (a shift).
// Scalar, generic-vector, AVX2 and AVX-512 forms give identical bits.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/simd.h"

namespace cnuma {

constexpr uint16_t kBf16QuietNaN = 0x7fc0;

CNUMA_INLINE float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

CNUMA_INLINE uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return kBf16QuietNaN;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// f rounded to the nearest bf16, as a float.
CNUMA_INLINE float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

// The same rule on a GCC vector of uint32 float bit patterns: each lane's bf16
// pattern in its low 16 bits. Always inlined, so the vector never crosses a
// call and GCC's note on the vector-return ABI does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
template <class VU>
CNUMA_INLINE VU bf16_bits(const VU& u) {
  const VU r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? (VU{} + kBf16QuietNaN) : r;
}
#pragma GCC diagnostic pop

#if CNUMA_X86

// 8 floats -> 8 bf16.
CNUMA_TARGET_AVX2 inline __m128i f32x8_to_bf16(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(kBf16QuietNaN), _mm256_castps_si256(nan));
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8));
}

// 8 bf16 -> 8 floats.
CNUMA_TARGET_AVX2 inline __m256 bf16x8_to_f32(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// 16 floats -> 16 bf16.
CNUMA_TARGET_AVX512 inline __m256i f32x16_to_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(kBf16QuietNaN));
  return _mm512_cvtepi32_epi16(r);
}

// 16 bf16 -> 16 floats.
CNUMA_TARGET_AVX512 inline __m512 bf16x16_to_f32(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

#endif  // CNUMA_X86

}  // namespace cnuma
