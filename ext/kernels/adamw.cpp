// Built with -ffp-contract=off: the only fused multiply-adds are the explicit
// ones where torch's CPU kernels use them (lerp, addcmul), so every path rounds
// identically and thread count, SIMD width and tail handling never change a bit.
#include "kernels/adamw.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>

#include "common/bf16.h"
#include "common/cpu_features.h"
#if CNUMA_ARM64
#include "kernels/adamw_neon.h"
#endif

namespace cnuma {
namespace {

template <DType D>
inline float load1(const void* p, int64_t i) {
  if constexpr (D == DType::F32) return static_cast<const float*>(p)[i];
  else return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

template <DType D>
inline void store1(void* p, int64_t i, float x) {
  if constexpr (D == DType::F32) static_cast<float*>(p)[i] = x;
  else static_cast<uint16_t*>(p)[i] = f32_to_bf16(x);
}

// The reference element update; the SIMD bodies below are this, lane-wise.
template <DType P, DType G, DType S, bool M>
inline void update1(const AdamWJob& j, int64_t i, bool small_weight) {
  const AdamWScalars& s = j.s;
  const float g = load1<G>(j.grad, i) * s.grad_factor;
  float p = M ? j.master[i] : load1<P>(j.param, i);
  float m = load1<S>(j.exp_avg, i);
  float v = load1<S>(j.exp_avg_sq, i);
  p = p * s.decay;
  // torch's lerp: start + w * (end - start) for |w| < 0.5, else end - (1 - w) * (end - start)
  m = small_weight ? std::fma(s.lerp_weight, g - m, m) : std::fma(s.lerp_weight - 1.0f, g - m, g);
  // torch's addcmul after mul_: (1 - beta2) * g * g + beta2 * v, one rounding for the sum
  v = std::fma(s.one_minus_beta2 * g, g, v * s.beta2);
  const float denom = std::sqrt(v) / s.bias_correction2_sqrt + s.eps;
  p = p + s.neg_step_size * m / denom;
  if (M) j.master[i] = p;
  store1<P>(j.param, i, p);
  store1<S>(j.exp_avg, i, m);
  store1<S>(j.exp_avg_sq, i, v);
}

template <DType P, DType G, DType S, bool M>
void run_scalar(const AdamWJob& j, int64_t b, int64_t e) {
  const bool small = std::fabs(j.s.lerp_weight) < 0.5f;
  for (int64_t i = b; i < e; ++i) update1<P, G, S, M>(j, i, small);
}

#if CNUMA_X86

// Software prefetch distance, in elements, for CPUs that get it (prefetch_wanted).
// The hardware prefetchers alone left ~15 % of the bandwidth unused on Sapphire
// Rapids with four read streams; 512-1024 elements ahead measured best.
// Prefetches never fault and never change a result.
constexpr int64_t kPrefetch = 512;

template <DType D>
inline const char* ahead(const void* p, int64_t i) {
  return static_cast<const char*>(p) + (i + kPrefetch) * (D == DType::F32 ? 4 : 2);
}

// ---------------------------------------------------------------- AVX2 ----

CNUMA_TARGET_AVX2 inline __m256 ld8(const void* p, int64_t i, DType d) {
  if (d == DType::F32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  return bf16x8_to_f32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
}

CNUMA_TARGET_AVX2 inline void st8(void* p, int64_t i, __m256 x, DType d) {
  if (d == DType::F32) {
    _mm256_storeu_ps(static_cast<float*>(p) + i, x);
    return;
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), f32x8_to_bf16(x));
}

// All four streams bf16 (torch fused's layout with bf16 parameters): 16 elements
// at a time as the even and odd halves of 32-bit words, so widening is a shift or
// a mask and narrowing an OR. The 8-wide conversions (vpmovzxwd, vpackusdw,
// vpermq) made this layout shuffle-bound: 1.24 ns per element in L1 on Zen 3,
// twice the fp32 kernel. The rounding is f32x8_to_bf16's, word for word.
CNUMA_TARGET_AVX2 inline void bf16x16_split(const uint16_t* p, __m256& even, __m256& odd) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

// x rounded to bf16 (nearest even, NaN -> kBf16QuietNaN) in the upper half of each word.
CNUMA_TARGET_AVX2 inline __m256i bf16_upper(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(kBf16QuietNaN << 16), _mm256_castps_si256(nan));
}

CNUMA_TARGET_AVX2 inline void bf16x16_join(uint16_t* p, __m256 even, __m256 odd) {
  const __m256i lo = _mm256_srli_epi32(bf16_upper(even), 16);
  const __m256i hi = _mm256_and_si256(bf16_upper(odd), _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_or_si256(lo, hi));
}

// The per-step constants of the AVX2 loops, broadcast once.
struct Avx2Consts {
  __m256 factor, decay, w, b2, omb2, bc2, eps, nss;
};

// update1's arithmetic on 8 lanes; `small` selects the lerp form as update1 does.
CNUMA_TARGET_AVX2 inline void update8(const Avx2Consts& c, bool small, __m256 graw, __m256& p, __m256& m,
                                      __m256& v) {
  const __m256 g = _mm256_mul_ps(graw, c.factor);
  p = _mm256_mul_ps(p, c.decay);
  m = _mm256_fmadd_ps(c.w, _mm256_sub_ps(g, m), small ? m : g);
  v = _mm256_fmadd_ps(_mm256_mul_ps(c.omb2, g), g, _mm256_mul_ps(v, c.b2));
  const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), c.bc2), c.eps);
  p = _mm256_add_ps(p, _mm256_div_ps(_mm256_mul_ps(c.nss, m), denom));
}

