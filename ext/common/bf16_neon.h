// bfloat16 <-> float32 on NEON vectors, by the rule of common/bf16.h: round to
// nearest, ties to even, denormals kept, every NaN -> the quiet NaN 0x7fc0;
// widening is exact. Integer arithmetic rather than BFCVTN, which is optional
// (FEAT_BF16) and would not give 0x7fc0 for every NaN. Bit-identical to
// f32_to_bf16 / bf16_to_f32 lane by lane.
#pragma once

#include "common/bf16.h"
#include "common/simd.h"

#if CNUMA_ARM64

namespace cnuma {

// 4 floats -> 4 bf16. vaddhn takes the high halves of u + (0x7fff + lsb), which
// is the rounded bf16 (the carry into bit 16 and past the exponent is wanted).
CNUMA_INLINE uint16x4_t f32x4_to_bf16(float32x4_t x) {
  const uint32x4_t u = vreinterpretq_u32_f32(x);
  const uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
  const uint16x4_t r = vaddhn_u32(u, vaddq_u32(lsb, vdupq_n_u32(0x7fff)));
  const uint16x4_t nan = vmovn_u32(vmvnq_u32(vceqq_f32(x, x)));  // all ones in NaN lanes
  return vbsl_u16(nan, vdup_n_u16(kBf16QuietNaN), r);
}

// 8 floats (lo, hi) -> 8 bf16.
CNUMA_INLINE uint16x8_t f32x8_to_bf16(float32x4_t lo, float32x4_t hi) {
  return vcombine_u16(f32x4_to_bf16(lo), f32x4_to_bf16(hi));
}

// 4 bf16 -> 4 floats.
CNUMA_INLINE float32x4_t bf16x4_to_f32(uint16x4_t h) { return vreinterpretq_f32_u32(vshll_n_u16(h, 16)); }

// The low / high 4 of 8 bf16 -> floats.
CNUMA_INLINE float32x4_t bf16x8_lo_to_f32(uint16x8_t h) { return bf16x4_to_f32(vget_low_u16(h)); }
CNUMA_INLINE float32x4_t bf16x8_hi_to_f32(uint16x8_t h) { return bf16x4_to_f32(vget_high_u16(h)); }

}  // namespace cnuma

#endif  // CNUMA_ARM64
