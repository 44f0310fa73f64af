// The quantized expert kernels for AVX-512 VNNI: quant_avx512.cpp with the
// multiply and the add fused (vpdpwssd: int16 pairs into 32-bit lanes, exact,
// no saturation). Chosen only where the CPU reports AVX512_VNNI.
#include "common/simd.h"

#if CNUMA_X86

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/experts/quant.h"
#include "kernels/experts/vector.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")

#include "kernels/experts/quant_generic.h"
#include "kernels/experts/quant_zmm.h"

namespace cnuma {
namespace experts {
namespace {

struct VnniOps : ZmmOps {
  static constexpr int kChains = 8;  // vpdpwssd's latency is ~5 cycles: keep 8 sums in flight
  static CNUMA_INLINE void madd(V& acc, const W& w, int32_t pair) {
    acc = _mm512_dpwssd_epi32(acc, w, _mm512_set1_epi32(pair));
  }
};

}  // namespace

void qfwd_vnni(const QFwdArgs& a) { qgen::qfwd<VnniOps>(a); }

}  // namespace experts
}  // namespace cnuma

#pragma GCC pop_options

#endif  // CNUMA_X86