template <DType P, DType G, DType S, bool M, bool PF>
CNUMA_TARGET_AVX2 void run_avx2(const AdamWJob& j, int64_t b, int64_t e) {
  const AdamWScalars& s = j.s;
  const bool small = std::fabs(s.lerp_weight) < 0.5f;
  const __m256 factor = _mm256_set1_ps(s.grad_factor), decay = _mm256_set1_ps(s.decay);
  const __m256 w = _mm256_set1_ps(small ? s.lerp_weight : s.lerp_weight - 1.0f);
  const __m256 b2 = _mm256_set1_ps(s.beta2), omb2 = _mm256_set1_ps(s.one_minus_beta2);
  const __m256 bc2 = _mm256_set1_ps(s.bias_correction2_sqrt), eps = _mm256_set1_ps(s.eps);
  const __m256 nss = _mm256_set1_ps(s.neg_step_size);
  uint16_t* const p16 = static_cast<uint16_t*>(j.param);
  const bool stream = M && P == DType::BF16 && (reinterpret_cast<uintptr_t>(p16 + b) & 15) == 0;
  int64_t i = b;
  if constexpr (P == DType::BF16 && G == DType::BF16 && S == DType::BF16 && !M) {
    const Avx2Consts c{factor, decay, w, b2, omb2, bc2, eps, nss};
    const uint16_t* const g16 = static_cast<const uint16_t*>(j.grad);
    uint16_t* const m16 = static_cast<uint16_t*>(j.exp_avg);
    uint16_t* const v16 = static_cast<uint16_t*>(j.exp_avg_sq);
    for (; i + 16 <= e; i += 16) {
      if constexpr (PF) {
        _mm_prefetch(ahead<G>(j.grad, i), _MM_HINT_T0);
        _mm_prefetch(ahead<P>(j.param, i), _MM_HINT_T0);
        _mm_prefetch(ahead<S>(j.exp_avg, i), _MM_HINT_T0);
        _mm_prefetch(ahead<S>(j.exp_avg_sq, i), _MM_HINT_T0);
      }
      __m256 g0, g1, p0, p1, m0, m1, v0, v1;
      bf16x16_split(g16 + i, g0, g1);
      bf16x16_split(p16 + i, p0, p1);
      bf16x16_split(m16 + i, m0, m1);
      bf16x16_split(v16 + i, v0, v1);
      update8(c, small, g0, p0, m0, v0);
      update8(c, small, g1, p1, m1, v1);
      bf16x16_join(p16 + i, p0, p1);
      bf16x16_join(m16 + i, m0, m1);
      bf16x16_join(v16 + i, v0, v1);
    }
  }
  for (; i + 8 <= e; i += 8) {
    if constexpr (PF) {
      _mm_prefetch(ahead<G>(j.grad, i), _MM_HINT_T0);
      _mm_prefetch(M ? ahead<DType::F32>(j.master, i) : ahead<P>(j.param, i), _MM_HINT_T0);
      _mm_prefetch(ahead<S>(j.exp_avg, i), _MM_HINT_T0);
      _mm_prefetch(ahead<S>(j.exp_avg_sq, i), _MM_HINT_T0);
    }
    const __m256 g = _mm256_mul_ps(ld8(j.grad, i, G), factor);
    __m256 p = M ? _mm256_loadu_ps(j.master + i) : ld8(j.param, i, P);
    __m256 m = ld8(j.exp_avg, i, S);
    __m256 v = ld8(j.exp_avg_sq, i, S);
    p = _mm256_mul_ps(p, decay);
    m = _mm256_fmadd_ps(w, _mm256_sub_ps(g, m), small ? m : g);
    v = _mm256_fmadd_ps(_mm256_mul_ps(omb2, g), g, _mm256_mul_ps(v, b2));
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), bc2), eps);
    p = _mm256_add_ps(p, _mm256_div_ps(_mm256_mul_ps(nss, m), denom));
    if (M) _mm256_storeu_ps(j.master + i, p);
    if (stream)
      _mm_stream_si128(reinterpret_cast<__m128i*>(p16 + i), f32x8_to_bf16(p));
    else
      st8(j.param, i, p, P);
    st8(j.exp_avg, i, m, S);
    st8(j.exp_avg_sq, i, v, S);
  }
  if (stream) _mm_sfence();
  for (; i < e; ++i) update1<P, G, S, M>(j, i, small);
}

