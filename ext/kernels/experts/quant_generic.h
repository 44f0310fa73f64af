// The quantized expert kernels written once. Each per-ISA file (quant_scalar,
// quant_avx2, quant_avx512, quant_vnni) includes this header inside its own
// `#pragma GCC target` region (after every other header, so nothing shared is
// compiled for that target) with an `Ops` struct of 16-row integer
// primitives. Everything here has internal linkage: each file gets its own
// copy, compiled for its target. The control flow, the integer sums and the fp32 operations (in
// one order, no contraction: the quant files build with -ffp-contract=off) are
// the same on every path, so every path gives the same bits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/experts/quant.h"
#include "kernels/experts/vector.h"

#pragma GCC diagnostic ignored "-Wpsabi"

namespace cnuma {
namespace experts {
namespace qgen {
namespace {

typedef float f8 __attribute__((vector_size(32)));
typedef float f16v __attribute__((vector_size(64)));
typedef uint32_t u16v __attribute__((vector_size(64)));
typedef uint16_t h16v __attribute__((vector_size(32)));

// fp16 or bf16 bits -> fp32, exactly (subnormal fp16 through an exact
// integer-to-float product, so a denormals-are-zero mode cannot change it).
CNUMA_INLINE float scale_f32(uint16_t h, bool bf16) {
  uint32_t bits;
  if (bf16) {
    bits = static_cast<uint32_t>(h) << 16;
  } else {
    const uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
      const float f = static_cast<float>(m) * (1.0f / 16777216.0f);
      std::memcpy(&bits, &f, 4);
      bits |= sign;
    } else if (e == 31) {
      bits = sign | 0x7f800000u | (m << 13);
    } else {
      bits = sign | ((e + 112) << 23) | (m << 13);
    }
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// 32 scales (two blocks of 16) -> fp32, the same rule on 16-lane vectors.
CNUMA_INLINE void scales32(const uint16_t* s, bool bf16, float* out) {
  for (int h = 0; h < 2; ++h) {
    h16v raw;
    std::memcpy(&raw, s + 16 * h, sizeof raw);
    const u16v v = __builtin_convertvector(raw, u16v);
    u16v bits;
    if (bf16) {
      bits = v << 16;
    } else {
      const u16v sign = (v & 0x8000u) << 16, e = (v >> 10) & 0x1fu, m = v & 0x3ffu;
      const f16v sub = __builtin_convertvector(m, f16v) * (1.0f / 16777216.0f);
      const u16v subbits = reinterpret_cast<u16v>(sub) | sign;
      const u16v normal = sign | ((e + 112u) << 23) | (m << 13);
      const u16v special = sign | 0x7f800000u | (m << 13);
      bits = e == 0u ? subbits : (e == 31u ? special : normal);
    }
    std::memcpy(out + 16 * h, &bits, sizeof bits);
  }
}

CNUMA_INLINE int32_t pair_at(const int16_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return v;
}

// The integer sums of both 16-row blocks of S pairs over one activation block
// of xb elements, for N tokens: acc[(2 * s + half) * N + c]. Pair s's stream
// starts at w + s * wstride (its k-steps are 64 bytes: 32 per block). Decode
// reads S pairs side by side: one core streams S ranges at once, which keeps
// more of memory's bandwidth busy than one sequential range does. With few
// accumulators a fused multiply-add's latency shows, so each one is split into
// U partial sums over alternating k-steps (O::kChains chains wanted). Every sum
// is an exact integer: neither the streams nor the split can change it.
template <class O, int N, int S>
CNUMA_INLINE void qdot(const uint8_t* w, int64_t wstride, int bits, int64_t xb, const int16_t* x, int64_t xs,
                       typename O::V* acc, bool prefetch) {
  constexpr int A = 2 * N * S;
  constexpr int U = O::kChains > A ? O::kChains / A : 1;  // 1, 2 or 4: divides every step count
  typename O::V part[U][A];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < A; ++i) part[u][i] = O::zero();
  if (bits == 8) {
    for (int64_t j0 = 0; j0 < xb / 2; j0 += U) {
      for (int u = 0; u < U; ++u) {
        const int64_t j = j0 + u;
        int32_t pair[N];
        for (int c = 0; c < N; ++c) pair[c] = pair_at(x + c * xs + 2 * j);
        for (int s = 0; s < S; ++s) {
          const uint8_t* p = w + s * wstride + j * 64;
          if (prefetch) __builtin_prefetch(p + kQPrefetchBytes, 0, 3);
          const typename O::W v0 = O::load8(p), v1 = O::load8(p + 32);
          for (int c = 0; c < N; ++c) {
            O::madd(part[u][2 * s * N + c], v0, pair[c]);
            O::madd(part[u][(2 * s + 1) * N + c], v1, pair[c]);
          }
        }
      }
    }
  } else {
    for (int64_t j0 = 0; j0 < xb / 4; j0 += U) {
      for (int u = 0; u < U; ++u) {
        const int64_t j = j0 + u;
        int32_t p0[N], p1[N];
        for (int c = 0; c < N; ++c) {
          p0[c] = pair_at(x + c * xs + 4 * j);
          p1[c] = pair_at(x + c * xs + 4 * j + 2);
        }
        for (int s = 0; s < S; ++s) {
          const uint8_t* p = w + s * wstride + j * 64;
          if (prefetch) __builtin_prefetch(p + kQPrefetchBytes, 0, 3);
          typename O::W lo0, hi0, lo1, hi1;
          O::load4(p, lo0, hi0);
          O::load4(p + 32, lo1, hi1);
          for (int c = 0; c < N; ++c) {
            O::madd(part[u][2 * s * N + c], lo0, p0[c]);
            O::madd(part[u][(2 * s + 1) * N + c], lo1, p0[c]);
            O::madd(part[u][2 * s * N + c], hi0, p1[c]);
            O::madd(part[u][(2 * s + 1) * N + c], hi1, p1[c]);
          }
        }
      }
    }
  }
  for (int i = 0; i < A; ++i) {
    acc[i] = part[0][i];
    for (int u = 1; u < U; ++u) acc[i] = O::add(acc[i], part[u][i]);
  }
}

// qdot for a run-time token count n (1..O::C) and stream count S (1, or up to
// O::kStreams when n <= kQStreamTokens).
template <class O, int N = 1>
CNUMA_INLINE void qdot_n(int n, int S, const uint8_t* w, int64_t wstride, int bits, int64_t xb, const int16_t* x,
                         int64_t xs, typename O::V* acc, bool prefetch) {
  if constexpr (N <= O::C) {
    if (n == N) {
      if constexpr (N <= kQStreamTokens) {
        if constexpr (O::kStreams >= 4)
          if (S == 4) return qdot<O, N, 4>(w, wstride, bits, xb, x, xs, acc, prefetch);
        if constexpr (O::kStreams >= 3)
          if (S == 3) return qdot<O, N, 3>(w, wstride, bits, xb, x, xs, acc, prefetch);
        if constexpr (O::kStreams >= 2)
          if (S == 2) return qdot<O, N, 2>(w, wstride, bits, xb, x, xs, acc, prefetch);
      }
      return qdot<O, N, 1>(w, wstride, bits, xb, x, xs, acc, prefetch);
    }
    qdot_n<O, N + 1>(n, S, w, wstride, bits, xb, x, xs, acc, prefetch);
  }
}

// Per-row scales (int8 without groups) multiply the finished sums.
CNUMA_INLINE void finish_rows(float* out, int64_t m, const float* sw) {
  for (int64_t c = 0; c < m; ++c)
    for (int r = 0; r < 32; ++r) out[c * 32 + r] = out[c * 32 + r] * sw[r];
}

// Pairs p0 .. p0 + S - 1 of a call, side by side. Per pair, the fp32 part is
// the same on every path: out += float(isum - comp) * (sx * sw[r]) per block
// (grouped), or * sx with the row scale multiplied in at the end.
template <class O>
CNUMA_INLINE void qfwd_pairs(const QFwdArgs& a, int64_t p0, int S) {
  alignas(64) float sw[O::kStreams][32];
  const auto out_of = [&](int s) { return a.out + (p0 + s) * a.m * 32; };
  const auto scales_of = [&](int s) { return a.s + (p0 + s) * a.sstride; };
  for (int s = 0; s < S; ++s) {
    std::fill(out_of(s), out_of(s) + a.m * 32, 0.0f);
    if (!a.grouped) scales32(scales_of(s), a.sbf16, sw[s]);
  }
  const uint8_t* w0 = a.w + p0 * a.wstride;
  const int64_t nb = a.K / a.xb, step = qbytes(a.xb, a.bits);
  for (int64_t b = 0; b < nb; ++b) {
    if (a.grouped)
      for (int s = 0; s < S; ++s) scales32(scales_of(s) + b * 32, a.sbf16, sw[s]);
    for (int64_t c0 = 0; c0 < a.m; c0 += O::C) {
      const int n = static_cast<int>(std::min<int64_t>(O::C, a.m - c0));
      typename O::V acc[2 * O::C * O::kStreams];
      qdot_n<O>(n, S, w0 + b * step, a.wstride, a.bits, a.xb, a.x + c0 * a.xs + b * a.xb, a.xs, acc, c0 == 0);
      for (int s = 0; s < S; ++s) {
        for (int half = 0; half < 2; ++half) {
          for (int c = 0; c < n; ++c) {
            const int64_t i = (c0 + c) * a.xbs + b;
            const int32_t comp = a.bits == 4 ? kInt4Offset * a.xsum[i] : 0;
            O::update(out_of(s) + (c0 + c) * 32 + half * 16, acc[(2 * s + half) * n + c], comp, a.xscale[i],
                      sw[s] + half * 16, a.grouped);
          }
        }
      }
    }
  }
  if (!a.grouped)
    for (int s = 0; s < S; ++s) finish_rows(out_of(s), a.m, sw[s]);
}

constexpr float kQMax = 32767.0f;

// Nearest integer, ties to even, for |v| < 2^22 (codes are at most 32767):
// adding and subtracting 1.5 * 2^23 leaves exactly that in fp32's default
// rounding, as nearbyint does, but inline and vectorizable where nearbyint is a
// libm call (baseline x86 has no SSE4.1 round).
CNUMA_INLINE float round_even(float v) {
  constexpr float kShift = 12582912.0f;
  return (v + kShift) - kShift;
}

// v[0..n) -> int16 codes per block of xb: q = round_even(v * (32767 / max|v|)),
// scale max|v| / 32767 (0 for an all-zero block), and each block's code sum;
// with hi / lo, also AMX's two byte planes of the codes (q = 256 * hi + lo).
// Element-wise fp32 operations (and an exact max): every ISA's copy gives the
// same codes.
CNUMA_INLINE void quantize(const float* v, int64_t n, int64_t xb, int16_t* q, float* scale, int32_t* sum,
                           int8_t* hi, uint8_t* lo) {
  for (int64_t b = 0; b < n / xb; ++b) {
    const float* src = v + b * xb;
    float m = 0.0f;
    for (int64_t i = 0; i < xb; ++i) m = std::max(m, std::fabs(src[i]));
    int32_t total = 0;
    if (m > 0.0f) {
      const float inv = kQMax / m;
      for (int64_t i = 0; i < xb; ++i) {
        const float r = round_even(src[i] * inv);
        const int32_t c = static_cast<int32_t>(std::min(kQMax, std::max(-kQMax, r)));
        q[b * xb + i] = static_cast<int16_t>(c);
        total += c;
      }
      scale[b] = m / kQMax;
    } else {
      std::fill(q + b * xb, q + (b + 1) * xb, int16_t{0});
      scale[b] = 0.0f;
    }
    sum[b] = total;
  }
  if (hi != nullptr)
    for (int64_t i = 0; i < n; ++i) {
      hi[i] = static_cast<int8_t>(q[i] >> 8);
      lo[i] = static_cast<uint8_t>(q[i] & 0xff);
    }
}

static_assert(kBlock == 16, "swiglu takes one 16-lane vector per block");

// SwiGLU of a gate/up item's sums o ([pairs][m][32]: 16 gate rows, then 16 up
// rows): act[c * stride + q * 16 + r] = silu(g) * u, 16 rows at once.
CNUMA_INLINE void swiglu(const float* o, int64_t pairs, int64_t m, float* act, int64_t stride) {
  for (int64_t q = 0; q < pairs; ++q)
    for (int64_t c = 0; c < m; ++c) {
      const float* oc = o + (q * m + c) * 32;
      const vf g = ldf(oc), u = ldf(oc + kBlock);
      stf(act + c * stride + q * kBlock, g * (1.0f / (1.0f + vexp(-g))) * u);
    }
}

template <class O>
CNUMA_INLINE void qfwd(const QFwdArgs& a) {
  const int64_t group = a.m <= kQStreamTokens ? O::kStreams : 1;
  for (int64_t p0 = 0; p0 < a.pairs; p0 += group)
    qfwd_pairs<O>(a, p0, static_cast<int>(std::min(group, a.pairs - p0)));
}

// ------------------------------------------------------------- backward --

// The exact fp32 values of 8 columns of one interleaved block pair: wt[32][8].
CNUMA_INLINE void dequant_cols(const QColsArgs& a, int64_t i, float* wt) {
  const uint8_t* w = a.w + i * a.gstride;
  const uint16_t* s = a.s + i * a.sstride + (a.group ? (a.c0 / a.group) * 32 : 0);
  for (int row = 0; row < 32; ++row) {
    const int half = row >> 4, r = row & 15;
    const float sc = scale_f32(s[row], a.sbf16);
    for (int j = 0; j < 8; ++j) {
      const int64_t c = a.c0 + j;
      int32_t q;
      if (a.bits == 8) {
        q = static_cast<int8_t>(w[(c >> 1) * 64 + half * 32 + r * 2 + (c & 1)]);
      } else {
        const uint8_t byte = w[(c >> 2) * 64 + half * 32 + r * 2 + (c & 1)];
        q = static_cast<int32_t>((c & 2) ? byte >> 4 : byte & 15) - kInt4Offset;
      }
      wt[row * 8 + j] = static_cast<float>(q) * sc;
    }
  }
}

CNUMA_INLINE f8 ld8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int N>
CNUMA_INLINE void cols_dot(const QColsArgs& a, const float* wt, int64_t rows, int64_t row0, int64_t s0, bool first) {
  f8 acc[N];
  const float* dy[N];
  for (int c = 0; c < N; ++c) {
    const int64_t s = s0 + c;
    dy[c] = a.dy + (a.index != nullptr ? a.index[s] : s) * a.dys + row0;
    acc[c] = first ? f8{} : ld8(a.out + s * a.outs);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const f8 w = ld8(wt + r * 8);
    for (int c = 0; c < N; ++c) acc[c] = acc[c] + w * dy[c][r];
  }
  for (int c = 0; c < N; ++c) std::memcpy(a.out + (s0 + c) * a.outs, &acc[c], sizeof(f8));
}

// Rows are summed in order, 32 block pairs at a time (32 KiB of fp32 weights),
// the partial sums kept in `out`: the same order on every path.
CNUMA_INLINE void qcols(const QColsArgs& a) {
  constexpr int64_t kChunk = 32;
  alignas(64) float wt[kChunk * 32 * 8];
  for (int64_t i0 = 0; i0 < a.ngroups; i0 += kChunk) {
    const int64_t n = std::min(kChunk, a.ngroups - i0);
    for (int64_t i = 0; i < n; ++i) dequant_cols(a, i0 + i, wt + i * 32 * 8);
    for (int64_t s0 = 0; s0 < a.m; s0 += 4) {
      switch (std::min<int64_t>(4, a.m - s0)) {
        case 4: cols_dot<4>(a, wt, n * 32, i0 * 32, s0, i0 == 0); break;
        case 3: cols_dot<3>(a, wt, n * 32, i0 * 32, s0, i0 == 0); break;
        case 2: cols_dot<2>(a, wt, n * 32, i0 * 32, s0, i0 == 0); break;
        default: cols_dot<1>(a, wt, n * 32, i0 * 32, s0, i0 == 0); break;
      }
    }
  }
}

}  // namespace
}  // namespace qgen
}  // namespace experts
}  // namespace cnuma
