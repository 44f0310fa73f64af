// AdamW on NEON (aarch64), built with -ffp-contract=off like adamw.cpp: the
// only fused multiply-adds are the explicit vfmaq_f32 where the scalar update
// calls std::fma (same operands in the same places), sqrt and division are
// correctly rounded on both, and bf16 rounding is common/bf16_neon.h's integer
// form of f32_to_bf16. So every lane gives the scalar path's bits, and the
// tail (fewer than 8 elements) runs the same vector code on a staged copy.
#include "kernels/adamw_neon.h"

#include "common/simd.h"

#if CNUMA_ARM64

#include <cmath>
#include <cstring>

#include "common/bf16_neon.h"

namespace cnuma {
namespace {

struct Consts {
  float32x4_t factor, decay, w, b2, omb2, bc2, eps, nss;
  bool small;
};

// Two halves of 8 elements.
struct F8 {
  float32x4_t lo, hi;
};

template <DType D>
CNUMA_INLINE F8 ld8(const void* p, int64_t i) {
  if constexpr (D == DType::F32) {
    const float* f = static_cast<const float*>(p) + i;
    return {vld1q_f32(f), vld1q_f32(f + 4)};
  } else {
    const uint16x8_t h = vld1q_u16(static_cast<const uint16_t*>(p) + i);
    return {bf16x8_lo_to_f32(h), bf16x8_hi_to_f32(h)};
  }
}

template <DType D>
CNUMA_INLINE void st8(void* p, int64_t i, const F8& x) {
  if constexpr (D == DType::F32) {
    float* f = static_cast<float*>(p) + i;
    vst1q_f32(f, x.lo);
    vst1q_f32(f + 4, x.hi);
  } else {
    vst1q_u16(static_cast<uint16_t*>(p) + i, f32x8_to_bf16(x.lo, x.hi));
  }
}

// update1 of adamw.cpp, lane-wise, in the same order of operations.
CNUMA_INLINE void lanes(const Consts& c, float32x4_t graw, float32x4_t& p, float32x4_t& m, float32x4_t& v) {
  const float32x4_t g = vmulq_f32(graw, c.factor);
  p = vmulq_f32(p, c.decay);
  // torch's lerp: fma(w, g - m, m) for |w| < 0.5, else fma(w - 1, g - m, g)
  m = vfmaq_f32(c.small ? m : g, c.w, vsubq_f32(g, m));
  // fma(omb2 * g, g, v * beta2)
  v = vfmaq_f32(vmulq_f32(v, c.b2), vmulq_f32(c.omb2, g), g);
  const float32x4_t denom = vaddq_f32(vdivq_f32(vsqrtq_f32(v), c.bc2), c.eps);
  p = vaddq_f32(p, vdivq_f32(vmulq_f32(c.nss, m), denom));
}

// The 8 elements at i of the given arrays (the job's, or a staged tail).
template <DType P, DType G, DType S, bool M>
CNUMA_INLINE void step8(const Consts& c, const void* grad, float* master, void* param, void* exp_avg,
                        void* exp_avg_sq, int64_t i) {
  const F8 g = ld8<G>(grad, i);
  F8 p = M ? F8{vld1q_f32(master + i), vld1q_f32(master + i + 4)} : ld8<P>(param, i);
  F8 m = ld8<S>(exp_avg, i);
  F8 v = ld8<S>(exp_avg_sq, i);
  lanes(c, g.lo, p.lo, m.lo, v.lo);
  lanes(c, g.hi, p.hi, m.hi, v.hi);
  if (M) {
    vst1q_f32(master + i, p.lo);
    vst1q_f32(master + i + 4, p.hi);
  }
  st8<P>(param, i, p);
  st8<S>(exp_avg, i, m);
  st8<S>(exp_avg_sq, i, v);
}

template <DType D>
constexpr size_t esize() {
  return D == DType::F32 ? 4 : 2;
}

template <DType P, DType G, DType S, bool M>
void run_neon(const AdamWJob& j, int64_t b, int64_t e) {
  const AdamWScalars& s = j.s;
  Consts c;
  c.small = std::fabs(s.lerp_weight) < 0.5f;
  c.factor = vdupq_n_f32(s.grad_factor);
  c.decay = vdupq_n_f32(s.decay);
  c.w = vdupq_n_f32(c.small ? s.lerp_weight : s.lerp_weight - 1.0f);
  c.b2 = vdupq_n_f32(s.beta2);
  c.omb2 = vdupq_n_f32(s.one_minus_beta2);
  c.bc2 = vdupq_n_f32(s.bias_correction2_sqrt);
  c.eps = vdupq_n_f32(s.eps);
  c.nss = vdupq_n_f32(s.neg_step_size);
  int64_t i = b;
  for (; i + 8 <= e; i += 8) step8<P, G, S, M>(c, j.grad, j.master, j.param, j.exp_avg, j.exp_avg_sq, i);
  const int64_t left = e - i;
  if (left == 0) return;
  // Stage the last elements into zeroed 8-lane copies; the padding lanes compute
  // harmless values (v = 0 gives denom = eps) that are never copied back.
  alignas(16) unsigned char g8[32] = {}, p8[32] = {}, m8[32] = {}, v8[32] = {};
  alignas(16) float w8[8] = {};
  std::memcpy(g8, static_cast<const char*>(j.grad) + i * esize<G>(), left * esize<G>());
  if (M) std::memcpy(w8, j.master + i, left * 4);
  else std::memcpy(p8, static_cast<const char*>(j.param) + i * esize<P>(), left * esize<P>());
  std::memcpy(m8, static_cast<const char*>(j.exp_avg) + i * esize<S>(), left * esize<S>());
  std::memcpy(v8, static_cast<const char*>(j.exp_avg_sq) + i * esize<S>(), left * esize<S>());
  step8<P, G, S, M>(c, g8, w8, p8, m8, v8, 0);
  if (M) std::memcpy(j.master + i, w8, left * 4);
  std::memcpy(static_cast<char*>(j.param) + i * esize<P>(), p8, left * esize<P>());
  std::memcpy(static_cast<char*>(j.exp_avg) + i * esize<S>(), m8, left * esize<S>());
  std::memcpy(static_cast<char*>(j.exp_avg_sq) + i * esize<S>(), v8, left * esize<S>());
}

template <DType P, DType G, DType S>
AdamWRangeFn pick_m(bool master) {
  return master ? &run_neon<P, G, S, true> : &run_neon<P, G, S, false>;
}

template <DType P, DType G>
AdamWRangeFn pick_s(DType s, bool master) {
  return s == DType::F32 ? pick_m<P, G, DType::F32>(master) : pick_m<P, G, DType::BF16>(master);
}

template <DType P>
AdamWRangeFn pick_g(DType g, DType s, bool master) {
  return g == DType::F32 ? pick_s<P, DType::F32>(s, master) : pick_s<P, DType::BF16>(s, master);
}

}  // namespace

AdamWRangeFn adamw_neon_kernel(DType param, DType grad, DType state, bool master) {
  return param == DType::F32 ? pick_g<DType::F32>(grad, state, master) : pick_g<DType::BF16>(grad, state, master);
}

}  // namespace cnuma

#endif  // CNUMA_ARM64
