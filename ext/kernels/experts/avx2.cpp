// The expert kernels for AVX2 + FMA. The forward item is written on 256-bit
// intrinsics: GCC lowers generic.h's 64-byte vectors on AVX2 through the stack
// (every accumulator update stored and reloaded in pieces), which left the
// forward pass at a fifth of the memory bandwidth. The backward kernels are
// generic.h compiled for this target.
#include "common/simd.h"

#if CNUMA_X86

// Every header first: only the code below the pragma is compiled for AVX2.
#include <algorithm>
#include <cstdint>

#include "kernels/experts/generic.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace cnuma {
namespace experts {
namespace {

// Tokens per pass over the weights: 4 * C accumulators, 4 weight registers and
// 2 * C broadcasts fit the 16 ymm registers for C = 2.
constexpr int kTokens = 2;

// Both blocks times C fp32 tokens in one pass (each k-step's 4 x 8 rows are
// loaded once and feed every token); out[c * 32 + row]. Every token sums its
// k-steps in one order into its own accumulators, whatever C is, so a token's
// result does not depend on which tokens share its expert (batch invariance:
// tests/offload/test_fork.py compares rows of a batch with the whole). No
// software prefetch: on Zen 3 it cost 5-10 % against the hardware prefetchers
// on this contiguous stream (the AVX-512 BF16 path keeps its own).
template <int C, bool WB>
inline void mk_ymm(const FwdItem& a, const float* x, float* out) {
  __m256 acc[C][4];
  for (int c = 0; c < C; ++c)
    for (int h = 0; h < 4; ++h) acc[c][h] = _mm256_setzero_ps();
  const int64_t ks = a.ks, xs = a.xs;
  if constexpr (WB) {
    const uint16_t* p0 = static_cast<const uint16_t*>(a.b0);
    const uint16_t* p1 = static_cast<const uint16_t*>(a.b1);
    const __m256i hmask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    for (int64_t kp = 0; kp < a.K / 2; ++kp) {
      const uint16_t* q0 = p0 + kp * ks;
      const uint16_t* q1 = p1 + kp * ks;
      const __m256i w[4] = {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q0)),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q0 + 16)),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q1)),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q1 + 16))};
      __m256 x0[C], x1[C];
      for (int c = 0; c < C; ++c) {
        x0[c] = _mm256_broadcast_ss(x + c * xs + 2 * kp);
        x1[c] = _mm256_broadcast_ss(x + c * xs + 2 * kp + 1);
      }
      for (int h = 0; h < 4; ++h) {
        // A bf16 pair per 32-bit lane: the low half is k, the high half k + 1.
        const __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(w[h], 16));
        const __m256 hi = _mm256_castsi256_ps(_mm256_and_si256(w[h], hmask));
        for (int c = 0; c < C; ++c) {
          acc[c][h] = _mm256_fmadd_ps(lo, x0[c], acc[c][h]);
          acc[c][h] = _mm256_fmadd_ps(hi, x1[c], acc[c][h]);
        }
      }
    }
  } else {
    const float* p0 = static_cast<const float*>(a.b0);
    const float* p1 = static_cast<const float*>(a.b1);
    for (int64_t k = 0; k < a.K; k += 2) {  // K is even
      for (int j = 0; j < 2; ++j) {
        const float* q0 = p0 + (k + j) * ks;
        const float* q1 = p1 + (k + j) * ks;
        const __m256 w[4] = {_mm256_loadu_ps(q0), _mm256_loadu_ps(q0 + 8), _mm256_loadu_ps(q1),
                             _mm256_loadu_ps(q1 + 8)};
        for (int c = 0; c < C; ++c) {
          const __m256 xb = _mm256_broadcast_ss(x + c * xs + k + j);
          for (int h = 0; h < 4; ++h) acc[c][h] = _mm256_fmadd_ps(w[h], xb, acc[c][h]);
        }
      }
    }
  }
  for (int c = 0; c < C; ++c)
    for (int h = 0; h < 4; ++h) _mm256_storeu_ps(out + c * 32 + h * 8, acc[c][h]);
}

template <bool WB>
inline void fwd_item_ymm(const FwdItem& a) {
  alignas(64) float out[kTokens * 32];
  for (int64_t c0 = 0; c0 < a.m; c0 += kTokens) {
    const int64_t n = std::min<int64_t>(kTokens, a.m - c0);
    const float* x = static_cast<const float*>(a.x) + c0 * a.xs;
    if (n == 2)
      mk_ymm<2, WB>(a, x, out);
    else
      mk_ymm<1, WB>(a, x, out);
    for (int64_t c = 0; c < n; ++c) epilogue_vec(a, c0 + c, out + c * 32, false);
  }
}

}  // namespace

void fwd_item_avx2(const FwdItem& a) {
  if (a.wbf16)
    fwd_item_ymm<true>(a);
  else
    fwd_item_ymm<false>(a);
}

void data8_avx2(const DataArgs& a, const float* dy, float* out) {
  a.wbf16 ? data8_vec<true>(a, dy, out) : data8_vec<false>(a, dy, out);
}
void grad_avx2(const GradArgs& a) { a.wbf16 ? grad_vec<true>(a) : grad_vec<false>(a); }

}  // namespace experts
}  // namespace cnuma

#pragma GCC pop_options

#endif  // CNUMA_X86
