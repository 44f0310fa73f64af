// The expert kernels on aarch64: generic.h compiled for NEON (the baseline
// ISA, so its 16-lane vectors become four 128-bit registers each), and the
// forward item on BF16 dot products (BFDOT) for bf16 layers on CPUs with
// FEAT_BF16, where bf16 weights are otherwise widened to fp32 lane by lane.
//
// Summation order is the x86 paths': every output row accumulates over k in
// order within one lane (a pair of k per BFDOT, as AVX-512 BF16 does), and an
// item covers all tokens of one expert, so the split over threads never changes
// a bit. BFMMLA is not used: the packed layout (16 rows x 2 k per 64-byte
// k-step) is exactly BFDOT's operand, while BFMMLA's 2x4 tiles would need a
// zip per load for the same 16 multiply-adds per instruction.
#include "common/simd.h"

#if CNUMA_ARM64

#include <algorithm>
#include <cstring>

#include "kernels/experts/generic.h"

namespace cnuma {
namespace experts {

void fwd_item_neon(const FwdItem& a) {
  if (a.wbf16)
    fwd_item_vec<4, true>(a);
  else
    fwd_item_vec<4, false>(a);
}

void data8_neon(const DataArgs& a, const float* dy, float* out) {
  a.wbf16 ? data8_vec<true>(a, dy, out) : data8_vec<false>(a, dy, out);
}

void grad_neon(const GradArgs& a) { a.wbf16 ? grad_vec<true>(a) : grad_vec<false>(a); }

namespace {

// Tokens per pass over the weights: 2 blocks x 4 registers x 3 tokens = 24
// accumulators, plus two weight registers and the tokens' inputs.
constexpr int kDotMax = 3;

// acc[c][j] += the 4 rows 4j..4j+3 of one block (a k-pair each) times the
// k-pair `Lane` of token c's inputs.
template <int C, int Lane>
CNUMA_TARGET_NEON_BF16 CNUMA_INLINE void bfdot_step(const uint16_t* w0, const uint16_t* w1, const bfloat16x8_t* xv,
                                                   float32x4_t (*a0)[4], float32x4_t (*a1)[4]) {
  for (int j = 0; j < 4; ++j) {
    const bfloat16x8_t v0 = vreinterpretq_bf16_u16(vld1q_u16(w0 + 8 * j));
    const bfloat16x8_t v1 = vreinterpretq_bf16_u16(vld1q_u16(w1 + 8 * j));
    for (int c = 0; c < C; ++c) {
      a0[c][j] = vbfdotq_laneq_f32(a0[c][j], v0, xv[c], Lane);
      a1[c][j] = vbfdotq_laneq_f32(a1[c][j], v1, xv[c], Lane);
    }
  }
}

// Both blocks times C bf16 tokens; out[c * 32 + row]. Each 16-byte weight load
// feeds C dot products, so for few tokens the weights stream from memory once.
template <int C>
CNUMA_TARGET_NEON_BF16 inline void mk_bfdot(const uint16_t* b0, const uint16_t* b1, int64_t ks, int64_t K,
                                            const uint16_t* x, int64_t xs, float* out) {
  float32x4_t a0[C][4], a1[C][4];
  for (int c = 0; c < C; ++c)
    for (int j = 0; j < 4; ++j) a0[c][j] = a1[c][j] = vdupq_n_f32(0.0f);
  const int64_t pairs = K / 2;
  int64_t kp = 0;
  for (; kp + 4 <= pairs; kp += 4) {  // four k-pairs of each token in one register
    bfloat16x8_t xv[C];
    for (int c = 0; c < C; ++c) xv[c] = vreinterpretq_bf16_u16(vld1q_u16(x + c * xs + 2 * kp));
    bfdot_step<C, 0>(b0 + kp * ks, b1 + kp * ks, xv, a0, a1);
    bfdot_step<C, 1>(b0 + (kp + 1) * ks, b1 + (kp + 1) * ks, xv, a0, a1);
    bfdot_step<C, 2>(b0 + (kp + 2) * ks, b1 + (kp + 2) * ks, xv, a0, a1);
    bfdot_step<C, 3>(b0 + (kp + 3) * ks, b1 + (kp + 3) * ks, xv, a0, a1);
  }
  for (; kp < pairs; ++kp) {  // K not a multiple of 8 (the layouts pad to 32: not reached)
    bfloat16x8_t xv[C];
    for (int c = 0; c < C; ++c) {
      uint32_t pair;
      std::memcpy(&pair, x + c * xs + 2 * kp, 4);
      xv[c] = vreinterpretq_bf16_u32(vdupq_n_u32(pair));
    }
    bfdot_step<C, 0>(b0 + kp * ks, b1 + kp * ks, xv, a0, a1);
  }
  for (int c = 0; c < C; ++c)
    for (int j = 0; j < 4; ++j) {
      vst1q_f32(out + c * 32 + 4 * j, a0[c][j]);
      vst1q_f32(out + c * 32 + 16 + 4 * j, a1[c][j]);
    }
}

template <int C = 1>
CNUMA_TARGET_NEON_BF16 inline void mk_bfdot_n(int64_t n, const FwdItem& a, const uint16_t* x, float* out) {
  if constexpr (C <= kDotMax) {
    if (n == C) {
      mk_bfdot<C>(static_cast<const uint16_t*>(a.b0), static_cast<const uint16_t*>(a.b1), a.ks, a.K, x, a.xs, out);
      return;
    }
    mk_bfdot_n<C + 1>(n, a, x, out);
  }
}

}  // namespace

CNUMA_TARGET_NEON_BF16 void fwd_item_neon_bf16(const FwdItem& a) {
  alignas(64) float out[kDotMax * 32];
  for (int64_t c0 = 0; c0 < a.m; c0 += kDotMax) {
    const int64_t n = std::min<int64_t>(kDotMax, a.m - c0);
    mk_bfdot_n(n, a, static_cast<const uint16_t*>(a.x) + c0 * a.xs, out);
    for (int64_t c = 0; c < n; ++c) epilogue_vec(a, c0 + c, out + c * 32, true);
  }
}

}  // namespace experts
}  // namespace cnuma

#endif  // CNUMA_ARM64
