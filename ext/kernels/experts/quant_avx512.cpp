// The quantized expert kernels for AVX-512 (F, BW, VL): quant_generic.h with 16
// rows in one zmm register (vpmaddwd on 512 bits). Chosen only where the CPU
// has AVX-512 BW; quant_vnni.cpp is the same with VNNI's fused multiply-add.
#include "common/simd.h"

#if CNUMA_X86

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/experts/quant.h"
#include "kernels/experts/vector.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")

#include "kernels/experts/quant_generic.h"
#include "kernels/experts/quant_zmm.h"

namespace cnuma {
namespace experts {
namespace {

struct Avx512Ops : ZmmOps {
  static constexpr int kChains = 1;  // the chain is one add: no split needed
  static CNUMA_INLINE void madd(V& acc, const W& w, int32_t pair) {
    acc = _mm512_add_epi32(acc, _mm512_madd_epi16(w, _mm512_set1_epi32(pair)));
  }
};

}  // namespace

void qfwd_avx512(const QFwdArgs& a) { qgen::qfwd<Avx512Ops>(a); }
void qcols_avx512(const QColsArgs& a) { qgen::qcols(a); }
void qswiglu_avx512(const float* o, int64_t pairs, int64_t m, float* act, int64_t stride) {
  qgen::swiglu(o, pairs, m, act, stride);
}
void qquantize_avx512(const float* v, int64_t n, int64_t xb, int16_t* q, float* scale, int32_t* sum, int8_t* hi,
                      uint8_t* lo) {
  qgen::quantize(v, n, xb, q, scale, sum, hi, lo);
}

}  // namespace experts
}  // namespace cnuma

#pragma GCC pop_options

#endif  // CNUMA_X86
