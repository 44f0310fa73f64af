#include "kernels/bandwidth.h"

#include <chrono>
#include <memory>
#include <stdexcept>

#include "common/checked.h"
#include "common/cpu_features.h"
#include "common/simd.h"
#include "runtime/node_buffer.h"
#if CNUMA_ARM64
#include "kernels/bandwidth_neon.h"
#endif

namespace cnuma {
namespace {

// The loops are simple enough for the compiler to vectorise (AVX2 copies when the
// CPU has it, so the probe is not limited by SSE issue width); on AVX-512 CPUs an
// explicit full-width version matches the optimizer kernel's accesses, software
// prefetch included, so the roofline is the best this access pattern achieves.
template <int Kernel>
CNUMA_INLINE void pass_body(float* const* a, int64_t b, int64_t e, uint64_t* sink) {
  // Distinct buffers: __restrict lets the loops vectorise without alias checks.
  float* __restrict x = a[0];
  float* __restrict y = a[1];
  if constexpr (Kernel == 0) {
    const uint64_t* __restrict p = reinterpret_cast<const uint64_t*>(x);
    uint64_t s = 0;
    for (int64_t i = b / 2; i < e / 2; ++i) s += p[i];
    *sink += s;
  } else if constexpr (Kernel == 1) {
    for (int64_t i = b; i < e; ++i) y[i] = x[i];
  } else if constexpr (Kernel == 2) {
    const float* __restrict z = a[2];
    for (int64_t i = b; i < e; ++i) x[i] = y[i] + 3.0f * z[i];
  } else {
    float* __restrict z = a[2];
    float* __restrict w = a[3];
    for (int64_t i = b; i < e; ++i) {
      const float g = x[i] * 0.5f;
      y[i] += g;
      z[i] += g;
      w[i] += g;
    }
  }
}

template <int Kernel>
void pass_generic(float* const* a, int64_t b, int64_t e, uint64_t* sink) {
  pass_body<Kernel>(a, b, e, sink);
}

#if CNUMA_X86
template <int Kernel>
CNUMA_TARGET_AVX2 void pass_avx2(float* const* a, int64_t b, int64_t e, uint64_t* sink) {
  pass_body<Kernel>(a, b, e, sink);
}

// Full-width explicit AVX-512, the optimizer kernel's access pattern exactly.
// read and copy walk their chunk as four interleaved sub-streams: one sequential
// stream per core is bounded by memory latency, not bandwidth.
template <int Kernel>
CNUMA_TARGET_AVX512 void pass_avx512(float* const* a, int64_t b, int64_t e, uint64_t* sink) {
  float* __restrict x = a[0];
  float* __restrict y = a[1];
  float* __restrict z = a[2];
  float* __restrict w = a[3];
  constexpr int64_t ahead = 512;  // the optimizer kernel's software prefetch distance
  const __m512 half = _mm512_set1_ps(0.5f), three = _mm512_set1_ps(3.0f);
  __m512i acc = _mm512_setzero_si512();
  if constexpr (Kernel <= 1) {
    const int64_t q = (e - b) / 64 * 16;  // four 16-aligned quarters, then a tail
    for (int64_t i = 0; i < q; i += 16) {
      for (int s = 0; s < 4; ++s) {
        const int64_t at = b + s * q + i;
        _mm_prefetch(reinterpret_cast<const char*>(x + at + ahead), _MM_HINT_T0);
        const __m512 v = _mm512_loadu_ps(x + at);
        if constexpr (Kernel == 0) acc = _mm512_add_epi32(acc, _mm512_castps_si512(v));
        else _mm512_storeu_ps(y + at, v);
      }
    }
    for (int64_t i = b + 4 * q; i < e; ++i) {
      if constexpr (Kernel == 0) acc = _mm512_add_epi32(acc, _mm512_castps_si512(_mm512_set1_ps(x[i])));
      else y[i] = x[i];
    }
    *sink += static_cast<uint64_t>(_mm512_reduce_add_epi32(acc));
    return;
  }
  for (int64_t i = b; i < e; i += 16) {
    const int64_t left = e - i;
    const __mmask16 k = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
    _mm_prefetch(reinterpret_cast<const char*>(x + i + ahead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(y + i + ahead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(z + i + ahead), _MM_HINT_T0);
    if constexpr (Kernel == 2) {
      const __m512 t = _mm512_fmadd_ps(three, _mm512_maskz_loadu_ps(k, z + i),
                                       _mm512_maskz_loadu_ps(k, y + i));
      _mm512_mask_storeu_ps(x + i, k, t);
    } else {
      _mm_prefetch(reinterpret_cast<const char*>(w + i + ahead), _MM_HINT_T0);
      const __m512 g = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), half);
      _mm512_mask_storeu_ps(y + i, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, y + i), g));
      _mm512_mask_storeu_ps(z + i, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, z + i), g));
      _mm512_mask_storeu_ps(w + i, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, w + i), g));
    }
  }
}

