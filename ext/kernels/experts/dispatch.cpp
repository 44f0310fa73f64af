// Which kernels a call uses, and running one work item on them.
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "common/cpu_features.h"
#include "kernels/experts/microkernels.h"

namespace cnuma {
namespace experts {

#if CNUMA_X86
bool amx_permitted() {
  // Linux hands out the AMX tile state only on request, once per process; the
  // answer is a fact about this process, so it is asked once.
  static const bool ok = [] {
    constexpr long kReqPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqPerm, kXtileData) == 0;
  }();
  return ok;
}
#endif


Path choose_path(DType dtype) {
  Path p;
  p.isa = active_isa();
#if CNUMA_X86
  const CpuFeatures& f = cpu_features();
  if (p.isa == Isa::Avx512 && dtype == DType::BF16 && f.avx512bf16) {
    p.dot = true;
    const char* env = std::getenv("COMPOSER_NUMA_AMX");
    const bool off = env != nullptr && std::strcmp(env, "0") == 0;
    p.amx = !off && f.amx_tile && f.amx_bf16 && amx_permitted();
    p.streams = kStreams;
  }
#elif CNUMA_ARM64
  p.dot = p.isa == Isa::Neon && dtype == DType::BF16 && cpu_features().bf16;
#else
  (void)dtype;
#endif
  return p;
}

std::string kernel_name(DType dtype) {
  const Path p = choose_path(dtype);
  std::string s = isa_name(p.isa);
  if (p.dot) s += "+bf16dot";
  if (p.amx) s += "+amx";
  return s;
}

void run_fwd_item(const Path& p, const FwdItem& a) {
#if CNUMA_X86
  if (p.amx) return fwd_item_amx(a);
  if (p.dot) return fwd_item_dot(a);
  if (p.isa == Isa::Avx512) return fwd_item_avx512(a);
  if (p.isa == Isa::Avx2) return fwd_item_avx2(a);
#elif CNUMA_ARM64
  if (p.dot) return fwd_item_neon_bf16(a);
  if (p.isa == Isa::Neon) return fwd_item_neon(a);
#else
  (void)p;
#endif
  fwd_item_scalar(a);
}

void run_data8(Isa isa, const DataArgs& a, const float* dy, float* out) {
#if CNUMA_X86
  if (isa == Isa::Avx512) return data8_avx512(a, dy, out);
  if (isa == Isa::Avx2) return data8_avx2(a, dy, out);
#elif CNUMA_ARM64
  if (isa == Isa::Neon) return data8_neon(a, dy, out);
#else
  (void)isa;
#endif
  data8_scalar(a, dy, out);
}

void run_grad(Isa isa, const GradArgs& a) {
#if CNUMA_X86
  if (isa == Isa::Avx512) return grad_avx512(a);
  if (isa == Isa::Avx2) return grad_avx2(a);
#elif CNUMA_ARM64
  if (isa == Isa::Neon) return grad_neon(a);
#else
  (void)isa;
#endif
  grad_scalar(a);
}

}  // namespace experts
}  // namespace cnuma
