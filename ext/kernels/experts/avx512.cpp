// The expert kernels for AVX-512: generic.h compiled for that target, and the
// forward item on AVX-512 BF16 dot products.
#include "common/simd.h"

#if CNUMA_X86

#include <algorithm>
#include <cstring>

#include "kernels/experts/generic.h"

namespace cnuma {
namespace experts {

CNUMA_TARGET_AVX512 void fwd_item_avx512(const FwdItem& a) {
  if (a.wbf16)
    fwd_item_vec<8, true>(a);
  else
    fwd_item_vec<8, false>(a);
}

CNUMA_TARGET_AVX512 void data8_avx512(const DataArgs& a, const float* dy, float* out) {
  a.wbf16 ? data8_vec<true>(a, dy, out) : data8_vec<false>(a, dy, out);
}
CNUMA_TARGET_AVX512 void grad_avx512(const GradArgs& a) { a.wbf16 ? grad_vec<true>(a) : grad_vec<false>(a); }

namespace {

// Both blocks times C bf16 tokens: each 64-byte weight load feeds C dot products,
// so for few tokens the weights stream from memory exactly once.
template <int C>
CNUMA_TARGET_BF16DOT inline void mk_dot(const uint16_t* b0, const uint16_t* b1, int64_t ks, int64_t K,
                                        const uint16_t* x, int64_t xs, float* out) {
  __m512 a0[C], a1[C];
  for (int c = 0; c < C; ++c) a0[c] = a1[c] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K / 2; ++kp) {
    _mm_prefetch(reinterpret_cast<const char*>(b0 + kp * ks + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(b1 + kp * ks + kPrefetch), _MM_HINT_T0);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(b0 + kp * ks);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(b1 + kp * ks);
    for (int c = 0; c < C; ++c) {
      int32_t pair;
      std::memcpy(&pair, x + c * xs + 2 * kp, 4);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      a0[c] = _mm512_dpbf16_ps(a0[c], w0, xb);
      a1[c] = _mm512_dpbf16_ps(a1[c], w1, xb);
    }
  }
  for (int c = 0; c < C; ++c) {
    _mm512_storeu_ps(out + c * 32, a0[c]);
    _mm512_storeu_ps(out + c * 32 + 16, a1[c]);
  }
}

constexpr int kDotMax = 8;

template <int C = 1>
CNUMA_TARGET_BF16DOT inline void mk_dot_n(int64_t n, const FwdItem& a, const uint16_t* x, float* out) {
  if constexpr (C <= kDotMax) {
    if (n == C) {
      mk_dot<C>(static_cast<const uint16_t*>(a.b0), static_cast<const uint16_t*>(a.b1), a.ks, a.K, x,
                a.xs, out);
      return;
    }
    mk_dot_n<C + 1>(n, a, x, out);
  }
}
// S pairs side by side times C <= kStreamTokens tokens: S streams of 128-byte
// k-steps. Each output sums over k in the same order as mk_dot, so the result
// does not depend on how many pairs an item carries. out[(q * C + c) * 32 + row].
template <int C, int S>
CNUMA_TARGET_BF16DOT inline void mk_dot_streams(const uint16_t* b0, int64_t pstride, int64_t ks, int64_t K,
                                                const uint16_t* x, int64_t xs, float* out) {
  __m512 acc[S][C][2];
  for (int q = 0; q < S; ++q)
    for (int c = 0; c < C; ++c) acc[q][c][0] = acc[q][c][1] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K / 2; ++kp) {
    __m512bh w[S][2];
    for (int q = 0; q < S; ++q) {
      const uint16_t* b = b0 + q * pstride + kp * ks;
      _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetch), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetch + kBlock * 2), _MM_HINT_T0);
      w[q][0] = (__m512bh)_mm512_loadu_si512(b);
      w[q][1] = (__m512bh)_mm512_loadu_si512(b + kBlock * 2);
    }
    for (int c = 0; c < C; ++c) {
      int32_t pair;
      std::memcpy(&pair, x + c * xs + 2 * kp, 4);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      for (int q = 0; q < S; ++q) {
        acc[q][c][0] = _mm512_dpbf16_ps(acc[q][c][0], w[q][0], xb);
        acc[q][c][1] = _mm512_dpbf16_ps(acc[q][c][1], w[q][1], xb);
      }
    }
  }
  for (int q = 0; q < S; ++q)
    for (int c = 0; c < C; ++c) {
      _mm512_storeu_ps(out + (q * C + c) * 32, acc[q][c][0]);
      _mm512_storeu_ps(out + (q * C + c) * 32 + 16, acc[q][c][1]);
    }
}

template <int C, int S = 2>
CNUMA_TARGET_BF16DOT inline void mk_dot_streams_n(int64_t s, const FwdItem& a, float* out) {
  if constexpr (S <= kStreams) {
    if (s == S) {
      mk_dot_streams<C, S>(static_cast<const uint16_t*>(a.b0), a.pstride, a.ks, a.K,
                           static_cast<const uint16_t*>(a.x), a.xs, out);
      return;
    }
    mk_dot_streams_n<C, S + 1>(s, a, out);
  }
}

// An item of several pairs (decode): the b1 - b0 distance is one block.
CNUMA_TARGET_BF16DOT void fwd_pairs_dot(const FwdItem& a) {
  alignas(64) float out[kStreams * kStreamTokens * 32];
  if (a.m == 1)
    mk_dot_streams_n<1>(a.pairs, a, out);
  else
    mk_dot_streams_n<2>(a.pairs, a, out);
  for (int64_t q = 0; q < a.pairs; ++q) {
    const FwdItem one = pair_of(a, q, true);
    for (int64_t c = 0; c < a.m; ++c) epilogue_vec(one, c, out + (q * a.m + c) * 32, true);
  }
}
}  // namespace

CNUMA_TARGET_BF16DOT void fwd_item_dot(const FwdItem& a) {
  if (a.pairs > 1) return fwd_pairs_dot(a);
  alignas(64) float out[kDotMax * 32];
  for (int64_t c0 = 0; c0 < a.m; c0 += kDotMax) {
    const int64_t n = std::min<int64_t>(kDotMax, a.m - c0);
    mk_dot_n(n, a, static_cast<const uint16_t*>(a.x) + c0 * a.xs, out);
    for (int64_t c = 0; c < n; ++c) epilogue_vec(a, c0 + c, out + c * 32, true);
  }
}

}  // namespace experts
}  // namespace cnuma

#endif  // CNUMA_X86
