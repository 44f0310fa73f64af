// Which quantized kernels a call uses, and running one item on them.
#include <cstdlib>
#include <cstring>

#include "common/cpu_features.h"
#include "kernels/experts/microkernels.h"
#include "kernels/experts/quant.h"

namespace cnuma {
namespace experts {

QPath choose_qpath() {
  QPath p;
  p.isa = active_isa();
#if CNUMA_X86
  if (p.isa == Isa::Avx512) {
    const CpuFeatures& f = cpu_features();
    p.vnni = f.avx512vnni;
    const char* env = std::getenv("COMPOSER_NUMA_AMX");
    const bool off = env != nullptr && std::strcmp(env, "0") == 0;
    p.amx = !off && f.amx_tile && f.amx_int8 && amx_permitted();
  }
#endif
  return p;
}

std::string quant_kernel_name() {
  const QPath p = choose_qpath();
  // No NEON quantized kernels yet: aarch64 runs the scalar ones.
  std::string s = p.isa == Isa::Avx512 || p.isa == Isa::Avx2 ? isa_name(p.isa) : "scalar";
  if (p.vnni) s += "+vnni";
  if (p.amx) s += "+amx";
  return s;
}

void run_qfwd(const QPath& p, const QFwdArgs& a) {
#if CNUMA_X86
  if (p.amx && a.m >= kQAmxMinTokens && a.pairs == 1 && a.xh != nullptr) return qfwd_amx(a);
  if (p.vnni) return qfwd_vnni(a);
  if (p.isa == Isa::Avx512) return qfwd_avx512(a);
  if (p.isa == Isa::Avx2) return qfwd_avx2(a);
#else
  (void)p;
#endif
  qfwd_scalar(a);
}

void run_qswiglu(const QPath& p, const float* o, int64_t pairs, int64_t m, float* act, int64_t stride) {
#if CNUMA_X86
  if (p.isa == Isa::Avx512) return qswiglu_avx512(o, pairs, m, act, stride);
  if (p.isa == Isa::Avx2) return qswiglu_avx2(o, pairs, m, act, stride);
#else
  (void)p;
#endif
  qswiglu_scalar(o, pairs, m, act, stride);
}

void run_qquantize(const QPath& p, const float* v, int64_t n, int64_t xb, int16_t* q, float* scale, int32_t* sum,
                   int8_t* hi, uint8_t* lo) {
#if CNUMA_X86
  if (p.isa == Isa::Avx512) return qquantize_avx512(v, n, xb, q, scale, sum, hi, lo);
  if (p.isa == Isa::Avx2) return qquantize_avx2(v, n, xb, q, scale, sum, hi, lo);
#else
  (void)p;
#endif
  qquantize_scalar(v, n, xb, q, scale, sum, hi, lo);
}

void run_qcols(const QPath& p, const QColsArgs& a) {
#if CNUMA_X86
  if (p.isa == Isa::Avx512) return qcols_avx512(a);
  if (p.isa == Isa::Avx2) return qcols_avx2(a);
#else
  (void)p;
#endif
  qcols_scalar(a);
}

}  // namespace experts
}  // namespace cnuma
