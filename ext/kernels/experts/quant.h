// Quantized frozen experts: int8 or int4 weights with fp16 or bf16 scales, in
// the same node-local slices as the float layer (experts.h), read by integer
// dot-product kernels.
//
// Weights. Symmetric: w = s * q, with q in [-128, 127] for int8 (the quantizer
// writes [-127, 127]; GGUF's Q8_0 blocks load as they are) and q = n - 8 for int4,
// n the stored nibble 0..15 (GGUF's Q4_0: the fixed offset 8 instead of a stored
// zero point keeps one scale per group, the dot product one integer sum, and
// Q4_0 blocks load bit for bit). A scale covers `group` input elements (32, 64
// or 128) of one output row, or the whole row (int8, group 0).
//
// Packed layout: like the float layer's, two 16-row blocks interleaved per
// k-step so that a work item streams one contiguous range, but every k-step is
// 64 bytes: 32 per block, [16 rows][2 k] int8 (a step covers 2 k), or for int4
// [16 rows][2 k] bytes whose low nibbles hold k, k+1 and high nibbles k+2, k+3
// (a step covers 4 k). Scales follow the same blocks, [groups][2][16].
//   w13: [local experts][rows/16][hidden_padded/kstep][gate, up][32 bytes]
//   w2:  [local experts][hidden_padded/32][rows/kstep][2][32 bytes]
//   s13: [local experts][rows/16][hidden_padded/group or 1][gate, up][16]
//   s2:  [local experts][hidden_padded/32][rows/group or 1][2][16]
//
// Activations. Tokens (and the SwiGLU activations before the down projection)
// are quantized to int16 per "x-block" of the reduction (the weight group, or
// 256/128/64/32 elements for per-row scales): 15-bit resolution, relative
// error ~5e-5, where int8 activations would cost ~1e-2. A block's integer sum
// (int16 x int8/int4, 32-bit, exact: |sum| <= 32767 * 128 * 256 < 2^30) is converted to fp32 and
// scaled, s_x * s_w, then accumulated in fp32. Every path (scalar, AVX2,
// AVX-512, AVX-512 VNNI, AMX-INT8) forms the same exact integer sums and does
// the same fp32 operations in the same order, so the forward is bit-identical
// across paths and thread counts. The backward (gradients of x and of the
// routing weights; the weights are frozen) multiplies by the same dequantized
// weights transposed, in fp32.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/simd.h"
#include "kernels/experts/experts.h"
#include "runtime/fork_safe_mutex.h"
#include "runtime/pool.h"

namespace cnuma {
class NodeBuffer;

namespace experts {

struct QuantSpec {
  int bits = 8;             // 8 or 4
  int64_t group = 0;        // input elements per scale: 32, 64, 128; 0 = one per output row (int8 only)
  bool scale_bf16 = false;  // scales are bf16 bits (else fp16)
};

// Per-call pointers of one slice (weights are read at every call).
struct QuantSliceData {
  const uint8_t* w13 = nullptr;
  const uint8_t* w2 = nullptr;
  const uint16_t* s13 = nullptr;
  const uint16_t* s2 = nullptr;
  float* save_gate = nullptr;  // forward: [slots][row1 - row0] pre-activations for backward
  float* save_up = nullptr;
};

// Which kernels a quantized call uses: "scalar", "avx2", "avx512" with "+vnni"
// (AVX-512 VNNI dot products) and "+amx" (AMX-INT8 tiles for many tokens).
std::string quant_kernel_name();

class QuantExperts {
 public:
  // Checks the layer, slices and spec (std::invalid_argument); every size is
  // counted with overflow checks before anything is allocated.
  QuantExperts(const Layer& layer, std::vector<Slice> slices, QuantSpec spec);
  ~QuantExperts();
  QuantExperts(const QuantExperts&) = delete;
  QuantExperts& operator=(const QuantExperts&) = delete;

  const Layer& layer() const { return layer_; }
  const QuantSpec& spec() const { return spec_; }
  const std::vector<Slice>& slices() const { return slices_; }
  int64_t w13_bytes(size_t slice) const;
  int64_t w2_bytes(size_t slice) const;
  int64_t s13_elements(size_t slice) const;
  int64_t s2_elements(size_t slice) const;

  // x: [tokens][hidden] in the layer's dtype (fp32 or bf16); ids [tokens][k]
  // int64; weights [tokens][k] fp32; out [tokens][hidden] in the layer's dtype.
  void forward(Pool& pool, const void* x, int64_t tokens, const int64_t* ids, const float* weights, int64_t k,
               void* out, const std::vector<QuantSliceData>& data);

  // dout: [tokens][hidden] in the layer's dtype; dx the same; dweights
  // [tokens][k] fp32; data[p].save_* as filled by forward.
  void backward(Pool& pool, const void* dout, int64_t tokens, const int64_t* ids, const float* weights, int64_t k,
                const std::vector<QuantSliceData>& data, void* dx, float* dweights);

 private:
  void* scratch(Pool& pool, size_t p, int64_t bytes);
  int64_t xblock(int64_t reduction) const;  // activation block for a reduction of this length

