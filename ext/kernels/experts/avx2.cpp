// The expert kernels for AVX2 + FMA: generic.h compiled for that target.
#include "common/simd.h"

#if CNUMA_X86

#include "kernels/experts/generic.h"

namespace cnuma {
namespace experts {

CNUMA_TARGET_AVX2 void fwd_item_avx2(const FwdItem& a) {
  if (a.wbf16)
    fwd_item_vec<4, true>(a);
  else
    fwd_item_vec<4, false>(a);
}

CNUMA_TARGET_AVX2 void data8_avx2(const DataArgs& a, const float* dy, float* out) {
  a.wbf16 ? data8_vec<true>(a, dy, out) : data8_vec<false>(a, dy, out);
}
CNUMA_TARGET_AVX2 void grad_avx2(const GradArgs& a) { a.wbf16 ? grad_vec<true>(a) : grad_vec<false>(a); }

}  // namespace experts
}  // namespace cnuma

#endif  // CNUMA_X86
