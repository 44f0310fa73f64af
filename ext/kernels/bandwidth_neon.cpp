// NEON passes of the bandwidth probe. read and copy walk their chunk as four
// interleaved sub-streams (one sequential stream per core is bounded by memory
// latency, not bandwidth), 64 bytes (a cache line) per step; triad and adamw
// stream like the optimizer kernel: 8 floats per step, no software prefetch
// (the NEON AdamW kernel has none either: Neoverse's prefetchers follow these
// streams), so the roofline measures the access pattern the optimizer runs.
#include "kernels/bandwidth_neon.h"

#include "common/simd.h"

#if CNUMA_ARM64

namespace cnuma {
namespace {

template <int Kernel>
void pass_neon(float* const* a, int64_t b, int64_t e, uint64_t* sink) {
  float* __restrict x = a[0];
  float* __restrict y = a[1];
  float* __restrict z = a[2];
  float* __restrict w = a[3];
  if constexpr (Kernel <= 1) {
    uint32x4_t acc = vdupq_n_u32(0);
    const int64_t q = (e - b) / 64 * 16;  // four 16-aligned quarters, then a tail
    auto line = [&](int64_t at) {
      for (int l = 0; l < 16; l += 4) {
        const float32x4_t v = vld1q_f32(x + at + l);
        if constexpr (Kernel == 0) acc = vaddq_u32(acc, vreinterpretq_u32_f32(v));
        else vst1q_f32(y + at + l, v);
      }
    };
    for (int64_t i = 0; i < q; i += 16)
      for (int s = 0; s < 4; ++s) line(b + s * q + i);
    int64_t i = b + 4 * q;
    for (; i + 16 <= e; i += 16) line(i);
    for (; i < e; ++i) {
      if constexpr (Kernel == 0) acc = vaddq_u32(acc, vreinterpretq_u32_f32(vdupq_n_f32(x[i])));
      else y[i] = x[i];
    }
    *sink += vaddvq_u32(acc);
    return;
  }
  const float32x4_t half = vdupq_n_f32(0.5f), three = vdupq_n_f32(3.0f);
  int64_t i = b;
  for (; i + 8 <= e; i += 8) {
    for (int l = 0; l < 8; l += 4) {
      if constexpr (Kernel == 2) {
        vst1q_f32(x + i + l, vfmaq_f32(vld1q_f32(y + i + l), three, vld1q_f32(z + i + l)));
      } else {
        const float32x4_t g = vmulq_f32(vld1q_f32(x + i + l), half);
        vst1q_f32(y + i + l, vaddq_f32(vld1q_f32(y + i + l), g));
        vst1q_f32(z + i + l, vaddq_f32(vld1q_f32(z + i + l), g));
        vst1q_f32(w + i + l, vaddq_f32(vld1q_f32(w + i + l), g));
      }
    }
  }
  for (; i < e; ++i) {
    if constexpr (Kernel == 2) {
      x[i] = y[i] + 3.0f * z[i];
    } else {
      const float g = x[i] * 0.5f;
      y[i] += g;
      z[i] += g;
      w[i] += g;
    }
  }
}

}  // namespace

BandwidthPassFn bandwidth_neon_pass(int kernel) {
  switch (kernel) {
    case 0: return &pass_neon<0>;
    case 1: return &pass_neon<1>;
    case 2: return &pass_neon<2>;
    default: return &pass_neon<3>;
  }
}

}  // namespace cnuma

#endif  // CNUMA_ARM64
