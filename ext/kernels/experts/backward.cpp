// Backward: the gradient through down and SwiGLU per 8 intermediate columns,
// then the input gradient through gate/up and the weight gradients, reduced
// over slices per token in slice order.
#include <algorithm>
#include <cstring>
#include <mutex>
#include <stdexcept>

#include "common/bf16.h"
#include "common/checked.h"
#include "kernels/experts/experts.h"
#include "kernels/experts/microkernels.h"
#include "kernels/experts/combine.h"
#include "kernels/experts/routing.h"
#include "kernels/experts/vector.h"

namespace cnuma {
namespace experts {

void Experts::backward(Pool& pool, const void* dout, const void* x, int64_t tokens, const int64_t* ids,
                       const float* weights, int64_t k, const std::vector<SliceData>& data, void* dx,
                       float* dweights) {
  const Layer& L = layer_;
  const int64_t H = L.hidden, Hp = L.hidden_padded;
  const bool bf16 = L.dtype == DType::BF16;
  const size_t esz = bf16 ? 2 : 4;
  const int64_t kp = bf16 ? 2 : 1, ks = 2 * kBlock * kp, half = kBlock * kp;
  backward_prologue(tokens, k, data, slices_.size(), H, bf16, dx, dweights);
  bool weight_grads = true;
  for (const SliceData& d : data) weight_grads = weight_grads && d.grad13 != nullptr && d.grad2 != nullptr;
  std::lock_guard<ForkSafeMutex> lock(mu_);
  const Routing R = route(L.experts, ids, weights, tokens, k);
  const Isa isa = choose_path(L.dtype).isa;
  const int64_t S = checked_mul(tokens, k, "the routing slots");
  const size_t P = slices_.size();

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
    auto carve = [&](Carver& c) {
      buf[p].xt = c.take<float>(checked_mul(tokens, Hp, "the staged tokens"));
      buf[p].dt = c.take<float>(checked_mul(tokens, Hp, "the staged gradients"));
      buf[p].aw = c.take<float>(checked_mul(S, Ip, "the weighted activations"));
      buf[p].dgu = c.take<float>(checked_mul({S, 2, Ip}, "the gate and up gradients"));
      buf[p].dwpart = c.take<float>(checked_mul(S, Ip / 8, "the routing-weight partials"));
      buf[p].dxp = c.take<float>(checked_mul(S, Hp, "the partial input gradients"));
    };
    Carver count;
    carve(count);
    Carver c{static_cast<char*>(scratch(pool, p, count.used))};
    carve(c);
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
  run_phases(pool, slices_, items, [&](size_t phase, size_t p, const Item& it) {
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
  std::vector<const float*> dxps(P), dwparts(P);
  for (size_t p = 0; p < P; ++p) dxps[p] = buf[p].dxp, dwparts[p] = buf[p].dwpart;
  combine_input_grads(pool, R, tokens, k, H, Hp, slices_, dxps, dwparts, bf16, dx, dweights);
}

}  // namespace experts
}  // namespace cnuma