#endif  // CNUMA_X86

using PassFn = void (*)(float* const*, int64_t, int64_t, uint64_t*);

template <int Kernel>
PassFn pick(Isa isa) {
#if CNUMA_X86
  if (isa == Isa::Avx512) return &pass_avx512<Kernel>;
  if (isa == Isa::Avx2) return &pass_avx2<Kernel>;
#endif
#if CNUMA_ARM64
  if (isa == Isa::Neon) return bandwidth_neon_pass(Kernel);
#endif
  (void)isa;
  return &pass_generic<Kernel>;
}

}  // namespace

BandwidthResult measure_bandwidth(Pool& pool, const std::string& kernel, int64_t elements, int cpu_node,
                                  int mem_node, int passes) {
  int k, arrays, streams;
  if (kernel == "read") k = 0, arrays = 1, streams = 1;
  else if (kernel == "copy") k = 1, arrays = 2, streams = 2;
  else if (kernel == "triad") k = 2, arrays = 3, streams = 3;
  else if (kernel == "adamw") k = 3, arrays = 4, streams = 7;
  else throw std::invalid_argument("unknown bandwidth kernel '" + kernel.substr(0, 40) +
                                   "' (expected read, copy, triad or adamw)");
  if (elements < 1024) throw std::invalid_argument("bandwidth probe needs >= 1024 elements");
  if (passes < 1) throw std::invalid_argument("bandwidth probe needs >= 1 pass");
  elements = checked_round_up(elements, int64_t{16}, "the bandwidth probe's arrays");
  const int64_t array_bytes = checked_mul(elements, 4, "the bandwidth probe's arrays");
  const int64_t bytes_per_pass = checked_mul({array_bytes, streams}, "the bandwidth probe's traffic");
  checked_mul(array_bytes, arrays, "the bandwidth probe's arrays");

  std::vector<std::unique_ptr<NodeBuffer>> bufs;
  std::vector<float*> ptrs;
  for (int i = 0; i < arrays; ++i) {
    bufs.push_back(NodeBuffer::allocate(&pool, to_size(array_bytes, "an array"), {mem_node}, Policy::Bind));
    ptrs.push_back(static_cast<float*>(bufs.back()->data()));
  }
  ptrs.resize(4, nullptr);  // the kernels name four arrays; unused ones stay null
  const Isa isa = active_isa();
  const PassFn fn = k == 0 ? pick<0>(isa) : k == 1 ? pick<1>(isa) : k == 2 ? pick<2>(isa) : pick<3>(isa);
  const int nthreads = pool.size();
  std::vector<uint64_t> sinks(static_cast<size_t>(nthreads) * 8, 0);  // a cache line each
  float* const* a = ptrs.data();
  const std::vector<NodeTask> tasks = {
      {cpu_node, elements, 16, [&](int64_t b, int64_t e, int w) { fn(a, b, e, &sinks[static_cast<size_t>(w) * 8]); }}};
  BandwidthResult r{kernel, cpu_node, mem_node, 0, bytes_per_pass, {}};
  for (const WorkerSlot& s : pool.slots()) r.threads += s.node == cpu_node;
  if (r.threads == 0) r.threads = nthreads;
  for (int p = 0; p < passes; ++p) {
    const auto t0 = std::chrono::steady_clock::now();
    pool.run_on_nodes(tasks);
    const auto t1 = std::chrono::steady_clock::now();
    r.seconds.push_back(std::chrono::duration<double>(t1 - t0).count());
  }
  volatile uint64_t keep = 0;
  for (uint64_t s : sinks) keep = keep + s;
  (void)keep;
  return r;
}

}  // namespace cnuma
