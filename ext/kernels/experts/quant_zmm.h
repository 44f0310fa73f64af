// 16-row primitives on one zmm register for the AVX-512 quantized kernels
// (quant_avx512.cpp, quant_vnni.cpp, quant_amx.cpp include it inside their
// target region; internal linkage, one copy per file).
#pragma once

#include "kernels/experts/quant_generic.h"

namespace cnuma {
namespace experts {
namespace {

struct ZmmOps {
  static constexpr int C = 8;         // tokens per pass
  static constexpr int kStreams = 4;  // pairs side by side in decode: 2 x 4 x 2 accumulators at most
  using V = __m512i;           // 16 rows of int32 sums
  using W = __m512i;           // [16 rows][2 k] int16
  static CNUMA_INLINE V zero() { return _mm512_setzero_si512(); }
  static CNUMA_INLINE V add(const V& a, const V& b) { return _mm512_add_epi32(a, b); }
  static CNUMA_INLINE W load8(const uint8_t* p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // One widening for both nibbles: the low one masked, the high one shifted down.
  static CNUMA_INLINE void load4(const uint8_t* p, W& lo, W& hi) {
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    lo = _mm512_and_si512(v, _mm512_set1_epi16(0x0f));
    hi = _mm512_srli_epi16(v, 4);
  }
  // Same operations, in the same order, as the scalar and AVX2 updates.
  static CNUMA_INLINE void update(float* out, const V& acc, int32_t comp, float sx, const float* sw, bool grouped) {
    const __m512 x = _mm512_set1_ps(sx);
    const __m512 s = grouped ? _mm512_mul_ps(x, _mm512_loadu_ps(sw)) : x;
    const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, _mm512_set1_epi32(comp)));
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), _mm512_mul_ps(f, s)));
  }
};

}  // namespace
}  // namespace experts
}  // namespace cnuma
