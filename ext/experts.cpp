#include "experts.h"

#include <immintrin.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "cpu_features.h"
#include "memory.h"
#include "workers.h"

// The generic vector code below is written once with GCC vector extensions and
// compiled for AVX2 and AVX-512 by being inlined (always_inline) into functions
// with target attributes; it never crosses a call boundary, so GCC's notes on
// the vector-argument ABI do not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace cnuma {
namespace experts {
namespace {

#define CN_INLINE inline __attribute__((always_inline))
// Only the features cnuma::simd_level() and choose_path() check for each path.
#define CN_AVX2 __attribute__((target("avx2,fma")))
#define CN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define CN_BF16DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))
#define CN_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

// Experts with at least this many tokens use AMX tiles (16 token rows each):
// one tile product covers a kilobyte of weights in 16 cycles, so even a few
// tokens stay bandwidth-bound. Below it, AVX-512 BF16 dot products (2 per
// token per 64-byte load) stream the weights with less set-up per item.
constexpr int64_t kAmxMinTokens = 4;
// Software prefetch distance of the streamed weights, 4 KiB ahead (the
// hardware prefetchers stop at 4 KiB boundaries; measured best of 1-8 KiB).
constexpr int64_t kPrefetchBytes = 4096;
constexpr int64_t kPrefetch = kPrefetchBytes / 2;  // in bf16 elements
// Items taken from a queue at a time: runs of neighbouring blocks keep each
// worker's stream contiguous for longer.
constexpr int64_t kGrab = 4;
// Spare rows after the staged activations: AMX loads whole 16-row tiles.
constexpr int64_t kSlackRows = 32;

// ---------------------------------------------------------------------------
// Scalar helpers

CN_INLINE float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

CN_INLINE uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays a quiet NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

CN_INLINE float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

CN_INLINE float sigmoid(float g) { return 1.0f / (1.0f + std::exp(-g)); }

// ---------------------------------------------------------------------------
// Generic 16-lane vectors (one block of 16 output rows)

typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

CN_INLINE vf splat(float x) { return vf{} + x; }
CN_INLINE vf ldf(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
CN_INLINE void stf(float* p, const vf& v) { std::memcpy(p, &v, sizeof v); }
CN_INLINE vu ldpairs(const uint16_t* p) {  // 16 rows x 2 k of bf16
  vu v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
CN_INLINE vf pair_lo(const vu& w) { return reinterpret_cast<vf>(w << 16); }
CN_INLINE vf pair_hi(const vu& w) { return reinterpret_cast<vf>(w & 0xffff0000u); }
CN_INLINE vu bf16_bits(const vf& x) {  // bf16 pattern of each lane in its low 16 bits
  const vu u = reinterpret_cast<vu>(x);
  const vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) | 0x40u) : r;
}
CN_INLINE vf vround_bf16(const vf& x) { return reinterpret_cast<vf>(bf16_bits(x) << 16); }
CN_INLINE void st_bf16(uint16_t* p, const vf& x) {
  const vh h = __builtin_convertvector(bf16_bits(x), vh);
  std::memcpy(p, &h, sizeof h);
}
CN_INLINE float hsum(const vf& v) {  // fixed order, so results never depend on the ISA's shuffles
  float s = 0.0f;
  for (int l = 0; l < 16; ++l) s += v[l];
  return s;
}

// exp for the SwiGLU gate: range reduction by ln 2, degree-6 polynomial (~1 ulp
// on the clamped range, which keeps 2^n normal).
CN_INLINE vf vexp(const vf& in) {
  vf x = in > splat(88.0f) ? splat(88.0f) : in;
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (x * 1.44269504088896341f + magic) - magic;
  const vf r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  vf p = splat(1.0f / 720);
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  return p * reinterpret_cast<vf>(e);
}

// ---------------------------------------------------------------------------
// Kernel choice

enum class Isa { Scalar, Avx2, Avx512 };

struct Path {
  Isa isa = Isa::Scalar;
  bool dot = false;  // AVX-512 BF16 dot products (bf16 weights and staged bf16 inputs)
  bool amx = false;  // AMX tiles for experts with many tokens
};

bool amx_permitted() {
  // Linux hands out the AMX tile state only on request (once per process).
  static const bool ok = [] {
    constexpr long kReqPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqPerm, kXtileData) == 0;
  }();
  return ok;
}

Path choose_path(DType dtype) {
  Path p;
  const std::string level = simd_level();
  p.isa = level == "avx512" ? Isa::Avx512 : level == "avx2" ? Isa::Avx2 : Isa::Scalar;
  const CpuFeatures& f = cpu_features();
  if (p.isa == Isa::Avx512 && dtype == DType::BF16 && f.avx512bf16) {
    p.dot = true;
    const char* env = std::getenv("COMPOSER_NUMA_AMX");
    const bool off = env != nullptr && std::strcmp(env, "0") == 0;
    p.amx = !off && f.amx_tile && f.amx_bf16 && amx_permitted();
  }
  return p;
}

// ---------------------------------------------------------------------------
// Forward: one work item is two packed 16-row blocks times all tokens of one
// expert. Gate/up items end in the SwiGLU epilogue, down items in a copy to y.

struct FwdItem {
  const void* b0;      // first block (its first k-step)
  const void* b1;      // second block
  int64_t ks;          // elements from one k-step of a block to the next
  int64_t K;           // reduction length in elements (even)
  const void* x;       // first token row: fp32, or bf16 when Path::dot
  int64_t xs;          // token row stride in elements
  int64_t m;           // tokens
  bool down;           // false: gate/up -> act (+ saved g, u); true: -> y
  void* dst;           // act (x's format) or y (fp32), at the item's first column
  int64_t dst_stride;  // elements per token row
  float* save_g;       // optional, fp32, at the item's first column
  float* save_u;
  int64_t save_stride;
  bool round;  // bf16 layer: activations are rounded to bf16 before the down projection
  bool wbf16;  // weights are bf16
};

CN_INLINE void epilogue_scalar(const FwdItem& a, int64_t row, const float* o, bool xbf16) {
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

CN_INLINE void epilogue_vec(const FwdItem& a, int64_t row, const float* o, bool xbf16) {
  if (a.down) {
    float* y = static_cast<float*>(a.dst) + row * a.dst_stride;
    stf(y, ldf(o));
    stf(y + 16, ldf(o + 16));
    return;
  }
  const vf g = ldf(o), u = ldf(o + 16);
  const vf act = g / (splat(1.0f) + vexp(-g)) * u;
  if (xbf16)
    st_bf16(static_cast<uint16_t*>(a.dst) + row * a.dst_stride, act);
  else
    stf(static_cast<float*>(a.dst) + row * a.dst_stride, a.round ? vround_bf16(act) : act);
  if (a.save_g != nullptr) {
    stf(a.save_g + row * a.save_stride, g);
    stf(a.save_u + row * a.save_stride, u);
  }
}

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

// One block times C tokens of fp32 input; out[c * 32 + row].
template <int C, bool WB>
CN_INLINE void mk_vec(const void* blk, int64_t ks, int64_t K, const float* x, int64_t xs, float* out) {
  vf acc[C];
  for (int c = 0; c < C; ++c) acc[c] = vf{};
  if constexpr (WB) {
    const uint16_t* w = static_cast<const uint16_t*>(blk);
    for (int64_t kp = 0; kp < K / 2; ++kp) {
      const vu v = ldpairs(w + kp * ks);
      const vf lo = pair_lo(v), hi = pair_hi(v);
      for (int c = 0; c < C; ++c) {
        acc[c] += lo * x[c * xs + 2 * kp];
        acc[c] += hi * x[c * xs + 2 * kp + 1];
      }
    }
  } else {
    const float* w = static_cast<const float*>(blk);
    for (int64_t k = 0; k < K; ++k) {
      const vf v = ldf(w + k * ks);
      for (int c = 0; c < C; ++c) acc[c] += v * x[c * xs + k];
    }
  }
  for (int c = 0; c < C; ++c) stf(out + c * 32, acc[c]);
}

template <int CMAX, bool WB, int C = 1>
CN_INLINE void mk_vec_n(int64_t n, const FwdItem& a, const float* x, float* out) {
  if constexpr (C <= CMAX) {
    if (n == C) {
      mk_vec<C, WB>(a.b0, a.ks, a.K, x, a.xs, out);
      mk_vec<C, WB>(a.b1, a.ks, a.K, x, a.xs, out + 16);
      return;
    }
    mk_vec_n<CMAX, WB, C + 1>(n, a, x, out);
  }
}

template <int CMAX, bool WB>
CN_INLINE void fwd_item_vec(const FwdItem& a) {
  alignas(64) float out[CMAX * 32];
  for (int64_t c0 = 0; c0 < a.m; c0 += CMAX) {
    const int64_t n = std::min<int64_t>(CMAX, a.m - c0);
    mk_vec_n<CMAX, WB>(n, a, static_cast<const float*>(a.x) + c0 * a.xs, out);
    for (int64_t c = 0; c < n; ++c) epilogue_vec(a, c0 + c, out + c * 32, false);
  }
}

CN_AVX2 void fwd_item_avx2(const FwdItem& a) {
  if (a.wbf16)
    fwd_item_vec<4, true>(a);
  else
    fwd_item_vec<4, false>(a);
}

CN_AVX512 void fwd_item_avx512(const FwdItem& a) {
  if (a.wbf16)
    fwd_item_vec<8, true>(a);
  else
    fwd_item_vec<8, false>(a);
}

// Both blocks times C bf16 tokens: each 64-byte weight load feeds C dot products,
// so for few tokens the weights stream from memory exactly once.
template <int C>
CN_BF16DOT inline void mk_dot(const uint16_t* b0, const uint16_t* b1, int64_t ks, int64_t K,
                              const uint16_t* x, int64_t xs, float* out) {
  __m512 a0[C], a1[C];
  for (int c = 0; c < C; ++c) a0[c] = a1[c] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K / 2; ++kp) {
    _mm_prefetch(reinterpret_cast<const char*>(b0 + kp * ks + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(b1 + kp * ks + kPrefetch), _MM_HINT_T0);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(b0 + kp * ks);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(b1 + kp * ks);
    for (int c = 0; c < C; ++c) {
      int32_t pair;
      std::memcpy(&pair, x + c * xs + 2 * kp, 4);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      a0[c] = _mm512_dpbf16_ps(a0[c], w0, xb);
      a1[c] = _mm512_dpbf16_ps(a1[c], w1, xb);
    }
  }
  for (int c = 0; c < C; ++c) {
    _mm512_storeu_ps(out + c * 32, a0[c]);
    _mm512_storeu_ps(out + c * 32 + 16, a1[c]);
  }
}

constexpr int kDotMax = 8;

template <int C = 1>
CN_BF16DOT inline void mk_dot_n(int64_t n, const FwdItem& a, const uint16_t* x, float* out) {
  if constexpr (C <= kDotMax) {
    if (n == C) {
      mk_dot<C>(static_cast<const uint16_t*>(a.b0), static_cast<const uint16_t*>(a.b1), a.ks, a.K, x,
                a.xs, out);
      return;
    }
    mk_dot_n<C + 1>(n, a, x, out);
  }
}

CN_BF16DOT void fwd_item_dot(const FwdItem& a) {
  alignas(64) float out[kDotMax * 32];
  for (int64_t c0 = 0; c0 < a.m; c0 += kDotMax) {
    const int64_t n = std::min<int64_t>(kDotMax, a.m - c0);
    mk_dot_n(n, a, static_cast<const uint16_t*>(a.x) + c0 * a.xs, out);
    for (int64_t c = 0; c < n; ++c) epilogue_vec(a, c0 + c, out + c * 32, true);
  }
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// AMX: C tiles 0-3 = (tokens 0-15, 16-31) x (block 0, block 1); A tiles 4-5 hold
// 16 token rows x 32 k; B tiles 6-7 are 32 k of one block: 16 k-steps of the
// packed layout, one 64-byte row each. Rows past the last token read spare
// rows and are discarded.
template <bool TWO>
CN_AMX inline void amx_tiles(const uint16_t* b0, const uint16_t* b1, int64_t ks, int64_t K,
                             const uint16_t* x, int64_t xs, float* out) {
  const int64_t stride = xs * 2, bstride = ks * 2;
  _tile_zero(0);
  _tile_zero(1);
  if (TWO) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t k = 0; k < K; k += 32) {
    // The 16 k-steps of both blocks are one contiguous 2 KiB run.
    const char* ahead = reinterpret_cast<const char*>(b0 + (k >> 1) * ks) + kPrefetchBytes;
    for (int l = 0; l < 32; ++l) _mm_prefetch(ahead + l * 64, _MM_HINT_T0);
    _tile_loadd(4, x + k, stride);
    _tile_loadd(6, b0 + (k >> 1) * ks, bstride);
    _tile_loadd(7, b1 + (k >> 1) * ks, bstride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (TWO) {
      _tile_loadd(5, x + 16 * xs + k, stride);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, out, 128);
  _tile_stored(1, out + 16, 128);
  if (TWO) {
    _tile_stored(2, out + 16 * 32, 128);
    _tile_stored(3, out + 16 * 32 + 16, 128);
  }
}

CN_AMX void fwd_item_amx(const FwdItem& a) {
  if (a.m < kAmxMinTokens) {
    fwd_item_dot(a);
    return;
  }
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  alignas(64) float out[32 * 32];
  const uint16_t* b0 = static_cast<const uint16_t*>(a.b0);
  const uint16_t* b1 = static_cast<const uint16_t*>(a.b1);
  for (int64_t c0 = 0; c0 < a.m; c0 += 32) {
    const int64_t n = std::min<int64_t>(32, a.m - c0);
    const uint16_t* x = static_cast<const uint16_t*>(a.x) + c0 * a.xs;
    if (n > 16)
      amx_tiles<true>(b0, b1, a.ks, a.K, x, a.xs, out);
    else
      amx_tiles<false>(b0, b1, a.ks, a.K, x, a.xs, out);
    for (int64_t c = 0; c < n; ++c) epilogue_vec(a, c0 + c, out + c * 32, true);
  }
  _tile_release();
}

void run_fwd_item(const Path& p, const FwdItem& a) {
  if (p.amx)
    fwd_item_amx(a);
  else if (p.dot)
    fwd_item_dot(a);
  else if (p.isa == Isa::Avx512)
    fwd_item_avx512(a);
  else if (p.isa == Isa::Avx2)
    fwd_item_avx2(a);
  else
    fwd_item_scalar(a);
}

// ---------------------------------------------------------------------------
// Backward kernels (fp32 arithmetic on every path).

// Rows of a [rows][stride] fp32 matrix, optionally picked through a token index.
struct Rows {
  const float* base;
  int64_t stride;
  const int64_t* index;  // slot -> row, or null for row = slot
  int64_t first;         // first slot of the expert
  int64_t offset;        // column offset added to every row
  CN_INLINE const float* operator()(int64_t s) const {
    const int64_t row = index != nullptr ? index[first + s] : first + s;
    return base + row * stride + offset;
  }
};

// Data gradient through packed blocks: out[j] = sum_b sum_r dy[b*16 + r] * W_b[r][j]
// for the 8 columns j starting at w. Blocks come in pairs (one 32-row
// super-block, interleaved per k-step): block b is at w + (b/2) * sbstride + (b%2) * 16 * kp.
struct DataArgs {
  const void* w;
  int64_t sbstride;  // elements between super-blocks
  int64_t ks;        // elements between k-steps
  int64_t nblocks;
  bool wbf16;
  CN_INLINE int64_t block(int64_t b) const { return (b >> 1) * sbstride + (b & 1) * kBlock * (wbf16 ? 2 : 1); }
};

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

template <bool WB>
CN_INLINE void data8_vec(const DataArgs& a, const float* dy, float* out) {
  vf acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = vf{};
  for (int64_t b = 0; b < a.nblocks; ++b) {
    const vf d = ldf(dy + b * 16);
    if constexpr (WB) {
      const uint16_t* q = static_cast<const uint16_t*>(a.w) + a.block(b);
      for (int j = 0; j < 4; ++j) {
        const vu v = ldpairs(q + j * a.ks);
        acc[2 * j] += pair_lo(v) * d;
        acc[2 * j + 1] += pair_hi(v) * d;
      }
    } else {
      const float* q = static_cast<const float*>(a.w) + a.block(b);
      for (int j = 0; j < 8; ++j) acc[j] += ldf(q + j * a.ks) * d;
    }
  }
  for (int j = 0; j < 8; ++j) out[j] = hsum(acc[j]);
}

// Weight gradient of one packed block, columns [c0, c1) (multiples of 8):
// G[r][c] = sum_s dy_s[r] * x_s[c - c0], written (not accumulated).
struct GradArgs {
  void* g;     // the block
  int64_t ks;  // elements between k-steps
  int64_t c0, c1;
  Rows dy;  // 16 lanes per slot
  Rows x;   // c1 - c0 columns per slot
  int64_t m;
  bool wbf16;
};

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

template <bool WB>
CN_INLINE void grad_vec(const GradArgs& a) {
  for (int64_t c = a.c0; c < a.c1; c += 8) {
    vf acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = vf{};
    for (int64_t t = 0; t < a.m; ++t) {
      const vf d = ldf(a.dy(t));
      const float* x = a.x(t) + (c - a.c0);
      for (int j = 0; j < 8; ++j) acc[j] += d * x[j];
    }
    if constexpr (WB) {
      uint16_t* q = static_cast<uint16_t*>(a.g) + (c >> 1) * a.ks;
      for (int j = 0; j < 4; ++j) {
        const vu v = bf16_bits(acc[2 * j]) | (bf16_bits(acc[2 * j + 1]) << 16);
        std::memcpy(q + j * a.ks, &v, sizeof v);
      }
    } else {
      float* q = static_cast<float*>(a.g) + c * a.ks;
      for (int j = 0; j < 8; ++j) stf(q + j * a.ks, acc[j]);
    }
  }
}

CN_AVX2 void data8_avx2(const DataArgs& a, const float* dy, float* out) {
  a.wbf16 ? data8_vec<true>(a, dy, out) : data8_vec<false>(a, dy, out);
}
CN_AVX512 void data8_avx512(const DataArgs& a, const float* dy, float* out) {
  a.wbf16 ? data8_vec<true>(a, dy, out) : data8_vec<false>(a, dy, out);
}
CN_AVX2 void grad_avx2(const GradArgs& a) { a.wbf16 ? grad_vec<true>(a) : grad_vec<false>(a); }
CN_AVX512 void grad_avx512(const GradArgs& a) { a.wbf16 ? grad_vec<true>(a) : grad_vec<false>(a); }

void run_data8(Isa isa, const DataArgs& a, const float* dy, float* out) {
  if (isa == Isa::Avx512)
    data8_avx512(a, dy, out);
  else if (isa == Isa::Avx2)
    data8_avx2(a, dy, out);
  else
    data8_scalar(a, dy, out);
}

void run_grad(Isa isa, const GradArgs& a) {
  if (isa == Isa::Avx512)
    grad_avx512(a);
  else if (isa == Isa::Avx2)
    grad_avx2(a);
  else
    grad_scalar(a);
}

// ---------------------------------------------------------------------------
// Routing: slots (token, choice) grouped by expert, in token order.

struct Routing {
  std::vector<int64_t> start;   // [experts + 1]
  std::vector<int64_t> token;   // slot -> token
  std::vector<int32_t> expert;  // slot -> expert
  std::vector<float> weight;    // slot -> routing weight
  std::vector<int64_t> slot;    // token * k + choice -> slot
  std::vector<int32_t> active;  // experts with at least one slot
  int64_t count(int e) const { return start[e + 1] - start[e]; }
};

Routing route(int64_t experts, const int64_t* ids, const float* weights, int64_t tokens, int64_t k) {
  const int64_t slots = tokens * k;
  Routing r;
  r.start.assign(experts + 1, 0);
  for (int64_t i = 0; i < slots; ++i) {
    const int64_t e = ids[i];
    if (e < 0 || e >= experts)
      throw std::out_of_range("topk_ids[" + std::to_string(i / k) + ", " + std::to_string(i % k) +
                              "] = " + std::to_string(e) + " is not an expert id in [0, " +
                              std::to_string(experts) + ")");
    r.start[e + 1]++;
  }
  for (int64_t e = 0; e < experts; ++e) {
    if (r.start[e + 1] > 0) r.active.push_back(static_cast<int32_t>(e));
    r.start[e + 1] += r.start[e];
  }
  std::vector<int64_t> fill(r.start.begin(), r.start.end() - 1);
  r.token.resize(slots);
  r.expert.resize(slots);
  r.weight.resize(slots);
  r.slot.resize(slots);
  for (int64_t i = 0; i < slots; ++i) {
    const int64_t e = ids[i];
    const int64_t s = fill[e]++;
    r.token[s] = i / k;
    r.expert[s] = static_cast<int32_t>(e);
    r.weight[s] = weights[i];
    r.slot[i] = s;
  }
  return r;
}

// ---------------------------------------------------------------------------
// Dispatch. All phases of all slices run in ONE dispatch of the pool: each
// node's workers take the items of that node's slices from shared queues
// (experts carry different token counts, so static chunks would idle workers)
// and move on to a slice's next phase once every item of its current phase is
// done. Only the slice's own workers wait for it, so a call from inside a
// worker (run inline, one task after another) cannot deadlock, and waking the
// sleeping workers is paid once per call rather than once per phase.

struct Item {
  int32_t expert;
  int32_t index;  // block, column chunk, ... depending on the phase
  int32_t kind;   // backward phase 2 only
};

using PhaseItems = std::vector<std::vector<std::vector<Item>>>;  // [phase][slice] -> items

CN_INLINE void wait_until(const std::atomic<int64_t>& done, int64_t n) {
  for (int spins = 0; done.load(std::memory_order_acquire) < n;) {
    _mm_pause();
    if (++spins == 256) {  // more workers than cores: let the one we wait for run
      sched_yield();
      spins = 0;
    }
  }
}

template <class Body>
void run_phases(const std::vector<Slice>& slices, const PhaseItems& items, const Body& body) {
  const size_t P = slices.size(), F = items.size();
  std::unique_ptr<std::atomic<int64_t>[]> next(new std::atomic<int64_t>[F * P]);
  std::unique_ptr<std::atomic<int64_t>[]> done(new std::atomic<int64_t>[F * P]);
  for (size_t i = 0; i < F * P; ++i) {
    next[i].store(0, std::memory_order_relaxed);
    done[i].store(0, std::memory_order_relaxed);
  }
  std::vector<int> nodes;
  for (const Slice& sl : slices)
    if (std::find(nodes.begin(), nodes.end(), sl.node) == nodes.end()) nodes.push_back(sl.node);
  std::vector<NodeTask> tasks;
  for (int node : nodes) {
    tasks.push_back({node, 1 << 12, 1, [&, node](int64_t, int64_t, int) {
                       for (size_t f = 0; f < F; ++f) {
                         for (size_t p = 0; p < P; ++p) {
                           if (slices[p].node != node) continue;
                           const std::vector<Item>& list = items[f][p];
                           const int64_t n = static_cast<int64_t>(list.size());
                           for (;;) {
                             const int64_t i0 = next[f * P + p].fetch_add(kGrab, std::memory_order_relaxed);
                             if (i0 >= n) break;
                             const int64_t i1 = std::min(n, i0 + kGrab);
                             for (int64_t i = i0; i < i1; ++i) body(f, p, list[i]);
                             done[f * P + p].fetch_add(i1 - i0, std::memory_order_release);
                           }
                         }
                         for (size_t p = 0; p < P; ++p)
                           if (slices[p].node == node)
                             wait_until(done[f * P + p], static_cast<int64_t>(items[f][p].size()));
                       }
                     }});
  }
  run_on_nodes(tasks);
}

// Per-token reductions: inline on the calling thread when small (a dispatch
// costs more than the work), else split over all workers.
template <class Fn>
void for_tokens(int64_t tokens, int64_t work_per_token, const Fn& fn) {
  if (tokens * work_per_token <= (int64_t{1} << 18))
    fn(int64_t{0}, tokens);
  else
    parallel_for(tokens, 1, fn);
}

constexpr size_t round64(size_t n) { return (n + 63) & ~size_t(63); }

// Carves consecutive 64-byte aligned regions out of one buffer.
struct Carver {
  char* base;
  size_t used = 0;
  template <class T>
  T* take(size_t count) {
    T* p = reinterpret_cast<T*>(base + used);
    used += round64(count * sizeof(T));
    return p;
  }
};

void* ensure(std::unique_ptr<NodeBuffer>& buf, size_t bytes, const std::vector<int>& nodes,
             Policy policy) {
  if (bytes == 0) bytes = 64;
  if (!buf || buf->size() < bytes) {
    const size_t grown = buf ? std::max(bytes, buf->size() + buf->size() / 2) : bytes;
    buf.reset();
    buf = NodeBuffer::allocate(grown, nodes, policy);
  }
  return buf->data();
}

}  // namespace

// ---------------------------------------------------------------------------

std::string kernel_name(DType dtype) {
  const Path p = choose_path(dtype);
  std::string s = p.isa == Isa::Avx512 ? "avx512" : p.isa == Isa::Avx2 ? "avx2" : "scalar";
  if (p.dot) s += "+bf16dot";
  if (p.amx) s += "+amx";
  return s;
}

Experts::Experts(const Layer& layer, std::vector<Slice> slices)
    : layer_(layer), slices_(std::move(slices)) {
  const Layer& L = layer_;
  if (L.experts <= 0 || L.hidden <= 0 || L.intermediate <= 0)
    throw std::invalid_argument("experts, hidden and intermediate must be positive");
  if (L.hidden_padded < L.hidden || L.hidden_padded % kAlign != 0 ||
      L.hidden_padded - L.hidden >= kAlign)
    throw std::invalid_argument("hidden_padded must be hidden rounded up to a multiple of 32");
  if (slices_.empty()) throw std::invalid_argument("at least one slice is needed");
  for (const Slice& s : slices_) {
    if (static_cast<int64_t>(s.local.size()) != L.experts)
      throw std::invalid_argument("each slice maps every expert id (-1 when it does not hold it)");
    if (s.rows <= 0 || s.rows % kAlign != 0 || s.row0 < 0 || s.row1 <= s.row0 || s.row1 > s.rows ||
        s.row0 % kAlign != 0 || s.row1 % kAlign != 0)
      throw std::invalid_argument("slice rows must be positive multiples of 32 with 0 <= row0 < row1 <= rows");
    int32_t held = 0;
    for (int32_t v : s.local) held += v >= 0;
    std::vector<char> seen(held, 0);
    for (int32_t v : s.local) {
      if (v < 0) continue;
      if (v >= held || seen[v]) throw std::invalid_argument("slice expert indices must be 0..n-1, each once");
      seen[v] = 1;
    }
  }
  scratch_.resize(slices_.size());
}

Experts::~Experts() = default;

static int64_t held_experts(const Slice& s) {
  int64_t n = 0;
  for (int32_t v : s.local) n += v >= 0;
  return n;
}

int64_t Experts::w13_elements(size_t p) const {
  const Slice& s = slices_.at(p);
  return held_experts(s) * 2 * s.rows * layer_.hidden_padded;
}

int64_t Experts::w2_elements(size_t p) const {
  const Slice& s = slices_.at(p);
  return held_experts(s) * s.rows * layer_.hidden_padded;
}

void Experts::forward(const void* x, int64_t tokens, const int64_t* ids, const float* weights,
                      int64_t k, void* out, const std::vector<SliceData>& data) {
  const Layer& L = layer_;
  const int64_t H = L.hidden, Hp = L.hidden_padded;
  const bool bf16 = L.dtype == DType::BF16;
  const size_t esz = bf16 ? 2 : 4;
  // Packed layout (see experts.h): 32-row super-blocks, two 16-row blocks
  // interleaved per k-step, so every work item streams one contiguous range.
  const int64_t kp = bf16 ? 2 : 1, ks = 2 * kBlock * kp, half = kBlock * kp;
  if (tokens < 0 || k < 0) throw std::invalid_argument("tokens and k must be >= 0");
  if (data.size() != slices_.size()) throw std::invalid_argument("one SliceData per slice is needed");
  if (tokens == 0) return;
  if (k == 0) {
    std::memset(out, 0, tokens * H * esz);
    return;
  }
  std::lock_guard<std::mutex> lock(mu_);
  const Routing R = route(L.experts, ids, weights, tokens, k);
  const Path path = choose_path(L.dtype);
  const size_t xsz = path.dot ? 2 : 4;
  const int64_t S = tokens * k;
  const size_t P = slices_.size();

  struct Bufs {
    char* xs;   // [S + spare][Hp] token rows grouped by expert, in the kernel's input format
    char* act;  // [S + spare][Ip] SwiGLU activations, same format
    float* y;   // [S][Hp] this slice's partial expert outputs
  };
  std::vector<Bufs> buf(P);
  for (size_t p = 0; p < P; ++p) {
    const int64_t Ip = slices_[p].row1 - slices_[p].row0;
    const size_t bytes = round64((S + kSlackRows) * Hp * xsz) + round64((S + kSlackRows) * Ip * xsz) +
                         round64(S * Hp * sizeof(float));
    Carver c{static_cast<char*>(ensure(scratch_[p], bytes, {slices_[p].node}, Policy::Preferred))};
    buf[p].xs = c.take<char>((S + kSlackRows) * Hp * xsz);
    buf[p].act = c.take<char>((S + kSlackRows) * Ip * xsz);
    buf[p].y = c.take<float>(S * Hp);
  }

  // Phase 0 stages token rows; phase 1 runs gate and up on 16 rows of one
  // expert per item and applies SwiGLU; phase 2 runs down on 32 hidden rows.
  enum { kStage, kGateUp, kDown, kPhases };
  PhaseItems items(kPhases, std::vector<std::vector<Item>>(P));
  for (size_t p = 0; p < P; ++p) {
    const Slice& sl = slices_[p];
    for (int64_t s0 = 0; s0 < S; s0 += 32) items[kStage][p].push_back({0, static_cast<int32_t>(s0), 0});
    for (int32_t e : R.active) {
      if (sl.local[e] < 0) continue;
      for (int64_t ib = sl.row0 / kBlock; ib < sl.row1 / kBlock; ++ib)
        items[kGateUp][p].push_back({e, static_cast<int32_t>(ib), 0});
      for (int64_t hb = 0; hb < Hp / kBlock; hb += 2) items[kDown][p].push_back({e, static_cast<int32_t>(hb), 0});
    }
  }
  run_phases(slices_, items, [&](size_t phase, size_t p, const Item& it) {
    const Slice& sl = slices_[p];
    const int64_t Ip = sl.row1 - sl.row0;
    if (phase == kStage) {
      for (int64_t s = it.index; s < std::min<int64_t>(S, it.index + 32); ++s) {
        if (sl.local[R.expert[s]] < 0) continue;
        const char* src = static_cast<const char*>(x) + R.token[s] * H * esz;
        char* dst = buf[p].xs + s * Hp * xsz;
        if (esz == xsz) {
          std::memcpy(dst, src, H * esz);
          std::memset(dst + H * esz, 0, (Hp - H) * esz);
        } else {  // bf16 input, fp32 kernel
          float* d = reinterpret_cast<float*>(dst);
          const uint16_t* h = reinterpret_cast<const uint16_t*>(src);
          for (int64_t i = 0; i < H; ++i) d[i] = bf16_to_f32(h[i]);
          for (int64_t i = H; i < Hp; ++i) d[i] = 0.0f;
        }
      }
      return;
    }
    const int64_t le = sl.local[it.expert], s0 = R.start[it.expert];
    FwdItem a;
    a.ks = ks;
    a.m = R.count(it.expert);
    a.wbf16 = bf16;
    if (phase == kGateUp) {
      const int64_t col = it.index * kBlock - sl.row0;
      a.b0 = static_cast<const char*>(data[p].w13) + (le * (sl.rows / kBlock) + it.index) * 2 * kBlock * Hp * esz;
      a.b1 = static_cast<const char*>(a.b0) + half * esz;
      a.K = Hp;
      a.x = buf[p].xs + s0 * Hp * xsz;
      a.xs = Hp;
      a.down = false;
      a.dst = buf[p].act + (s0 * Ip + col) * xsz;
      a.dst_stride = Ip;
      const bool save = data[p].save_gate != nullptr && data[p].save_up != nullptr;
      a.save_g = save ? data[p].save_gate + s0 * Ip + col : nullptr;
      a.save_u = save ? data[p].save_up + s0 * Ip + col : nullptr;
      a.save_stride = Ip;
      a.round = bf16;
    } else {
      a.b0 = static_cast<const char*>(data[p].w2) +
             ((le * (Hp / kBlock) + it.index) * kBlock * sl.rows + sl.row0 * 2 * kBlock) * esz;
      a.b1 = static_cast<const char*>(a.b0) + half * esz;
      a.K = Ip;
      a.x = buf[p].act + s0 * Ip * xsz;
      a.xs = Ip;
      a.down = true;
      a.dst = buf[p].y + s0 * Hp + it.index * kBlock;
      a.dst_stride = Hp;
      a.save_g = a.save_u = nullptr;
      a.save_stride = 0;
      a.round = false;
    }
    run_fwd_item(path, a);
  });

  // out[t] = sum_j w[t, j] * sum over slices of y[slot(t, j)], in fixed order.
  for_tokens(tokens, k * H * static_cast<int64_t>(P), [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(H), part(H);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = R.slot[t * k + j];
        const int32_t e = R.expert[s];
        bool first = true;
        for (size_t p = 0; p < P; ++p) {
          if (slices_[p].local[e] < 0) continue;
          const float* y = buf[p].y + s * Hp;
          if (first)
            std::copy(y, y + H, part.begin());
          else
            for (int64_t h = 0; h < H; ++h) part[h] += y[h];
          first = false;
        }
        const float w = R.weight[s];
        for (int64_t h = 0; h < H; ++h) acc[h] += w * part[h];
      }
      if (bf16) {
        uint16_t* o = static_cast<uint16_t*>(out) + t * H;
        for (int64_t h = 0; h < H; ++h) o[h] = f32_to_bf16(acc[h]);
      } else {
        std::copy(acc.begin(), acc.end(), static_cast<float*>(out) + t * H);
      }
    }
  });
}

void Experts::backward(const void* dout, const void* x, int64_t tokens, const int64_t* ids,
                       const float* weights, int64_t k, const std::vector<SliceData>& data, void* dx,
                       float* dweights) {
  const Layer& L = layer_;
  const int64_t H = L.hidden, Hp = L.hidden_padded;
  const bool bf16 = L.dtype == DType::BF16;
  const size_t esz = bf16 ? 2 : 4;
  const int64_t kp = bf16 ? 2 : 1, ks = 2 * kBlock * kp, half = kBlock * kp;
  if (tokens < 0 || k < 0) throw std::invalid_argument("tokens and k must be >= 0");
  if (data.size() != slices_.size()) throw std::invalid_argument("one SliceData per slice is needed");
  bool weight_grads = true;
  for (const SliceData& d : data) {
    if (tokens * k > 0 && (d.save_gate == nullptr || d.save_up == nullptr))
      throw std::invalid_argument("backward needs the activations saved by forward");
    weight_grads = weight_grads && d.grad13 != nullptr && d.grad2 != nullptr;
  }
  std::lock_guard<std::mutex> lock(mu_);
  const Routing R = route(L.experts, ids, weights, tokens, k);
  const Isa isa = choose_path(L.dtype).isa;
  const int64_t S = tokens * k;
  const size_t P = slices_.size();
  if (tokens > 0) std::memset(dx, 0, tokens * H * esz);
  if (S > 0) std::memset(dweights, 0, S * sizeof(float));

  struct Bufs {
    float* xt;      // [T][Hp] x in fp32, padded
    float* dt;      // [T][Hp] grad_output in fp32, padded
    float* aw;      // [S][Ip] routing weight * activation
    float* dgu;     // [S][Ip/16][2][16] gradients of the gate and up pre-activations
    float* dwpart;  // [S][Ip/8] partial dot products for the routing weights' gradient
    float* dxp;     // [S][Hp] partial input gradient
  };
  std::vector<Bufs> buf(P);
  for (size_t p = 0; p < P; ++p) {
    const int64_t Ip = slices_[p].row1 - slices_[p].row0;
    const size_t bytes = 2 * round64(tokens * Hp * 4) + round64(S * Ip * 4) + round64(S * 2 * Ip * 4) +
                         round64(S * (Ip / 8) * 4) + round64(S * Hp * 4);
    Carver c{static_cast<char*>(ensure(scratch_[p], bytes, {slices_[p].node}, Policy::Preferred))};
    buf[p].xt = c.take<float>(tokens * Hp);
    buf[p].dt = c.take<float>(tokens * Hp);
    buf[p].aw = c.take<float>(S * Ip);
    buf[p].dgu = c.take<float>(S * 2 * Ip);
    buf[p].dwpart = c.take<float>(S * (Ip / 8));
    buf[p].dxp = c.take<float>(S * Hp);
  }

  // Phase 0 stages x and grad_output in fp32 (each slice its own node-local
  // copy); phase 1 takes the gradient through down for 8 intermediate columns
  // per item, then through SwiGLU; phase 2 computes the weight gradients, the
  // input gradient through gate/up and zeros for experts without tokens.
  enum { kStage, kSwiGLU, kRest, kPhases };
  enum Kind { kGradDown, kDataGateUp, kGradGateUp, kZero };
  PhaseItems items(kPhases, std::vector<std::vector<Item>>(P));
  for (size_t p = 0; p < P; ++p) {
    const Slice& sl = slices_[p];
    const int64_t Ip = sl.row1 - sl.row0;
    for (int64_t t0 = 0; t0 < tokens; t0 += 16) items[kStage][p].push_back({0, static_cast<int32_t>(t0), 0});
    for (int32_t e : R.active) {
      if (sl.local[e] < 0) continue;
      for (int64_t cc = 0; cc < Ip / 8; ++cc) items[kSwiGLU][p].push_back({e, static_cast<int32_t>(cc), 0});
      for (int64_t hc = 0; hc < Hp / 32; ++hc) items[kRest][p].push_back({e, static_cast<int32_t>(hc), kDataGateUp});
      if (!weight_grads) continue;
      for (int64_t hb = 0; hb < Hp / kBlock; ++hb) items[kRest][p].push_back({e, static_cast<int32_t>(hb), kGradDown});
      for (int64_t ib = 0; ib < Ip / kBlock; ++ib) items[kRest][p].push_back({e, static_cast<int32_t>(ib), kGradGateUp});
    }
    if (weight_grads)
      for (int32_t e = 0; e < L.experts; ++e)
        if (sl.local[e] >= 0 && R.count(e) == 0) items[kRest][p].push_back({e, 0, kZero});
  }
  run_phases(slices_, items, [&](size_t phase, size_t p, const Item& it) {
    const Slice& sl = slices_[p];
    const int64_t Ip = sl.row1 - sl.row0;
    if (phase == kStage) {
      for (int64_t t = it.index; t < std::min<int64_t>(tokens, it.index + 16); ++t) {
        for (int which = 0; which < 2; ++which) {
          const void* src = which ? dout : x;
          float* d = (which ? buf[p].dt : buf[p].xt) + t * Hp;
          if (bf16) {
            const uint16_t* h = static_cast<const uint16_t*>(src) + t * H;
            for (int64_t i = 0; i < H; ++i) d[i] = bf16_to_f32(h[i]);
          } else {
            std::memcpy(d, static_cast<const float*>(src) + t * H, H * sizeof(float));
          }
          std::fill(d + H, d + Hp, 0.0f);
        }
      }
      return;
    }
    const int64_t le = sl.local[it.expert], s0 = R.start[it.expert], m = R.count(it.expert);
    if (phase == kSwiGLU) {
      DataArgs a;
      a.w = static_cast<const char*>(data[p].w2) +
            (le * (Hp / kBlock) * kBlock * sl.rows + (sl.row0 + it.index * 8) * 2 * kBlock) * esz;
      a.sbstride = 2 * kBlock * sl.rows;
      a.ks = ks;
      a.nblocks = Hp / kBlock;
      a.wbf16 = bf16;
      for (int64_t s = s0; s < s0 + m; ++s) {
        float dz[8];
        run_data8(isa, a, buf[p].dt + R.token[s] * Hp, dz);
        const float w = R.weight[s];
        float dot = 0.0f;
        for (int j = 0; j < 8; ++j) {
          const int64_t c = it.index * 8 + j;
          const float g = data[p].save_gate[s * Ip + c], u = data[p].save_up[s * Ip + c];
          const float sg = sigmoid(g), silu = g * sg;
          float act = silu * u;
          if (bf16) act = round_bf16(act);
          dot += act * dz[j];
          buf[p].aw[s * Ip + c] = w * act;
          const float da = w * dz[j];
          float* dgu = buf[p].dgu + s * 2 * Ip + (c / kBlock) * 2 * kBlock + c % kBlock;
          dgu[0] = da * u * sg * (1.0f + g * (1.0f - sg));
          dgu[kBlock] = da * silu;
        }
        buf[p].dwpart[s * (Ip / 8) + it.index] = dot;
      }
      return;
    }
    char* g13 = static_cast<char*>(data[p].grad13) + (le * (sl.rows / kBlock) + sl.row0 / kBlock) * 2 * kBlock * Hp * esz;
    char* g2 = static_cast<char*>(data[p].grad2) + le * (Hp / kBlock) * kBlock * sl.rows * esz;
    const int64_t sb13 = 2 * kBlock * Hp, sb2 = 2 * kBlock * sl.rows;  // super-block sizes
    switch (it.kind) {
      case kGradDown: {
        GradArgs a{g2 + ((it.index >> 1) * sb2 + (it.index & 1) * half) * esz, ks, sl.row0, sl.row1,
                   Rows{buf[p].dt, Hp, R.token.data(), s0, it.index * kBlock},
                   Rows{buf[p].aw, Ip, nullptr, s0, 0}, m, bf16};
        run_grad(isa, a);
        break;
      }
      case kDataGateUp: {
        DataArgs a;
        a.sbstride = sb13;
        a.ks = ks;
        a.nblocks = 2 * Ip / kBlock;
        a.wbf16 = bf16;
        const char* w13 = static_cast<const char*>(data[p].w13) +
                          (le * (sl.rows / kBlock) + sl.row0 / kBlock) * 2 * kBlock * Hp * esz;
        for (int64_t h0 = it.index * 32; h0 < it.index * 32 + 32; h0 += 8) {
          a.w = w13 + h0 * 2 * kBlock * esz;
          for (int64_t s = s0; s < s0 + m; ++s) run_data8(isa, a, buf[p].dgu + s * 2 * Ip, buf[p].dxp + s * Hp + h0);
        }
        break;
      }
      case kGradGateUp: {
        for (int h = 0; h < 2; ++h) {
          const int64_t jb = it.index * 2 + h;
          GradArgs a{g13 + (it.index * sb13 + h * half) * esz, ks, 0, Hp,
                     Rows{buf[p].dgu, 2 * Ip, nullptr, s0, jb * kBlock},
                     Rows{buf[p].xt, Hp, R.token.data(), s0, 0}, m, bf16};
          run_grad(isa, a);
        }
        break;
      }
      case kZero: {
        std::memset(g13, 0, Ip * 2 * Hp * esz);
        for (int64_t sb = 0; sb < Hp / (2 * kBlock); ++sb)
          std::memset(g2 + (sb * sb2 + sl.row0 * 2 * kBlock) * esz, 0, Ip * 2 * kBlock * esz);
        break;
      }
    }
  });

  // Reduce the partial input gradients and routing-weight gradients over slices.
  for_tokens(tokens, k * H * static_cast<int64_t>(P), [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(H);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = R.slot[t * k + j];
        const int32_t e = R.expert[s];
        float dw = 0.0f;
        for (size_t p = 0; p < P; ++p) {
          const Slice& sl = slices_[p];
          if (sl.local[e] < 0) continue;
          const float* d = buf[p].dxp + s * Hp;
          for (int64_t h = 0; h < H; ++h) acc[h] += d[h];
          const int64_t chunks = (sl.row1 - sl.row0) / 8;
          for (int64_t c = 0; c < chunks; ++c) dw += buf[p].dwpart[s * chunks + c];
        }
        dweights[t * k + j] = dw;
      }
      if (bf16) {
        uint16_t* o = static_cast<uint16_t*>(dx) + t * H;
        for (int64_t h = 0; h < H; ++h) o[h] = f32_to_bf16(acc[h]);
      } else {
        std::copy(acc.begin(), acc.end(), static_cast<float*>(dx) + t * H);
      }
    }
  });
}

}  // namespace experts
}  // namespace cnuma