// ------------------------------------------------------------- AVX-512 ----

CNUMA_TARGET_AVX512 inline __m512 ld16(const void* p, int64_t i, __mmask16 k, DType d) {
  if (d == DType::F32) return _mm512_maskz_loadu_ps(k, static_cast<const float*>(p) + i);
  return bf16x16_to_f32(_mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(p) + i));
}

CNUMA_TARGET_AVX512 inline void st16(void* p, int64_t i, __m512 x, __mmask16 k, DType d) {
  if (d == DType::F32) {
    _mm512_mask_storeu_ps(static_cast<float*>(p) + i, k, x);
    return;
  }
  _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, k, f32x16_to_bf16(x));
}

template <DType P, DType G, DType S, bool M, bool PF>
CNUMA_TARGET_AVX512 void run_avx512(const AdamWJob& j, int64_t b, int64_t e) {
  const AdamWScalars& s = j.s;
  const bool small = std::fabs(s.lerp_weight) < 0.5f;
  const __m512 factor = _mm512_set1_ps(s.grad_factor), decay = _mm512_set1_ps(s.decay);
  const __m512 w = _mm512_set1_ps(small ? s.lerp_weight : s.lerp_weight - 1.0f);
  const __m512 b2 = _mm512_set1_ps(s.beta2), omb2 = _mm512_set1_ps(s.one_minus_beta2);
  const __m512 bc2 = _mm512_set1_ps(s.bias_correction2_sqrt), eps = _mm512_set1_ps(s.eps);
  const __m512 nss = _mm512_set1_ps(s.neg_step_size);
  // With master weights the bf16 parameter copy is only written: stream it past the
  // cache (no read-for-ownership), when aligned. Values are unchanged.
  uint16_t* const p16 = static_cast<uint16_t*>(j.param);
  const bool stream = M && P == DType::BF16 && (reinterpret_cast<uintptr_t>(p16 + b) & 31) == 0;
  for (int64_t i = b; i < e; i += 16) {
    const int64_t left = e - i;
    const __mmask16 k = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
    if constexpr (PF) {
      _mm_prefetch(ahead<G>(j.grad, i), _MM_HINT_T0);
      _mm_prefetch(M ? ahead<DType::F32>(j.master, i) : ahead<P>(j.param, i), _MM_HINT_T0);
      _mm_prefetch(ahead<S>(j.exp_avg, i), _MM_HINT_T0);
      _mm_prefetch(ahead<S>(j.exp_avg_sq, i), _MM_HINT_T0);
    }
    const __m512 g = _mm512_mul_ps(ld16(j.grad, i, k, G), factor);
    __m512 p = M ? _mm512_maskz_loadu_ps(k, j.master + i) : ld16(j.param, i, k, P);
    __m512 m = ld16(j.exp_avg, i, k, S);
    __m512 v = ld16(j.exp_avg_sq, i, k, S);
    p = _mm512_mul_ps(p, decay);
    m = _mm512_fmadd_ps(w, _mm512_sub_ps(g, m), small ? m : g);
    v = _mm512_fmadd_ps(_mm512_mul_ps(omb2, g), g, _mm512_mul_ps(v, b2));
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), bc2), eps);
    p = _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(nss, m), denom));
    if (M) _mm512_mask_storeu_ps(j.master + i, k, p);
    if (stream && left >= 16)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p16 + i), f32x16_to_bf16(p));
    else
      st16(j.param, i, p, k, P);
    st16(j.exp_avg, i, m, k, S);
    st16(j.exp_avg_sq, i, v, k, S);
  }
  if (stream) _mm_sfence();  // streamed stores visible before the pool reports completion
}

