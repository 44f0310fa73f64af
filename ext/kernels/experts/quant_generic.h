// The quantized expert kernels written once. Each per-ISA file (quant_scalar,
// quant_avx2, quant_avx512, quant_vnni) includes this header inside its own
// `#pragma GCC target` region (after every other header, so nothing shared is
// compiled for that target) with an `Ops` struct of 16-row integer
// primitives. Everything here has internal linkage: each file gets its own
// copy, compiled for its target. The the control flow, the integer sums and the fp32 operations (in
// one order, no contraction: the quant files build with -ffp-contract=off) are
// the same on every path, so every path gives the same bits.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/experts/quant.h"

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

// acc[c] = the integer sums of one block (16 rows) over one activation block of
// xb elements, for N tokens. `w` is the block's first k-step (64-byte steps).
template <class O, int N>
CNUMA_INLINE void qdot(const uint8_t* w, int bits, int64_t xb, const int16_t* x, int64_t xs, typename O::V* acc,
                       bool prefetch) {
  for (int c = 0; c < N; ++c) acc[c] = O::zero();
  if (bits == 8) {
    for (int64_t j = 0; j < xb / 2; ++j) {
      if (prefetch) __builtin_prefetch(w + j * 64 + kQPrefetchBytes, 0, 3);
      const typename O::W v = O::load8(w + j * 64);
      for (int c = 0; c < N; ++c) O::madd(acc[c], v, pair_at(x + c * xs + 2 * j));
    }
  } else {
    for (int64_t j = 0; j < xb / 4; ++j) {
      if (prefetch) __builtin_prefetch(w + j * 64 + kQPrefetchBytes, 0, 3);
      typename O::W lo, hi;
      O::load4(w + j * 64, lo, hi);
      for (int c = 0; c < N; ++c) {
        O::madd(acc[c], lo, pair_at(x + c * xs + 4 * j));
        O::madd(acc[c], hi, pair_at(x + c * xs + 4 * j + 2));
      }
    }
  }
}

template <class O, int N = 1>
CNUMA_INLINE void qdot_n(int n, const uint8_t* w, int bits, int64_t xb, const int16_t* x, int64_t xs,
                         typename O::V* acc, bool prefetch) {
  if constexpr (N <= O::C) {
    if (n == N) return qdot<O, N>(w, bits, xb, x, xs, acc, prefetch);
    qdot_n<O, N + 1>(n, w, bits, xb, x, xs, acc, prefetch);
  }
}

// The fp32 part every path shares: out += float(isum - comp) * (sx * sw[r])
// (grouped) or * sx (per row, the row scale multiplied in at the end).
CNUMA_INLINE void finish_rows(const QFwdArgs& a, const float* sw) {
  if (a.grouped) return;
  for (int64_t c = 0; c < a.m; ++c)
    for (int r = 0; r < 32; ++r) a.out[c * 32 + r] = a.out[c * 32 + r] * sw[r];
}

template <class O>
CNUMA_INLINE void qfwd(const QFwdArgs& a) {
  alignas(64) float sw[32];
  std::fill(a.out, a.out + a.m * 32, 0.0f);
  if (!a.grouped) scales32(a.s, a.sbf16, sw);
  const int64_t nb = a.K / a.xb, step = qbytes(a.xb, a.bits);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* w = a.w + b * step;
    if (a.grouped) scales32(a.s + b * 32, a.sbf16, sw);
    for (int64_t c0 = 0; c0 < a.m; c0 += O::C) {
      const int n = static_cast<int>(std::min<int64_t>(O::C, a.m - c0));
      for (int half = 0; half < 2; ++half) {
        typename O::V acc[O::C];
        qdot_n<O>(n, w + half * 32, a.bits, a.xb, a.x + c0 * a.xs + b * a.xb, a.xs, acc, c0 == 0 && half == 0);
        for (int c = 0; c < n; ++c) {
          const int64_t i = (c0 + c) * a.xbs + b;
          const int32_t comp = a.bits == 4 ? kInt4Offset * a.xsum[i] : 0;
          O::update(a.out + (c0 + c) * 32 + half * 16, acc[c], comp, a.xscale[i], sw + half * 16, a.grouped);
        }
      }
    }
  }
  finish_rows(a, sw);
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
