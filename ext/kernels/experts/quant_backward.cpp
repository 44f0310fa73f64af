// Quantized backward (the weights are frozen): the gradient through down and
// SwiGLU per 8 intermediate columns, then the input gradient through gate/up,
// both multiplying by the dequantized weights transposed in fp32, reduced over
// slices per token in slice order (as backward.cpp does).
#include <algorithm>
#include <cstring>
#include <mutex>
#include <stdexcept>

#include "common/bf16.h"
#include "common/checked.h"
#include "kernels/experts/quant.h"
#include "kernels/experts/combine.h"
#include "kernels/experts/routing.h"
#include "kernels/experts/vector.h"

namespace cnuma {
namespace experts {

void QuantExperts::backward(Pool& pool, const void* dout, int64_t tokens, const int64_t* ids, const float* weights,
                            int64_t k, const std::vector<QuantSliceData>& data, void* dx, float* dweights) {
  const Layer& L = layer_;
  const int64_t H = L.hidden, Hp = L.hidden_padded, g = spec_.group;
  const bool bf16 = L.dtype == DType::BF16, grouped = g > 0;
  backward_prologue(tokens, k, data, slices_.size(), H, bf16, dx, dweights);
  std::lock_guard<ForkSafeMutex> lock(mu_);
  const Routing R = route(L.experts, ids, weights, tokens, k);
  const QPath path = choose_qpath();
  const int64_t S = checked_mul(tokens, k, "the routing slots");
  const size_t P = slices_.size();
  if (S == 0) return;

  struct Bufs {
    float* dt;      // [T][Hp] grad_output in fp32, padded
    float* dz;      // [S][Ip] gradient of the activations (before the routing weight)
    float* dgu;     // [S][Ip/16][2][16] gradients of the gate and up pre-activations
    float* dwpart;  // [S][Ip/8] partial dot products for the routing weights' gradient
    float* dxp;     // [S][Hp] partial input gradient
  };
  std::vector<Bufs> buf(P);
  for (size_t p = 0; p < P; ++p) {
    const int64_t Ip = slices_[p].row1 - slices_[p].row0;
    auto carve = [&](Carver& c) {
      buf[p].dt = c.take<float>(checked_mul(tokens, Hp, "the staged gradients"));
      buf[p].dz = c.take<float>(checked_mul(S, Ip, "the activation gradients"));
      buf[p].dgu = c.take<float>(checked_mul({S, 2, Ip}, "the gate and up gradients"));
      buf[p].dwpart = c.take<float>(checked_mul(S, Ip / 8, "the routing-weight partials"));
      buf[p].dxp = c.take<float>(checked_mul(S, Hp, "the partial input gradients"));
    };
    Carver count;
    carve(count);
    Carver c{static_cast<char*>(scratch(pool, p, count.used))};
    carve(c);
  }

  // Phase 0 stages grad_output in fp32; phase 1 takes it through down for 8
  // intermediate columns per item, then through SwiGLU; phase 2 the input
  // gradient through gate/up for 32 hidden columns per item.
  enum { kStage, kSwiGLU, kGateUp, kPhases };
  PhaseItems items(kPhases, std::vector<std::vector<Item>>(P));
  for (size_t p = 0; p < P; ++p) {
    const Slice& sl = slices_[p];
    const int64_t Ip = sl.row1 - sl.row0;
    for (int64_t t0 = 0; t0 < tokens; t0 += 16) items[kStage][p].push_back({0, static_cast<int32_t>(t0), 0});
    for (int32_t e : R.active) {
      if (sl.local[e] < 0) continue;
      for (int64_t cc = 0; cc < Ip / 8; ++cc) items[kSwiGLU][p].push_back({e, static_cast<int32_t>(cc), 0});
      for (int64_t hc = 0; hc < Hp / 32; ++hc) items[kGateUp][p].push_back({e, static_cast<int32_t>(hc), 0});
    }
  }
  const int64_t ngH = grouped ? Hp / g : 1;
  run_phases(pool, slices_, items, [&](size_t phase, size_t p, const Item& it) {
    const Slice& sl = slices_[p];
    const Bufs& b = buf[p];
    const int64_t Ip = sl.row1 - sl.row0;
    if (phase == kStage) {
      for (int64_t t = it.index; t < std::min<int64_t>(tokens, it.index + 16); ++t) {
        float* d = b.dt + t * Hp;
        if (bf16) {
          const uint16_t* h = static_cast<const uint16_t*>(dout) + t * H;
          for (int64_t i = 0; i < H; ++i) d[i] = bf16_to_f32(h[i]);
        } else {
          std::memcpy(d, static_cast<const float*>(dout) + t * H, H * sizeof(float));
        }
        std::fill(d + H, d + Hp, 0.0f);
      }
      return;
    }
    const int64_t le = sl.local[it.expert], s0 = R.start[it.expert], m = R.count(it.expert);
    QColsArgs a;
    a.group = g;
    a.bits = spec_.bits;
    a.sbf16 = spec_.scale_bf16;
    a.m = m;
    if (phase == kSwiGLU) {
      // dz[s][c] = sum over hidden rows h of dout[token(s)][h] * W2[h][c].
      const int64_t ngR = grouped ? sl.rows / g : 1;
      const int64_t pair0 = le * (Hp / (2 * kBlock));
      a.w = data[p].w2 + pair0 * qbytes(sl.rows, a.bits);
      a.gstride = qbytes(sl.rows, a.bits);
      a.s = data[p].s2 + pair0 * ngR * 32;
      a.sstride = ngR * 32;
      a.ngroups = Hp / (2 * kBlock);
      a.c0 = sl.row0 + it.index * 8;
      a.dy = b.dt;
      a.dys = Hp;
      a.index = R.token.data() + s0;
      a.out = b.dz + s0 * Ip + it.index * 8;
      a.outs = Ip;
      run_qcols(path, a);
      for (int64_t s = s0; s < s0 + m; ++s) {
        const float w = R.weight[s];
        float dot = 0.0f;
        for (int j = 0; j < 8; ++j) {
          const int64_t c = it.index * 8 + j;
          const float dzj = b.dz[s * Ip + c];
          const float gv = data[p].save_gate[s * Ip + c], uv = data[p].save_up[s * Ip + c];
          const float sg = sigmoid(gv), silu = gv * sg;
          dot += silu * uv * dzj;
          const float da = w * dzj;
          float* dgu = b.dgu + s * 2 * Ip + (c / kBlock) * 2 * kBlock + c % kBlock;
          dgu[0] = da * uv * sg * (1.0f + gv * (1.0f - sg));
          dgu[kBlock] = da * silu;
        }
        b.dwpart[s * (Ip / 8) + it.index] = dot;
      }
      return;
    }
    // kGateUp: dx[s][h] = sum over this slice's gate and up rows r of dgu[s][r] * W13[r][h].
    const int64_t blk0 = le * (sl.rows / kBlock) + sl.row0 / kBlock;
    a.w = data[p].w13 + blk0 * qbytes(Hp, a.bits);
    a.gstride = qbytes(Hp, a.bits);
    a.s = data[p].s13 + blk0 * ngH * 32;
    a.sstride = ngH * 32;
    a.ngroups = Ip / kBlock;
    a.dy = b.dgu + s0 * 2 * Ip;
    a.dys = 2 * Ip;
    a.index = nullptr;
    a.outs = Hp;
    for (int64_t h0 = it.index * 32; h0 < it.index * 32 + 32; h0 += 8) {
      a.c0 = h0;
      a.out = b.dxp + s0 * Hp + h0;
      run_qcols(path, a);
    }
  });

  // Reduce the partial input gradients and routing-weight gradients over slices.
  std::vector<const float*> dxps(P), dwparts(P);
  for (size_t p = 0; p < P; ++p) dxps[p] = buf[p].dxp, dwparts[p] = buf[p].dwpart;
  combine_input_grads(pool, R, tokens, k, H, Hp, slices_, dxps, dwparts, bf16, dx, dweights);
}

}  // namespace experts
}  // namespace cnuma
