// The quantized expert kernels without SIMD intrinsics: the reference the
// vector paths must match bit for bit, and the path on CPUs without AVX2.
#include "kernels/experts/quant_generic.h"

namespace cnuma {
namespace experts {
namespace {

struct ScalarOps {
  static constexpr int C = 4;
  static constexpr int kChains = 1;
  static constexpr int kStreams = 1;
  struct V {
    int32_t v[16];
  };
  struct W {
    int16_t v[32];  // [16 rows][2 k]
  };
  static V zero() { return V{}; }
  static V add(const V& a, const V& b) {
    V s;
    for (int r = 0; r < 16; ++r) s.v[r] = a.v[r] + b.v[r];
    return s;
  }
  static W load8(const uint8_t* p) {
    W w;
    for (int i = 0; i < 32; ++i) w.v[i] = static_cast<int8_t>(p[i]);
    return w;
  }
  static void load4(const uint8_t* p, W& lo, W& hi) {
    for (int i = 0; i < 32; ++i) {
      lo.v[i] = static_cast<int16_t>(p[i] & 15);
      hi.v[i] = static_cast<int16_t>(p[i] >> 4);
    }
  }
  static void madd(V& acc, const W& w, int32_t pair) {
    const int32_t x0 = static_cast<int16_t>(pair & 0xffff), x1 = static_cast<int16_t>(pair >> 16);
    for (int r = 0; r < 16; ++r) acc.v[r] += w.v[2 * r] * x0 + w.v[2 * r + 1] * x1;
  }
  static void update(float* out, const V& acc, int32_t comp, float sx, const float* sw, bool grouped) {
    for (int r = 0; r < 16; ++r) {
      const float s = grouped ? sx * sw[r] : sx;
      out[r] = out[r] + static_cast<float>(acc.v[r] - comp) * s;
    }
  }
};

}  // namespace

void qfwd_scalar(const QFwdArgs& a) { qgen::qfwd<ScalarOps>(a); }
void qcols_scalar(const QColsArgs& a) { qgen::qcols(a); }
void qswiglu_scalar(const float* o, int64_t pairs, int64_t m, float* act, int64_t stride) {
  qgen::swiglu(o, pairs, m, act, stride);
}
void qquantize_scalar(const float* v, int64_t n, int64_t xb, int16_t* q, float* scale, int32_t* sum, int8_t* hi,
                      uint8_t* lo) {
  qgen::quantize(v, n, xb, q, scale, sum, hi, lo);
}

}  // namespace experts
}  // namespace cnuma
