// Forward: stage the tokens of each slice grouped by expert, gate/up with
// SwiGLU per 16 intermediate rows, down per 32 hidden rows, then sum the
// slices' partial outputs per token in slice order.
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

namespace cnuma {
namespace experts {

void Experts::forward(Pool& pool, const void* x, int64_t tokens, const int64_t* ids, const float* weights,
                      int64_t k, void* out, const std::vector<SliceData>& data) {
  const Layer& L = layer_;
  const int64_t H = L.hidden, Hp = L.hidden_padded;
  const bool bf16 = L.dtype == DType::BF16;
  const size_t esz = bf16 ? 2 : 4;
  // Packed layout (see experts.h): 32-row super-blocks, two 16-row blocks
  // interleaved per k-step, so every work item streams one contiguous range.
  const int64_t kp = bf16 ? 2 : 1, ks = 2 * kBlock * kp, half = kBlock * kp;
  if (forward_trivial(tokens, k, data.size(), slices_.size(), H, bf16, out)) return;
  std::lock_guard<ForkSafeMutex> lock(mu_);
  const Routing R = route(L.experts, ids, weights, tokens, k);
  const Path path = choose_path(L.dtype);
  const size_t xsz = path.dot ? 2 : 4;
  const int64_t S = checked_mul(tokens, k, "the routing slots");
  // Staged token rows are one cache line longer than a row: with hidden a multiple of
  // 2048 the 16 rows of an AMX tile would otherwise share one L1 set and evict each other.
  const int64_t Hs = Hp + 64 / static_cast<int64_t>(xsz);
  const size_t P = slices_.size();

  struct Bufs {
    char* xs;   // [S + spare][Hs] token rows grouped by expert, in the kernel's input format
    char* act;  // [S + spare][Ip] SwiGLU activations, same format
    float* y;   // [S][Hp] this slice's partial expert outputs
  };
  std::vector<Bufs> buf(P);
  for (size_t p = 0; p < P; ++p) {
    const int64_t Ip = slices_[p].row1 - slices_[p].row0;
    const int64_t rows = checked_add(S, kSlackRows, "the staged tokens");
    auto carve = [&](Carver& c) {
      buf[p].xs = c.take<char>(checked_mul({rows, Hs, static_cast<int64_t>(xsz)}, "the staged tokens"));
      buf[p].act = c.take<char>(checked_mul({rows, Ip, static_cast<int64_t>(xsz)}, "the activations"));
      buf[p].y = c.take<float>(checked_mul(S, Hp, "the partial outputs"));
    };
    Carver count;
    carve(count);
    Carver c{static_cast<char*>(scratch(pool, p, count.used))};
    carve(c);
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
      // Decode: up to path.streams neighbouring pairs per item, read side by side.
      const int64_t per = R.count(e) <= kStreamTokens ? path.streams : 1;
      const int64_t ib1 = sl.row1 / kBlock, hb1 = Hp / kBlock;
      for (int64_t ib = sl.row0 / kBlock; ib < ib1; ib += per)
        items[kGateUp][p].push_back({e, static_cast<int32_t>(ib), 0, static_cast<int32_t>(std::min(per, ib1 - ib))});
      for (int64_t hb = 0; hb < hb1; hb += 2 * per)
        items[kDown][p].push_back(
            {e, static_cast<int32_t>(hb), 0, static_cast<int32_t>(std::min(per, (hb1 - hb) / 2))});
    }
  }
  run_phases(pool, slices_, items, [&](size_t phase, size_t p, const Item& it) {
    const Slice& sl = slices_[p];
    const int64_t Ip = sl.row1 - sl.row0;
    if (phase == kStage) {
      for (int64_t s = it.index; s < std::min<int64_t>(S, it.index + 32); ++s) {
        if (sl.local[R.expert[s]] < 0) continue;
        const char* src = static_cast<const char*>(x) + R.token[s] * H * esz;
        char* dst = buf[p].xs + s * Hs * xsz;
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
    a.pairs = it.count;
    if (phase == kGateUp) {
      const int64_t col = it.index * kBlock - sl.row0;
      a.b0 = static_cast<const char*>(data[p].w13) + (le * (sl.rows / kBlock) + it.index) * 2 * kBlock * Hp * esz;
      a.b1 = static_cast<const char*>(a.b0) + half * esz;
      a.pstride = 2 * kBlock * Hp;
      a.K = Hp;
      a.x = buf[p].xs + s0 * Hs * xsz;
      a.xs = Hs;
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
      a.pstride = 2 * kBlock * sl.rows;
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
  std::vector<const float*> ys(P);
  for (size_t p = 0; p < P; ++p) ys[p] = buf[p].y;
  combine_outputs(pool, R, tokens, k, H, Hp, slices_, ys, bf16, out);
}

}  // namespace experts
}  // namespace cnuma
