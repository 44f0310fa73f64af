// The generic vector kernels, written once on vector.h's 16-lane types. They
// are always inlined: avx2.cpp and avx512.cpp instantiate them inside functions
// with those targets, so each compiles to that instruction set.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/experts/microkernels.h"
#include "kernels/experts/vector.h"

namespace cnuma {
namespace experts {

// The end of a forward item for one token row: down items copy the 32 sums to
// y; gate/up items apply SwiGLU and write the activation (and save g, u).
CNUMA_INLINE void epilogue_vec(const FwdItem& a, int64_t row, const float* o, bool xbf16) {
  if (a.down) {
    float* y = static_cast<float*>(a.dst) + row * a.dst_stride;
    stf(y, ldf(o));
    stf(y + 16, ldf(o + 16));
    return;
  }
  const vf g = ldf(o), u = ldf(o + 16);
  const vf act = g / (splat(1.0f) + vexp(-g)) * u;
  if (xbf16)
    st_bf16(static_cast<uint16_t*>(a.dst) + row * a.dst_stride, act);
  else
    stf(static_cast<float*>(a.dst) + row * a.dst_stride, a.round ? vround_bf16(act) : act);
  if (a.save_g != nullptr) {
    stf(a.save_g + row * a.save_stride, g);
    stf(a.save_u + row * a.save_stride, u);
  }
}

// One block times C tokens of fp32 input; out[c * 32 + row].
template <int C, bool WB>
CNUMA_INLINE void mk_vec(const void* blk, int64_t ks, int64_t K, const float* x, int64_t xs, float* out) {
  vf acc[C];
  for (int c = 0; c < C; ++c) acc[c] = vf{};
  if constexpr (WB) {
    const uint16_t* w = static_cast<const uint16_t*>(blk);
    for (int64_t kp = 0; kp < K / 2; ++kp) {
      const vu v = ldpairs(w + kp * ks);
      const vf lo = pair_lo(v), hi = pair_hi(v);
      for (int c = 0; c < C; ++c) {
        acc[c] += lo * x[c * xs + 2 * kp];
        acc[c] += hi * x[c * xs + 2 * kp + 1];
      }
    }
  } else {
    const float* w = static_cast<const float*>(blk);
    for (int64_t k = 0; k < K; ++k) {
      const vf v = ldf(w + k * ks);
      for (int c = 0; c < C; ++c) acc[c] += v * x[c * xs + k];
    }
  }
  for (int c = 0; c < C; ++c) stf(out + c * 32, acc[c]);
}

template <int CMAX, bool WB, int C = 1>
CNUMA_INLINE void mk_vec_n(int64_t n, const FwdItem& a, const float* x, float* out) {
  if constexpr (C <= CMAX) {
    if (n == C) {
      mk_vec<C, WB>(a.b0, a.ks, a.K, x, a.xs, out);
      mk_vec<C, WB>(a.b1, a.ks, a.K, x, a.xs, out + 16);
      return;
    }
    mk_vec_n<CMAX, WB, C + 1>(n, a, x, out);
  }
}

template <int CMAX, bool WB>
CNUMA_INLINE void fwd_item_vec(const FwdItem& a) {
  alignas(64) float out[CMAX * 32];
  for (int64_t c0 = 0; c0 < a.m; c0 += CMAX) {
    const int64_t n = std::min<int64_t>(CMAX, a.m - c0);
    mk_vec_n<CMAX, WB>(n, a, static_cast<const float*>(a.x) + c0 * a.xs, out);
    for (int64_t c = 0; c < n; ++c) epilogue_vec(a, c0 + c, out + c * 32, false);
  }
}

template <bool WB>
CNUMA_INLINE void data8_vec(const DataArgs& a, const float* dy, float* out) {
  vf acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = vf{};
  for (int64_t b = 0; b < a.nblocks; ++b) {
    const vf d = ldf(dy + b * 16);
    if constexpr (WB) {
      const uint16_t* q = static_cast<const uint16_t*>(a.w) + a.block(b);
      for (int j = 0; j < 4; ++j) {
        const vu v = ldpairs(q + j * a.ks);
        acc[2 * j] += pair_lo(v) * d;
        acc[2 * j + 1] += pair_hi(v) * d;
      }
    } else {
      const float* q = static_cast<const float*>(a.w) + a.block(b);
      for (int j = 0; j < 8; ++j) acc[j] += ldf(q + j * a.ks) * d;
    }
  }
  for (int j = 0; j < 8; ++j) out[j] = hsum(acc[j]);
}

template <bool WB>
CNUMA_INLINE void grad_vec(const GradArgs& a) {
  for (int64_t c = a.c0; c < a.c1; c += 8) {
    vf acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = vf{};
    for (int64_t t = 0; t < a.m; ++t) {
      const vf d = ldf(a.dy(t));
      const float* x = a.x(t) + (c - a.c0);
      for (int j = 0; j < 8; ++j) acc[j] += d * x[j];
    }
    if constexpr (WB) {
      uint16_t* q = static_cast<uint16_t*>(a.g) + (c >> 1) * a.ks;
      for (int j = 0; j < 4; ++j) {
        const vu v = vbf16_bits(acc[2 * j]) | (vbf16_bits(acc[2 * j + 1]) << 16);
        std::memcpy(q + j * a.ks, &v, sizeof v);
      }
    } else {
      float* q = static_cast<float*>(a.g) + c * a.ks;
      for (int j = 0; j < 8; ++j) stf(q + j * a.ks, acc[j]);
    }
  }
}

}  // namespace experts
}  // namespace cnuma
