// The scalar expert kernels: the reference every vector path is tested
// against, and the path on CPUs (and architectures) without AVX2.
#include <cstring>

#include "common/bf16.h"
#include "kernels/experts/microkernels.h"
#include "kernels/experts/vector.h"

namespace cnuma {
namespace experts {
namespace {

void epilogue_scalar(const FwdItem& a, int64_t row, const float* o, bool xbf16) {
  if (a.down) {
    std::memcpy(static_cast<float*>(a.dst) + row * a.dst_stride, o, 32 * sizeof(float));
    return;
  }
  for (int r = 0; r < 16; ++r) {
    const float g = o[r], u = o[16 + r];
    float act = g * sigmoid(g) * u;
    if (a.round) act = round_bf16(act);
    if (xbf16)
      static_cast<uint16_t*>(a.dst)[row * a.dst_stride + r] = f32_to_bf16(act);
    else
      static_cast<float*>(a.dst)[row * a.dst_stride + r] = act;
    if (a.save_g != nullptr) {
      a.save_g[row * a.save_stride + r] = g;
      a.save_u[row * a.save_stride + r] = u;
    }
  }
}

}  // namespace

void fwd_item_scalar(const FwdItem& a) {
  float o[32];
  for (int64_t c = 0; c < a.m; ++c) {
    const float* x = static_cast<const float*>(a.x) + c * a.xs;
    for (int half = 0; half < 2; ++half) {
      const void* b = half ? a.b1 : a.b0;
      for (int r = 0; r < 16; ++r) {
        float acc = 0.0f;
        if (a.wbf16) {
          const uint16_t* w = static_cast<const uint16_t*>(b);
          for (int64_t k = 0; k < a.K; ++k) acc += bf16_to_f32(w[(k >> 1) * a.ks + r * 2 + (k & 1)]) * x[k];
        } else {
          const float* w = static_cast<const float*>(b);
          for (int64_t k = 0; k < a.K; ++k) acc += w[k * a.ks + r] * x[k];
        }
        o[half * 16 + r] = acc;
      }
    }
    epilogue_scalar(a, c, o, false);
  }
}

void data8_scalar(const DataArgs& a, const float* dy, float* out) {
  for (int j = 0; j < 8; ++j) {
    float s = 0.0f;
    for (int64_t b = 0; b < a.nblocks; ++b) {
      float part = 0.0f;
      for (int r = 0; r < 16; ++r) {
        const float w =
            a.wbf16 ? bf16_to_f32(static_cast<const uint16_t*>(a.w)[a.block(b) + (j >> 1) * a.ks + r * 2 + (j & 1)])
                    : static_cast<const float*>(a.w)[a.block(b) + j * a.ks + r];
        part += w * dy[b * 16 + r];
      }
      s += part;
    }
    out[j] = s;
  }
}

void grad_scalar(const GradArgs& a) {
  for (int64_t c = a.c0; c < a.c1; ++c) {
    for (int r = 0; r < 16; ++r) {
      float s = 0.0f;
      for (int64_t t = 0; t < a.m; ++t) s += a.dy(t)[r] * a.x(t)[c - a.c0];
      if (a.wbf16)
        static_cast<uint16_t*>(a.g)[(c >> 1) * a.ks + r * 2 + (c & 1)] = f32_to_bf16(s);
      else
        static_cast<float*>(a.g)[c * a.ks + r] = s;
    }
  }
}

}  // namespace experts
}  // namespace cnuma