#endif  // CNUMA_X86

// ------------------------------------------------------------ dispatch ----

using RangeFn = void (*)(const AdamWJob&, int64_t, int64_t);

template <DType P, DType G, DType S, bool M>
RangeFn pick(Isa isa, bool prefetch) {
#if CNUMA_X86
  if (isa == Isa::Avx512) return prefetch ? &run_avx512<P, G, S, M, true> : &run_avx512<P, G, S, M, false>;
  if (isa == Isa::Avx2) return prefetch ? &run_avx2<P, G, S, M, true> : &run_avx2<P, G, S, M, false>;
#endif
#if CNUMA_ARM64
  if (isa == Isa::Neon) return adamw_neon_kernel(P, G, S, M);
#endif
  (void)isa;
  (void)prefetch;
  return &run_scalar<P, G, S, M>;
}

template <DType P, DType G, DType S>
RangeFn pick_m(bool master, Isa isa, bool pf) {
  return master ? pick<P, G, S, true>(isa, pf) : pick<P, G, S, false>(isa, pf);
}

template <DType P, DType G>
RangeFn pick_s(DType s, bool master, Isa isa, bool pf) {
  return s == DType::F32 ? pick_m<P, G, DType::F32>(master, isa, pf) : pick_m<P, G, DType::BF16>(master, isa, pf);
}

template <DType P>
RangeFn pick_g(DType g, DType s, bool master, Isa isa, bool pf) {
  return g == DType::F32 ? pick_s<P, DType::F32>(s, master, isa, pf) : pick_s<P, DType::BF16>(s, master, isa, pf);
}

RangeFn kernel_for(const AdamWJob& j, Isa isa, bool pf) {
  const bool m = j.master != nullptr;
  return j.param_dtype == DType::F32 ? pick_g<DType::F32>(j.grad_dtype, j.state_dtype, m, isa, pf)
                                     : pick_g<DType::BF16>(j.grad_dtype, j.state_dtype, m, isa, pf);
}

void check(const AdamWJob& j) {
  if (j.n < 0) throw std::invalid_argument("adamw: negative element count");
  if (j.n > 0 && (j.param == nullptr || j.grad == nullptr || j.exp_avg == nullptr || j.exp_avg_sq == nullptr))
    throw std::invalid_argument("adamw: null tensor pointer");
}

}  // namespace