// ---------------------------------------------------------------------------
// Python bindings (registered into composer_numa._C by bindings.cpp). Every
// tensor is checked here, so a wrong shape, dtype or device is a ValueError and
// never an out-of-bounds access.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <optional>

namespace cnuma {
namespace {

namespace nb = nanobind;
using Array = nb::ndarray<>;

bool is_dtype(const Array& a, nb::dlpack::dtype_code code, int bits) {
  const nb::dlpack::dtype d = a.dtype();
  return d.lanes == 1 && d.bits == bits && d.code == static_cast<uint8_t>(code);
}

const char* dtype_text(experts::DType d) { return d == experts::DType::BF16 ? "bfloat16" : "float32"; }

bool is_layer_dtype(const Array& a, experts::DType d) {
  return d == experts::DType::BF16 ? is_dtype(a, nb::dlpack::dtype_code::Bfloat, 16)
                                   : is_dtype(a, nb::dlpack::dtype_code::Float, 32);
}

void check_tensor(const Array& a, const std::string& name) {
  if (a.device_type() != nb::device::cpu::value)
    throw std::invalid_argument("NumaExperts: " + name + " must be a CPU tensor");
  if (a.size() == 0) return;  // nothing is read or written
  int64_t expected = 1;
  for (size_t i = a.ndim(); i-- > 0;) {
    if (a.shape(i) != 1 && a.stride(i) != expected)
      throw std::invalid_argument("NumaExperts: " + name + " must be contiguous");
    expected *= static_cast<int64_t>(a.shape(i));
  }
}

void check_flat(const Array& a, const std::string& name, int64_t elements, bool layer_dtype,
                experts::DType d) {
  check_tensor(a, name);
  if (layer_dtype ? !is_layer_dtype(a, d) : !is_dtype(a, nb::dlpack::dtype_code::Float, 32))
    throw std::invalid_argument("NumaExperts: " + name + " must be " +
                                (layer_dtype ? dtype_text(d) : "float32"));
  if (static_cast<int64_t>(a.size()) != elements)
    throw std::invalid_argument("NumaExperts: " + name + " has " + std::to_string(a.size()) +
                                " elements, expected " + std::to_string(elements));
}

void check_matrix(const Array& a, const std::string& name, int64_t rows, int64_t cols) {
  check_tensor(a, name);
  if (a.ndim() != 2 || static_cast<int64_t>(a.shape(0)) != rows ||
      static_cast<int64_t>(a.shape(1)) != cols)
    throw std::invalid_argument("NumaExperts: " + name + " must have shape [" + std::to_string(rows) +
                                ", " + std::to_string(cols) + "]");
}

struct Call {
  int64_t tokens = 0, k = 0;
  const int64_t* ids = nullptr;
  const float* weights = nullptr;
};

Call check_routing(const experts::Experts& ex, const Array& x, const Array& ids, const Array& weights) {
  const experts::Layer& L = ex.layer();
  check_tensor(x, "x");
  if (x.ndim() != 2 || static_cast<int64_t>(x.shape(1)) != L.hidden)
    throw std::invalid_argument("NumaExperts: x must have shape [tokens, " + std::to_string(L.hidden) + "]");
  if (!is_layer_dtype(x, L.dtype))
    throw std::invalid_argument(std::string("NumaExperts: x must be ") + dtype_text(L.dtype));
  Call c;
  c.tokens = static_cast<int64_t>(x.shape(0));
  check_tensor(ids, "topk_ids");
  if (ids.ndim() != 2 || static_cast<int64_t>(ids.shape(0)) != c.tokens)
    throw std::invalid_argument("NumaExperts: topk_ids must have shape [tokens, k]");
  if (!is_dtype(ids, nb::dlpack::dtype_code::Int, 64))
    throw std::invalid_argument("NumaExperts: topk_ids must be int64");
  c.k = static_cast<int64_t>(ids.shape(1));
  check_matrix(weights, "topk_weights", c.tokens, c.k);
  if (!is_dtype(weights, nb::dlpack::dtype_code::Float, 32))
    throw std::invalid_argument("NumaExperts: topk_weights must be float32");
  if (c.tokens * c.k >= (int64_t{1} << 31))
    throw std::invalid_argument("NumaExperts: tokens * k must be below 2^31");
  c.ids = static_cast<const int64_t*>(ids.data());
  c.weights = static_cast<const float*>(weights.data());
  return c;
}

std::vector<experts::SliceData> check_weights(const experts::Experts& ex, const std::vector<Array>& w13,
                                              const std::vector<Array>& w2) {
  const size_t P = ex.slices().size();
  if (w13.size() != P || w2.size() != P)
    throw std::invalid_argument("NumaExperts: one w13 and one w2 tensor per slice are needed");
  std::vector<experts::SliceData> d(P);
  for (size_t p = 0; p < P; ++p) {
    check_flat(w13[p], "w13[" + std::to_string(p) + "]", ex.w13_elements(p), true, ex.layer().dtype);
    check_flat(w2[p], "w2[" + std::to_string(p) + "]", ex.w2_elements(p), true, ex.layer().dtype);
    d[p].w13 = w13[p].data();
    d[p].w2 = w2[p].data();
  }
  return d;
}

void check_saved(const experts::Experts& ex, std::vector<experts::SliceData>& d, int64_t slots,
                 const std::vector<Array>& gate, const std::vector<Array>& up) {
  const size_t P = ex.slices().size();
  if (gate.size() != P || up.size() != P)
    throw std::invalid_argument("NumaExperts: one saved gate and up tensor per slice are needed");
  for (size_t p = 0; p < P; ++p) {
    const experts::Slice& s = ex.slices()[p];
    const int64_t n = slots * (s.row1 - s.row0);
    check_flat(gate[p], "saved gate[" + std::to_string(p) + "]", n, false, ex.layer().dtype);
    check_flat(up[p], "saved up[" + std::to_string(p) + "]", n, false, ex.layer().dtype);
    d[p].save_gate = static_cast<float*>(gate[p].data());
    d[p].save_up = static_cast<float*>(up[p].data());
  }
}

experts::DType parse_dtype(const std::string& s) {
  if (s == "float32") return experts::DType::F32;
  if (s == "bfloat16") return experts::DType::BF16;
  throw std::invalid_argument("NumaExperts: dtype must be 'float32' or 'bfloat16', got '" + s + "'");
}

}  // namespace

void register_experts(nb::module_& m) {
  using experts::Experts;
  // A layer still referenced when the interpreter exits (a model in a script's
  // globals) is not a leak worth a warning at shutdown.
  nb::set_leak_warnings(false);
  nb::class_<Experts>(m, "Experts",
                      "Packed expert slices and their scratch buffers (composer_numa.experts drives it).")
      .def("__init__",
           [](Experts* self, int64_t num_experts, int64_t hidden, int64_t intermediate,
              const std::string& dtype, const std::vector<int>& nodes,
              const std::vector<std::vector<int32_t>>& local, const std::vector<int64_t>& rows,
              const std::vector<int64_t>& row0, const std::vector<int64_t>& row1) {
             const size_t P = nodes.size();
             if (local.size() != P || rows.size() != P || row0.size() != P || row1.size() != P)
               throw std::invalid_argument("Experts: nodes, local, rows, row0 and row1 must have one entry per slice");
             experts::Layer L;
             L.experts = num_experts;
             L.hidden = hidden;
             L.hidden_padded = (hidden + experts::kAlign - 1) / experts::kAlign * experts::kAlign;
             L.intermediate = intermediate;
             L.dtype = parse_dtype(dtype);
             std::vector<experts::Slice> slices(P);
             for (size_t p = 0; p < P; ++p) slices[p] = {nodes[p], local[p], rows[p], row0[p], row1[p]};
             new (self) Experts(L, std::move(slices));
           },
           nb::arg("num_experts"), nb::arg("hidden"), nb::arg("intermediate"), nb::arg("dtype"),
           nb::arg("nodes"), nb::arg("local"), nb::arg("rows"), nb::arg("row0"), nb::arg("row1"))
      .def_prop_ro("hidden_padded", [](const Experts& e) { return e.layer().hidden_padded; })
      .def("w13_elements", [](const Experts& e, size_t p) { return e.w13_elements(p); })
      .def("w2_elements", [](const Experts& e, size_t p) { return e.w2_elements(p); })
      .def("forward",
           [](Experts& ex, const Array& x, const Array& ids, const Array& weights, const Array& out,
              const std::vector<Array>& w13, const std::vector<Array>& w2,
              const std::optional<std::vector<Array>>& save_gate,
              const std::optional<std::vector<Array>>& save_up) {
             const Call c = check_routing(ex, x, ids, weights);
             check_matrix(out, "out", c.tokens, ex.layer().hidden);
             if (!is_layer_dtype(out, ex.layer().dtype))
               throw std::invalid_argument(std::string("NumaExperts: out must be ") + dtype_text(ex.layer().dtype));
             std::vector<experts::SliceData> d = check_weights(ex, w13, w2);
             if (save_gate.has_value() != save_up.has_value())
               throw std::invalid_argument("NumaExperts: save_gate and save_up go together");
             if (save_gate) check_saved(ex, d, c.tokens * c.k, *save_gate, *save_up);
             const void* xp = x.data();
             void* op = out.data();
             nb::gil_scoped_release release;
             ex.forward(xp, c.tokens, c.ids, c.weights, c.k, op, d);
           },
           nb::arg("x"), nb::arg("topk_ids"), nb::arg("topk_weights"), nb::arg("out"), nb::arg("w13"),
           nb::arg("w2"), nb::arg("save_gate") = nb::none(), nb::arg("save_up") = nb::none(),
           "out = experts(x) for tokens routed by topk_ids/topk_weights; GIL released.")
      .def("backward",
           [](Experts& ex, const Array& dout, const Array& x, const Array& ids, const Array& weights,
              const std::vector<Array>& w13, const std::vector<Array>& w2,
              const std::vector<Array>& save_gate, const std::vector<Array>& save_up,
              const std::optional<std::vector<Array>>& grad13,
              const std::optional<std::vector<Array>>& grad2, const Array& dx, const Array& dweights) {
             const Call c = check_routing(ex, x, ids, weights);
             const int64_t H = ex.layer().hidden;
             check_matrix(dout, "grad_output", c.tokens, H);
             check_matrix(dx, "grad_x", c.tokens, H);
             if (!is_layer_dtype(dout, ex.layer().dtype) || !is_layer_dtype(dx, ex.layer().dtype))
               throw std::invalid_argument(std::string("NumaExperts: gradients must be ") +
                                           dtype_text(ex.layer().dtype));
             check_matrix(dweights, "grad_topk_weights", c.tokens, c.k);
             if (!is_dtype(dweights, nb::dlpack::dtype_code::Float, 32))
               throw std::invalid_argument("NumaExperts: grad_topk_weights must be float32");
             std::vector<experts::SliceData> d = check_weights(ex, w13, w2);
             check_saved(ex, d, c.tokens * c.k, save_gate, save_up);
             if (grad13.has_value() != grad2.has_value())
               throw std::invalid_argument("NumaExperts: grad13 and grad2 go together");
             if (grad13) {
               if (grad13->size() != d.size() || grad2->size() != d.size())
                 throw std::invalid_argument("NumaExperts: one gradient buffer per slice is needed");
               for (size_t p = 0; p < d.size(); ++p) {
                 check_flat((*grad13)[p], "grad w13[" + std::to_string(p) + "]", ex.w13_elements(p), true,
                            ex.layer().dtype);
                 check_flat((*grad2)[p], "grad w2[" + std::to_string(p) + "]", ex.w2_elements(p), true,
                            ex.layer().dtype);
                 d[p].grad13 = (*grad13)[p].data();
                 d[p].grad2 = (*grad2)[p].data();
               }
             }
             const void* dp = dout.data();
             const void* xp = x.data();
             void* dxp = dx.data();
             float* dwp = static_cast<float*>(dweights.data());
             nb::gil_scoped_release release;
             ex.backward(dp, xp, c.tokens, c.ids, c.weights, c.k, d, dxp, dwp);
           },
           nb::arg("grad_output"), nb::arg("x"), nb::arg("topk_ids"), nb::arg("topk_weights"),
           nb::arg("w13"), nb::arg("w2"), nb::arg("save_gate"), nb::arg("save_up"), nb::arg("grad13"),
           nb::arg("grad2"), nb::arg("grad_x"), nb::arg("grad_topk_weights"),
           "Gradients of x, the routing weights and (unless grad13/grad2 are None) every slice's\n"
           "weights, overwritten in the weights' packed layout; GIL released.");
  m.def("experts_kernel",
        [](const std::string& dtype) { return experts::kernel_name(parse_dtype(dtype)); },
        nb::arg("dtype"), "The kernel path NumaExperts uses now for a dtype, e.g. 'avx512+bf16dot+amx'.");
}

}  // namespace cnuma
