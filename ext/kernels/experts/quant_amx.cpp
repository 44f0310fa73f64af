// The quantized forward item on AMX-INT8 tiles (many tokens per expert).
//
// AMX multiplies bytes, so the int16 activations go in as two byte planes,
// x = 256 * xh + xl (xh signed, xl unsigned, staged by the forward): two tile
// products per weight tile, tdpbssd / tdpbusd for int8 weights and tdpbsud /
// tdpbuud for int4 nibbles, combined as 256 * C_h + C_l. These are the same exact
// integer block sums the vector paths form, and the fp32 part is ZmmOps::update,
// so this path gives the same bits as every other one. B tiles (16 columns x
// 4 k) are built per activation block from the packed 2-k steps with one
// 16-bit interleave per tile row.
#include "common/simd.h"

#if CNUMA_X86

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/experts/quant.h"
#include "kernels/experts/vector.h"
#include "kernels/experts/amx_tiles.h"

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx2,fma")

#include "kernels/experts/quant_generic.h"
#include "kernels/experts/quant_zmm.h"

namespace cnuma {
namespace experts {
namespace {

// Tiles: 0-3 C (block 0: high, low plane; block 1: high, low), 4-5 A (xh, xl:
// 16 tokens x kt bytes), 6-7 B (block 0, 1: kt/4 rows of 16 columns x 4 k).
void configure(int64_t kt) {
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  for (int t = 4; t < 6; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = static_cast<uint16_t>(kt);
  }
  for (int t = 6; t < 8; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(kt / 4);
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// One B tile row from two 32-byte [16 columns][2 k] halves: column n's four k.
CNUMA_INLINE void b_row(__m256i first, __m256i second, uint8_t* dst) {
  const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                       37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i r = _mm512_permutex2var_epi16(_mm512_castsi256_si512(first), idx, _mm512_castsi256_si512(second));
  _mm512_storeu_si512(dst, r);
}

// B tiles of both blocks for k in [k0, k0 + kt) of an activation block's stream
// (k0 relative to the block).
CNUMA_INLINE void build_b(const uint8_t* w, int bits, int64_t k0, int64_t kt, uint8_t* bt) {
  const __m256i mask = _mm256_set1_epi8(0x0f);
  for (int64_t i = 0; i < kt / 4; ++i) {
    const int64_t quad = k0 / 4 + i;
    for (int half = 0; half < 2; ++half) {
      uint8_t* dst = bt + half * 1024 + i * 64;
      if (bits == 8) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2 * quad * 64 + half * 32));
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (2 * quad + 1) * 64 + half * 32));
        b_row(a, b, dst);
      } else {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + quad * 64 + half * 32));
        b_row(_mm256_and_si256(v, mask), _mm256_and_si256(_mm256_srli_epi16(v, 4), mask), dst);
      }
    }
  }
}

}  // namespace

void qfwd_amx(const QFwdArgs& a) {
  const int64_t kt = a.xb % 64 == 0 ? 64 : 32, chunks = a.xb / kt;
  configure(kt);
  // B tiles of one activation block (xb <= 256: at most 4 chunks of 64 k x 2 blocks x 1 KiB),
  // built once and used by every 16-token group of the call.
  alignas(64) uint8_t bt[4][2 * 1024];
  alignas(64) int32_t c[4][16][16];
  alignas(64) float sw[32];
  std::fill(a.out, a.out + a.m * 32, 0.0f);
  if (!a.grouped) qgen::scales32(a.s, a.sbf16, sw);
  const int64_t nb = a.K / a.xb, step = qbytes(a.xb, a.bits);
  // The next block's lines are prefetched a few per tile step: issued all at
  // once they fill the line-fill buffers and the core stalls on the prefetches
  // (a third of the time at 512 tokens) instead of multiplying meanwhile.
  const int64_t lines = step / 64, slots = (a.m + 15) / 16 * chunks, per = (lines + slots - 1) / slots;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* w = a.w + b * step;
    if (a.grouped) qgen::scales32(a.s + b * 32, a.sbf16, sw);
    for (int64_t ch = 0; ch < chunks; ++ch) build_b(w, a.bits, ch * kt, kt, bt[ch]);
    int64_t line = 0;
    for (int64_t t0 = 0; t0 < a.m; t0 += 16) {  // rows past m are staged slack: their sums are dropped
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t ch = 0; ch < chunks; ++ch) {
        for (const int64_t end = std::min(lines, line + per); line < end; ++line)
          __builtin_prefetch(w + step + line * 64, 0, 3);
        const int64_t k0 = b * a.xb + ch * kt;
        _tile_loadd(4, a.xh + t0 * a.ps + k0, a.ps);
        _tile_loadd(5, a.xl + t0 * a.ps + k0, a.ps);
        _tile_loadd(6, bt[ch], 64);
        _tile_loadd(7, bt[ch] + 1024, 64);
        if (a.bits == 8) {
          _tile_dpbssd(0, 4, 6);
          _tile_dpbusd(1, 5, 6);
          _tile_dpbssd(2, 4, 7);
          _tile_dpbusd(3, 5, 7);
        } else {
          _tile_dpbsud(0, 4, 6);
          _tile_dpbuud(1, 5, 6);
          _tile_dpbsud(2, 4, 7);
          _tile_dpbuud(3, 5, 7);
        }
      }
      _tile_stored(0, c[0], 64);
      _tile_stored(1, c[1], 64);
      _tile_stored(2, c[2], 64);
      _tile_stored(3, c[3], 64);
      for (int64_t t = t0; t < std::min(a.m, t0 + 16); ++t) {
        const int64_t i = t * a.xbs + b;
        const int32_t comp = a.bits == 4 ? kInt4Offset * a.xsum[i] : 0;
        for (int half = 0; half < 2; ++half) {
          const __m512i hi = _mm512_loadu_si512(c[2 * half][t - t0]), lo = _mm512_loadu_si512(c[2 * half + 1][t - t0]);
          const __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(hi, 8), lo);
          ZmmOps::update(a.out + t * 32 + half * 16, sum, comp, a.xscale[i], sw + half * 16, a.grouped);
        }
      }
    }
  }
  if (!a.grouped) qgen::finish_rows(a.out, a.m, sw);
  _tile_release();
}

}  // namespace experts
}  // namespace cnuma

#pragma GCC pop_options

#endif  // CNUMA_X86
