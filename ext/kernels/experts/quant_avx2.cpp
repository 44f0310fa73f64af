// The quantized expert kernels for AVX2: quant_generic.h on 256-bit integer
// multiply-adds (vpmaddwd: int16 activations x int16-widened weights, pairs of k
// summed into 32-bit lanes). 16 rows are two ymm registers.
#include "common/simd.h"

#if CNUMA_X86

// Every header first: only the code below the pragma is compiled for AVX2.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/experts/quant.h"
#include "kernels/experts/vector.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "kernels/experts/quant_generic.h"

namespace cnuma {
namespace experts {
namespace {

struct Avx2Ops {
  static constexpr int C = 2;       // tokens per pass: 2 blocks x 2 tokens x 2 registers + weights fit the 16
  static constexpr int kChains = 1;  // the chain is one add: no split needed
  static constexpr int kStreams = 2; // pairs side by side in decode: 2 x 2 x 2 x 2 registers at most
  struct V {
    __m256i a, b;  // rows 0-7, 8-15
  };
  struct W {
    __m256i a, b;  // [8 rows][2 k] int16 each
  };
  static CNUMA_INLINE V zero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
  static CNUMA_INLINE V add(const V& x, const V& y) { return {_mm256_add_epi32(x.a, y.a), _mm256_add_epi32(x.b, y.b)}; }
  static CNUMA_INLINE W load8(const uint8_t* p) {
    return {_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)))};
  }
  // One widening per 8 rows for both nibbles: the low one masked, the high one shifted down.
  static CNUMA_INLINE void load4(const uint8_t* p, W& lo, W& hi) {
    const __m256i a = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
    const __m256i mask = _mm256_set1_epi16(0x0f);
    lo = {_mm256_and_si256(a, mask), _mm256_and_si256(b, mask)};
    hi = {_mm256_srli_epi16(a, 4), _mm256_srli_epi16(b, 4)};
  }
  static CNUMA_INLINE void madd(V& acc, const W& w, int32_t pair) {
    const __m256i x = _mm256_set1_epi32(pair);
    acc.a = _mm256_add_epi32(acc.a, _mm256_madd_epi16(w.a, x));
    acc.b = _mm256_add_epi32(acc.b, _mm256_madd_epi16(w.b, x));
  }
  static CNUMA_INLINE void update(float* out, const V& acc, int32_t comp, float sx, const float* sw, bool grouped) {
    const __m256i c = _mm256_set1_epi32(comp);
    const __m256 x = _mm256_set1_ps(sx);
    const __m256 sa = grouped ? _mm256_mul_ps(x, _mm256_loadu_ps(sw)) : x;
    const __m256 sb = grouped ? _mm256_mul_ps(x, _mm256_loadu_ps(sw + 8)) : x;
    const __m256 fa = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc.a, c));
    const __m256 fb = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc.b, c));
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), _mm256_mul_ps(fa, sa)));
    _mm256_storeu_ps(out + 8, _mm256_add_ps(_mm256_loadu_ps(out + 8), _mm256_mul_ps(fb, sb)));
  }
};

}  // namespace

void qfwd_avx2(const QFwdArgs& a) { qgen::qfwd<Avx2Ops>(a); }
void qcols_avx2(const QColsArgs& a) { qgen::qcols(a); }
void qswiglu_avx2(const float* o, int64_t pairs, int64_t m, float* act, int64_t stride) {
  qgen::swiglu(o, pairs, m, act, stride);
}
void qquantize_avx2(const float* v, int64_t n, int64_t xb, int16_t* q, float* scale, int32_t* sum, int8_t* hi,
                    uint8_t* lo) {
  qgen::quantize(v, n, xb, q, scale, sum, hi, lo);
}

}  // namespace experts
}  // namespace cnuma

#pragma GCC pop_options

#endif  // CNUMA_X86