AdamWScalars adamw_scalars(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                           double grad_scale, bool maximize) {
  if (step < 1) throw std::invalid_argument("adamw: step must be >= 1");
  const double s = static_cast<double>(step);
  const double bias_correction1 = 1.0 - std::pow(beta1, s);
  const double bias_correction2 = 1.0 - std::pow(beta2, s);
  const double step_size = lr / bias_correction1;
  AdamWScalars out;
  out.decay = static_cast<float>(weight_decay != 0.0 ? 1.0 - lr * weight_decay : 1.0);
  out.lerp_weight = static_cast<float>(1.0 - beta1);
  out.beta2 = static_cast<float>(beta2);
  out.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  out.eps = static_cast<float>(eps);
  out.neg_step_size = static_cast<float>(-step_size);
  out.bias_correction2_sqrt = static_cast<float>(std::pow(bias_correction2, 0.5));
  out.grad_factor = static_cast<float>(maximize ? -grad_scale : grad_scale);
  return out;
}

bool prefetch_wanted(bool all_fp32) {
  // Software prefetch pays on Intel (see kPrefetch). On AMD Zen with all seven
  // streams fp32 the L2 stream prefetcher already keeps up and the extra loads
  // only take load-queue slots (Zen 3, two workers, CPU time per step: 4-6 %
  // more with them on one 64M tensor, 2 % more in a bare loop at every distance
  // from 128 to 1024 elements and with the NTA hint; Zen 4 reached 72 % of the
  // 4R/3W probe with them). With bf16 streams (half the bytes per element) they
  // pay on Zen 3 as well: 2 % (fp32 master), 4 % (fp32 moments), 9 % (all bf16)
  // less CPU time. COMPOSER_NUMA_ADAMW_PREFETCH=0/1 overrides the choice (read
  // at every call, so tests and benchmarks can force each kind).
  const char* env = std::getenv("COMPOSER_NUMA_ADAMW_PREFETCH");
  if (env != nullptr && (std::strcmp(env, "0") == 0 || std::strcmp(env, "1") == 0)) return env[0] == '1';
  return !(cpu_features().amd && all_fp32);
}

bool all_fp32(const AdamWJob& j) {
  return j.param_dtype == DType::F32 && j.grad_dtype == DType::F32 && j.state_dtype == DType::F32;
}

void adamw_range(const AdamWJob& job, int64_t begin, int64_t end, Isa isa) {
  check(job);
  if (begin < 0 || end > job.n || begin >= end) return;
  kernel_for(job, isa, prefetch_wanted(all_fp32(job)))(job, begin, end);
}

void adamw_step(Pool& pool, const std::vector<AdamWJob>& jobs) {
  const Isa isa = active_isa();
  const bool pf32 = prefetch_wanted(true), pf16 = prefetch_wanted(false);
  // Each job's workers claim chunks from a shared counter instead of taking fixed
  // shares: a worker that loses its core for a while (data-loader processes, a busy
  // shared machine) no longer holds the whole step back, and small jobs go whole to
  // whichever worker is free. Element-wise, so who updates what never changes a bit.
  struct alignas(64) Next {
    std::atomic<int64_t> at{0};
  };
  std::unique_ptr<Next[]> next(new Next[jobs.size()]);
  const int64_t workers = pool.size();
  std::vector<NodeTask> tasks;
  tasks.reserve(jobs.size());
  for (size_t k = 0; k < jobs.size(); ++k) {
    const AdamWJob& j = jobs[k];
    check(j);
    if (j.n == 0) continue;
    const RangeFn fn = kernel_for(j, isa, all_fp32(j) ? pf32 : pf16);
    const AdamWJob* jp = &j;
    std::atomic<int64_t>* at = &next[k].at;
    // About four chunks per worker, 4K..64K elements (multiples of 16, so only the job's
    // last chunk has a scalar tail): claims cost nothing next to a chunk's ~0.1-2 MB.
    const int64_t chunk = std::clamp<int64_t>((j.n / (4 * workers) + 15) / 16 * 16, 4096, 65536);
    // `workers` units: every worker of the node is called once and then claims chunks.
    tasks.push_back({j.node, workers, 1, [fn, jp, at, chunk](int64_t, int64_t, int) {
                       for (;;) {
                         const int64_t b = at->fetch_add(chunk, std::memory_order_relaxed);
                         if (b >= jp->n) return;
                         fn(*jp, b, std::min(b + chunk, jp->n));
                       }
                     }});
  }
  pool.run_on_nodes(tasks);
}

}  // namespace cnuma
