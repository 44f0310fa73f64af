// The forward item on AMX tiles (bf16 weights, experts with many tokens).
#include "common/simd.h"

#if CNUMA_X86

#include <algorithm>

#include "kernels/experts/generic.h"
#include "kernels/experts/amx_tiles.h"

namespace cnuma {
namespace experts {
namespace {

// AMX: C tiles 0-3 = (tokens 0-15, 16-31) x (block 0, block 1); A tiles 4-5 hold
// 16 token rows x 32 k; B tiles 6-7 are 32 k of one block: 16 k-steps of the
// packed layout, one 64-byte row each. Rows past the last token read spare
// rows and are discarded.
template <bool TWO>
CNUMA_TARGET_AMX inline void amx_tiles(const uint16_t* b0, const uint16_t* b1, int64_t ks, int64_t K,
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

}  // namespace

CNUMA_TARGET_AMX void fwd_item_amx(const FwdItem& a) {
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

}  // namespace experts
}  // namespace cnuma

#endif  // CNUMA_X86
