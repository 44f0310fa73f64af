// The work items of the expert kernels and their per-ISA implementations.
//
// A forward item is two packed 16-row blocks times all tokens of one expert;
// backward items compute 8 input-gradient columns through packed blocks
// (DataArgs) or one block's weight gradient (GradArgs). scalar.cpp, avx2.cpp,
// avx512.cpp and amx.cpp implement them; dispatch.cpp chooses the path.
#pragma once

#include <cstdint>
#include <string>

#include "common/simd.h"
#include "kernels/experts/experts.h"

namespace cnuma {
namespace experts {

// Experts with at least this many tokens use AMX tiles (16 token rows each):
// one tile product covers a kilobyte of weights in 16 cycles, so even a few
// tokens stay bandwidth-bound. Below it, AVX-512 BF16 dot products (2 per
// token per 64-byte load) stream the weights with less set-up per item.
constexpr int64_t kAmxMinTokens = 4;
// Software prefetch distance of the streamed weights, 4 KiB ahead (the
// hardware prefetchers stop at 4 KiB boundaries; measured best of 1-8 KiB).
constexpr int64_t kPrefetchBytes = 4096;
constexpr int64_t kPrefetch = kPrefetchBytes / 2;  // in bf16 elements
// Spare rows after the staged activations: AMX loads whole 16-row tiles.
constexpr int64_t kSlackRows = 32;
// Decode: an expert with at most kStreamTokens tokens reads up to kStreams
// neighbouring block pairs side by side in one item. One core keeps several
// sequential streams in flight where a single stream stalls on its own
// prefetcher (measured: one stream ~60 % of the read probe at T = 1).
constexpr int64_t kStreams = 4;
constexpr int64_t kStreamTokens = 2;

// The kernels one call uses.
struct Path {
  Isa isa = Isa::Scalar;
  bool dot = false;  // BF16 dot products, AVX-512 BF16 or NEON BFDOT (bf16 weights and staged bf16 inputs)
  bool amx = false;  // AMX tiles for experts with many tokens
  int64_t streams = 1;  // block pairs one decode item may carry (FwdItem::pairs)
};

Path choose_path(DType dtype);
#if CNUMA_X86
// Whether Linux granted this process the AMX tile state (asked once; the bf16
// and the quantized layers share the answer).
bool amx_permitted();
#endif

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
  int64_t pairs = 1;    // consecutive block pairs (b0, b1 + q * pstride), > 1 only when Path::streams allows
  int64_t pstride = 0;  // elements from one pair to the next
};

// Pair q of an item as an item of its own: its blocks, and its output columns
// (16 activations after gate/up, 32 hidden rows after down).
CNUMA_INLINE FwdItem pair_of(const FwdItem& a, int64_t q, bool xbf16) {
  FwdItem r = a;
  r.pairs = 1;
  const int64_t wsz = a.wbf16 ? 2 : 4, cols = a.down ? 2 * kBlock : kBlock;
  const int64_t dsz = a.down || !xbf16 ? 4 : 2;
  r.b0 = static_cast<const char*>(a.b0) + q * a.pstride * wsz;
  r.b1 = static_cast<const char*>(a.b1) + q * a.pstride * wsz;
  r.dst = static_cast<char*>(a.dst) + q * cols * dsz;
  if (a.save_g != nullptr) {
    r.save_g = a.save_g + q * cols;
    r.save_u = a.save_u + q * cols;
  }
  return r;
}

// Rows of a [rows][stride] fp32 matrix, optionally picked through a token index.
struct Rows {
  const float* base;
  int64_t stride;
  const int64_t* index;  // slot -> row, or null for row = slot
  int64_t first;         // first slot of the expert
  int64_t offset;        // column offset added to every row
  CNUMA_INLINE const float* operator()(int64_t s) const {
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
  CNUMA_INLINE int64_t block(int64_t b) const { return (b >> 1) * sbstride + (b & 1) * kBlock * (wbf16 ? 2 : 1); }
};

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

// Per-ISA implementations (the x86 ones exist only on x86, the NEON ones only on aarch64).
void fwd_item_scalar(const FwdItem& a);
void data8_scalar(const DataArgs& a, const float* dy, float* out);
void grad_scalar(const GradArgs& a);
#if CNUMA_X86
void fwd_item_avx2(const FwdItem& a);
void data8_avx2(const DataArgs& a, const float* dy, float* out);
void grad_avx2(const GradArgs& a);
void fwd_item_avx512(const FwdItem& a);
void data8_avx512(const DataArgs& a, const float* dy, float* out);
void grad_avx512(const GradArgs& a);
void fwd_item_dot(const FwdItem& a);  // AVX-512 BF16 dot products
void fwd_item_amx(const FwdItem& a);  // AMX tiles (falls back to fwd_item_dot for few tokens)
#endif
#if CNUMA_ARM64
void fwd_item_neon(const FwdItem& a);
void data8_neon(const DataArgs& a, const float* dy, float* out);
void grad_neon(const GradArgs& a);
void fwd_item_neon_bf16(const FwdItem& a);  // BFDOT (bf16 weights and staged bf16 inputs)
#endif

// Run one item on the chosen path.
void run_fwd_item(const Path& p, const FwdItem& a);
void run_data8(Isa isa, const DataArgs& a, const float* dy, float* out);
void run_grad(Isa isa, const GradArgs& a);

}  // namespace experts
}  // namespace cnuma