  Layer layer_;
  QuantSpec spec_;
  std::vector<Slice> slices_;
  std::vector<int64_t> held_;
  ForkSafeMutex mu_;
  std::vector<std::unique_ptr<NodeBuffer>> scratch_;
};

// ------------------------------------------------------------------ kernels --

constexpr int64_t kQTokens = 64;        // tokens per forward kernel call: AMX builds weight tiles once for 4 tiles of rows
constexpr int64_t kQAmxMinTokens = 8;   // fewer tokens: the vector path wastes less
constexpr int64_t kQPrefetchBytes = 4096;
constexpr int64_t kQSlackRows = 32;     // spare staged rows: AMX loads whole 16-row tiles

// Bytes of a reduction of K elements in one interleaved pair of blocks: 32 rows * K * bits / 8.
inline int64_t qbytes(int64_t K, int bits) { return K * 4 * bits; }

// One forward item: `pairs` interleaved block pairs (32 output rows each) times
// m <= kQTokens tokens. Decode (m <= kQStreamTokens) reads up to kQStreams
// pairs side by side, one stream each; otherwise one pair after another.
constexpr int64_t kQStreams = 4;
constexpr int64_t kQStreamTokens = 2;
struct QFwdArgs {
  const uint8_t* w;   // the first pair's stream at the item's first k
  int64_t wstride;    // bytes from one pair's stream to the next
  const uint16_t* s;  // the first pair's scales: [K / xb][2][16] when grouped, else [2][16]
  int64_t sstride;    // elements from one pair's scales to the next
  int64_t pairs;      // >= 1; AMX takes one
  int64_t K;          // reduction length (a multiple of xb)
  int64_t xb;         // activation block (== group when grouped): 32, 64, 128 or 256
  bool grouped;
  int bits;
  bool sbf16;
  const int16_t* x;       // m token rows of int16 activations at the item's first k
  int64_t xs;             // their stride in elements
  const float* xscale;    // [m][xbs] activation block scales, at the item's first block
  const int32_t* xsum;    // [m][xbs] activation block sums (int4's offset)
  int64_t xbs;
  const int8_t* xh;       // AMX only: high and low bytes of x (x = 256 * xh + xl), else null
  const uint8_t* xl;
  int64_t ps;             // byte stride of xh / xl rows (plane_stride(K))
  int64_t m;
  float* out;  // [pairs][m][32] fp32
};

// Backward: out[s][0..8) = sum over rows r of dy_s[r] * W[r][c0 .. c0+8), W
// being `ngroups` interleaved block pairs (32 rows each, row = 32 i + 16 half + r)
// whose streams start at w + i * gstride bytes and scales at s + i * sstride.
struct QColsArgs {
  const uint8_t* w;
  int64_t gstride;
  const uint16_t* s;
  int64_t sstride;
  int64_t ngroups;
  int64_t c0;     // first of the 8 columns: the k index within each stream (a multiple of 8)
  int64_t group;  // 0: one scale per row
  int bits;
  bool sbf16;
  const float* dy;        // slot s's row: dy + (index ? index[s] : s) * dys
  int64_t dys;
  const int64_t* index;
  int64_t m;
  float* out;  // slot s: out + s * outs, 8 floats
  int64_t outs;
};

// Weight offset of int4: the nibble n stands for n - 8.
constexpr int32_t kInt4Offset = 8;

// Row stride of the AMX byte planes: one cache line more than the row, so that
// the 16 rows of an A tile fall in 16 different L1 sets (with K a multiple of
// 4 KiB / 2 KiB they would share one or two, and every tile load went to L2).
constexpr int64_t plane_stride(int64_t K) { return K + 64; }

void qfwd_scalar(const QFwdArgs& a);
void qcols_scalar(const QColsArgs& a);
// SwiGLU of a gate/up item's sums o ([pairs][m][32]) into act rows `stride` apart.
void qswiglu_scalar(const float* o, int64_t pairs, int64_t m, float* act, int64_t stride);
// Activations to int16 codes per block of xb, with scales, code sums and (hi, lo
// not null) AMX's byte planes.
void qquantize_scalar(const float* v, int64_t n, int64_t xb, int16_t* q, float* scale, int32_t* sum, int8_t* hi,
                      uint8_t* lo);
#if CNUMA_X86
void qfwd_avx2(const QFwdArgs& a);
void qcols_avx2(const QColsArgs& a);
void qswiglu_avx2(const float* o, int64_t pairs, int64_t m, float* act, int64_t stride);
void qquantize_avx2(const float* v, int64_t n, int64_t xb, int16_t* q, float* scale, int32_t* sum, int8_t* hi,
                    uint8_t* lo);
void qfwd_avx512(const QFwdArgs& a);
void qfwd_vnni(const QFwdArgs& a);
void qcols_avx512(const QColsArgs& a);
void qswiglu_avx512(const float* o, int64_t pairs, int64_t m, float* act, int64_t stride);
void qquantize_avx512(const float* v, int64_t n, int64_t xb, int16_t* q, float* scale, int32_t* sum, int8_t* hi,
                      uint8_t* lo);
void qfwd_amx(const QFwdArgs& a);  // needs xh / xl
#endif

struct QPath {
  Isa isa = Isa::Scalar;
  bool vnni = false;
  bool amx = false;
};
QPath choose_qpath();
void run_qfwd(const QPath& p, const QFwdArgs& a);
void run_qcols(const QPath& p, const QColsArgs& a);
void run_qswiglu(const QPath& p, const float* o, int64_t pairs, int64_t m, float* act, int64_t stride);
void run_qquantize(const QPath& p, const float* v, int64_t n, int64_t xb, int16_t* q, float* scale, int32_t* sum,
                   int8_t* hi, uint8_t* lo);

}  // namespace experts
}  // namespace cnuma
