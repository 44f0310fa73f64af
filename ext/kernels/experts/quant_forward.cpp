// Quantized forward: stage each slice's token rows as int16 blocks (grouped by
// expert), gate/up with SwiGLU per 16 intermediate rows, quantize the
// activations the same way, down per 32 hidden rows, then sum the slices'
// partial outputs per token in slice order (as forward.cpp does).
#include <algorithm>
#include <cstring>
#include <mutex>
#include <stdexcept>

#include "common/bf16.h"
#include "common/checked.h"
#include "kernels/experts/quant.h"
#include "kernels/experts/combine.h"
#include "kernels/experts/routing.h"

namespace cnuma {
namespace experts {

namespace {

// Staged activation rows of one reduction (tokens for gate/up, SwiGLU
// activations for down): int16 codes, per-block scales and sums, AMX byte planes
// (null off AMX), `K` elements per row in blocks of `xb`.
struct StagedRows {
  const int16_t* q;
  const float* scale;
  const int32_t* sum;
  const int8_t* hi;
  const uint8_t* lo;
  int64_t K, xb;  // the planes' rows are plane_stride(K) bytes apart
};

// Points a's activation side at the rows of `r` from slot s on.
void point_at(QFwdArgs& a, const StagedRows& r, int64_t s) {
  a.K = r.K;
  a.xb = r.xb;
  a.xs = r.K;
  a.xbs = r.K / r.xb;
  a.x = r.q + s * r.K;
  a.xscale = r.scale + s * a.xbs;
  a.xsum = r.sum + s * a.xbs;
  a.ps = plane_stride(r.K);
  a.xh = r.hi != nullptr ? r.hi + s * a.ps : nullptr;
  a.xl = r.lo != nullptr ? r.lo + s * a.ps : nullptr;
}

}  // namespace

void QuantExperts::forward(Pool& pool, const void* x, int64_t tokens, const int64_t* ids, const float* weights,
                           int64_t k, void* out, const std::vector<QuantSliceData>& data) {
  const Layer& L = layer_;
  const int64_t H = L.hidden, Hp = L.hidden_padded, bits = spec_.bits, g = spec_.group;
  const bool bf16 = L.dtype == DType::BF16, grouped = g > 0;
  const size_t esz = bf16 ? 2 : 4;
  if (forward_trivial(tokens, k, data.size(), slices_.size(), H, bf16, out)) return;
  std::lock_guard<ForkSafeMutex> lock(mu_);
  const Routing R = route(L.experts, ids, weights, tokens, k);
  const QPath path = choose_qpath();
  const int64_t S = checked_mul(tokens, k, "the routing slots");
  const int64_t rows_staged = checked_add(S, kQSlackRows, "the staged tokens");
  const size_t P = slices_.size();
  const int64_t xbH = xblock(Hp);

  struct Bufs {
    int16_t* tq;  // [tokens][Hp] each token's codes, once (a token has k slots)
    int8_t* th;   // [tokens][plane_stride(Hp)] their AMX byte planes (null off AMX)
    uint8_t* tl;
    float* tsc;   // [tokens][Hp / xbH] their block scales
    int32_t* tsm; // [tokens][Hp / xbH] their block sums
    int16_t* xq;  // [S + slack][Hp] token codes grouped by expert
    float* xsc;   // [S][Hp / xbH] their block scales
    int32_t* xsm; // [S][Hp / xbH] their block sums
    int8_t* xh;   // AMX byte planes of xq (null off AMX)
    uint8_t* xl;
    float* act;   // [S][Ip] SwiGLU activations in fp32
    int16_t* aq;  // [S + slack][Ip] their codes, scales, sums, byte planes
    float* asc;
    int32_t* asm_;
    int8_t* ah;
    uint8_t* al;
    float* y;     // [S][Hp] this slice's partial expert outputs
  };
  std::vector<Bufs> buf(P);
  for (size_t p = 0; p < P; ++p) {
    const int64_t Ip = slices_[p].row1 - slices_[p].row0, xbI = xblock(Ip);
    auto carve = [&](Carver& c) {
      Bufs& b = buf[p];
      b.tq = c.take<int16_t>(checked_mul(tokens, Hp, "the token codes"));
      b.tsc = c.take<float>(checked_mul(tokens, Hp / xbH, "the token scales"));
      b.tsm = c.take<int32_t>(checked_mul(tokens, Hp / xbH, "the token sums"));
      b.xq = c.take<int16_t>(checked_mul(rows_staged, Hp, "the staged tokens"));
      b.xsc = c.take<float>(checked_mul(S, Hp / xbH, "the token scales"));
      b.xsm = c.take<int32_t>(checked_mul(S, Hp / xbH, "the token sums"));
      b.act = c.take<float>(checked_mul(S, Ip, "the activations"));
      b.aq = c.take<int16_t>(checked_mul(rows_staged, Ip, "the activation codes"));
      b.asc = c.take<float>(checked_mul(S, Ip / xbI, "the activation scales"));
      b.asm_ = c.take<int32_t>(checked_mul(S, Ip / xbI, "the activation sums"));
      b.y = c.take<float>(checked_mul(S, Hp, "the partial outputs"));
      b.th = nullptr;
      b.tl = nullptr;
      b.xh = nullptr;
      b.xl = nullptr;
      b.ah = nullptr;
      b.al = nullptr;
      if (path.amx) {
        b.th = c.take<int8_t>(checked_mul(tokens, plane_stride(Hp), "the token codes"));
        b.tl = c.take<uint8_t>(checked_mul(tokens, plane_stride(Hp), "the token codes"));
        b.xh = c.take<int8_t>(checked_mul(rows_staged, plane_stride(Hp), "the staged tokens"));
        b.xl = c.take<uint8_t>(checked_mul(rows_staged, plane_stride(Hp), "the staged tokens"));
        b.ah = c.take<int8_t>(checked_mul(rows_staged, plane_stride(Ip), "the activation codes"));
        b.al = c.take<uint8_t>(checked_mul(rows_staged, plane_stride(Ip), "the activation codes"));
      }
    };
    Carver count;
    carve(count);
    Carver c{static_cast<char*>(scratch(pool, p, count.used))};
    carve(c);
    if (path.amx) {  // the slack rows AMX tiles read past the last token: defined values
      const int64_t pH = plane_stride(Hp), pI = plane_stride(Ip);
      std::memset(buf[p].xh + S * pH, 0, kQSlackRows * pH);
      std::memset(buf[p].xl + S * pH, 0, kQSlackRows * pH);
      std::memset(buf[p].ah + S * pI, 0, kQSlackRows * pI);
      std::memset(buf[p].al + S * pI, 0, kQSlackRows * pI);
    }
  }

  // Phase 0 quantizes each token once; 1 copies the codes to its slots, grouped
  // by expert; 2 runs gate and up on 16 rows of one expert per item with SwiGLU;
  // 3 quantizes the activations; 4 runs down on 32 hidden rows.
  enum { kTokens, kStage, kGateUp, kQuantAct, kDown, kPhases };
  PhaseItems items(kPhases, std::vector<std::vector<Item>>(P));
  for (size_t p = 0; p < P; ++p) {
    const Slice& sl = slices_[p];
    for (int64_t t0 = 0; t0 < tokens; t0 += 32) items[kTokens][p].push_back({0, static_cast<int32_t>(t0), 0});
    for (int64_t s0 = 0; s0 < S; s0 += 32) {
      items[kStage][p].push_back({0, static_cast<int32_t>(s0), 0});
      items[kQuantAct][p].push_back({0, static_cast<int32_t>(s0), 0});
    }
    for (int32_t e : R.active) {
      if (sl.local[e] < 0) continue;
      // Decode: kQStreams consecutive blocks per item, read side by side.
      const int64_t per = R.count(e) <= kQStreamTokens ? kQStreams : 1;
      const int64_t ib1 = sl.row1 / kBlock, hb1 = Hp / (2 * kBlock);
      for (int64_t ib = sl.row0 / kBlock; ib < ib1; ib += per)
        items[kGateUp][p].push_back(
            {e, static_cast<int32_t>(ib), 0, static_cast<int32_t>(std::min(per, ib1 - ib))});
      for (int64_t hb = 0; hb < hb1; hb += per)
        items[kDown][p].push_back({e, static_cast<int32_t>(hb), 0, static_cast<int32_t>(std::min(per, hb1 - hb))});
    }
  }
  const int64_t ngH = grouped ? Hp / g : 1;
  run_phases(pool, slices_, items, [&](size_t phase, size_t p, const Item& it) {
    const Slice& sl = slices_[p];
    const Bufs& b = buf[p];
    const int64_t Ip = sl.row1 - sl.row0, xbI = xblock(Ip);
    if (phase == kTokens) {
      std::vector<float> row(Hp, 0.0f);
      for (int64_t t = it.index; t < std::min<int64_t>(tokens, it.index + 32); ++t) {
        const char* src = static_cast<const char*>(x) + t * H * esz;
        if (bf16) {
          const uint16_t* h = reinterpret_cast<const uint16_t*>(src);
          for (int64_t i = 0; i < H; ++i) row[i] = bf16_to_f32(h[i]);
        } else {
          std::memcpy(row.data(), src, H * sizeof(float));
        }
        const int64_t pt = t * plane_stride(Hp);
        run_qquantize(path, row.data(), Hp, xbH, b.tq + t * Hp, b.tsc + t * (Hp / xbH), b.tsm + t * (Hp / xbH),
                      path.amx ? b.th + pt : nullptr, path.amx ? b.tl + pt : nullptr);
      }
      return;
    }
    if (phase == kStage || phase == kQuantAct) {
      const int64_t nbH = Hp / xbH;
      for (int64_t s = it.index; s < std::min<int64_t>(S, it.index + 32); ++s) {
        if (sl.local[R.expert[s]] < 0) continue;
        if (phase == kStage) {
          const int64_t t = R.token[s];
          std::memcpy(b.xq + s * Hp, b.tq + t * Hp, Hp * sizeof(int16_t));
          std::memcpy(b.xsc + s * nbH, b.tsc + t * nbH, nbH * sizeof(float));
          std::memcpy(b.xsm + s * nbH, b.tsm + t * nbH, nbH * sizeof(int32_t));
          if (path.amx) {
            const int64_t pH = plane_stride(Hp);
            std::memcpy(b.xh + s * pH, b.th + t * pH, Hp);
            std::memcpy(b.xl + s * pH, b.tl + t * pH, Hp);
          }
        } else {
          const int64_t pa = s * plane_stride(Ip);
          run_qquantize(path, b.act + s * Ip, Ip, xbI, b.aq + s * Ip, b.asc + s * (Ip / xbI), b.asm_ + s * (Ip / xbI),
                        path.amx ? b.ah + pa : nullptr, path.amx ? b.al + pa : nullptr);
        }
      }
      return;
    }
    const int64_t le = sl.local[it.expert], s0 = R.start[it.expert], m = R.count(it.expert);
    alignas(64) float o[std::max(kQTokens, kQStreams * kQStreamTokens) * 32];
    QFwdArgs a;
    a.bits = static_cast<int>(bits);
    a.grouped = grouped;
    a.sbf16 = spec_.scale_bf16;
    a.pairs = it.count;
    a.out = o;
    if (phase == kGateUp) {
      const int64_t blk = le * (sl.rows / kBlock) + it.index;
      a.w = data[p].w13 + blk * qbytes(Hp, a.bits);
      a.wstride = qbytes(Hp, a.bits);
      a.s = data[p].s13 + blk * ngH * 32;
      a.sstride = ngH * 32;
      const StagedRows rows{b.xq, b.xsc, b.xsm, b.xh, b.xl, Hp, xbH};
      const int64_t col = it.index * kBlock - sl.row0;
      const bool save = data[p].save_gate != nullptr && data[p].save_up != nullptr;
      for (int64_t c0 = 0; c0 < m; c0 += kQTokens) {
        const int64_t s = s0 + c0;
        a.m = std::min(kQTokens, m - c0);
        point_at(a, rows, s);
        run_qfwd(path, a);
        run_qswiglu(path, o, it.count, a.m, b.act + s * Ip + col, Ip);
        if (save)
          for (int64_t q = 0; q < it.count; ++q)
            for (int64_t c = 0; c < a.m; ++c) {
              const float* oc = o + (q * a.m + c) * 32;
              const int64_t at = (s + c) * Ip + col + q * kBlock;
              std::memcpy(data[p].save_gate + at, oc, kBlock * sizeof(float));
              std::memcpy(data[p].save_up + at, oc + kBlock, kBlock * sizeof(float));
            }
      }
    } else {  // kDown: hidden rows 32 * index .. + 32 over this slice's intermediate rows
      const int64_t pair = le * (Hp / (2 * kBlock)) + it.index;
      const int64_t ngR = grouped ? sl.rows / g : 1;
      a.w = data[p].w2 + pair * qbytes(sl.rows, a.bits) + qbytes(sl.row0, a.bits);
      a.wstride = qbytes(sl.rows, a.bits);
      a.s = data[p].s2 + pair * ngR * 32 + (grouped ? sl.row0 / g * 32 : 0);
      a.sstride = ngR * 32;
      const StagedRows rows{b.aq, b.asc, b.asm_, b.ah, b.al, Ip, xbI};
      for (int64_t c0 = 0; c0 < m; c0 += kQTokens) {
        const int64_t s = s0 + c0;
        a.m = std::min(kQTokens, m - c0);
        point_at(a, rows, s);
        run_qfwd(path, a);
        for (int64_t q = 0; q < it.count; ++q)
          for (int64_t c = 0; c < a.m; ++c)
            std::memcpy(b.y + (s + c) * Hp + (it.index + q) * 32, o + (q * a.m + c) * 32, 32 * sizeof(float));
      }
    }
  });

  // out[t] = sum_j w[t, j] * sum over slices of y[slot(t, j)], in fixed order.
  std::vector<const float*> ys(P);
  for (size_t p = 0; p < P; ++p) ys[p] = buf[p].y;
  combine_outputs(pool, R, tokens, k, H, Hp, slices_, ys, bf16, out);
}

}  // namespace experts
}  // namespace cnuma
