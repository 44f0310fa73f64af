#include "kernels/experts/combine.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "common/bf16.h"
#include "common/checked.h"
#include "runtime/mempolicy.h"

namespace cnuma {
namespace experts {
namespace {

void store_row(const std::vector<float>& acc, bool bf16, void* dst, int64_t t) {
  const int64_t H = static_cast<int64_t>(acc.size());
  if (bf16) {
    uint16_t* o = static_cast<uint16_t*>(dst) + t * H;
    for (int64_t h = 0; h < H; ++h) o[h] = f32_to_bf16(acc[h]);
  } else {
    std::copy(acc.begin(), acc.end(), static_cast<float*>(dst) + t * H);
  }
}

double work_per_token(int64_t k, int64_t H, size_t P) {
  return static_cast<double>(k) * static_cast<double>(H) * static_cast<double>(P);
}

}  // namespace

void combine_outputs(Pool& pool, const Routing& R, int64_t tokens, int64_t k, int64_t H, int64_t Hp,
                     const std::vector<Slice>& slices, const std::vector<const float*>& y, bool bf16, void* out) {
  const size_t P = slices.size();
  for_tokens(pool, tokens, work_per_token(k, H, P), [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(H), part(H);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = R.slot[t * k + j];
        const int32_t e = R.expert[s];
        bool first = true;
        for (size_t p = 0; p < P; ++p) {
          if (slices[p].local[e] < 0) continue;
          const float* row = y[p] + s * Hp;
          if (first)
            std::copy(row, row + H, part.begin());
          else
            for (int64_t h = 0; h < H; ++h) part[h] += row[h];
          first = false;
        }
        const float w = R.weight[s];
        for (int64_t h = 0; h < H; ++h) acc[h] += w * part[h];
      }
      store_row(acc, bf16, out, t);
    }
  });
}

void combine_input_grads(Pool& pool, const Routing& R, int64_t tokens, int64_t k, int64_t H, int64_t Hp,
                         const std::vector<Slice>& slices, const std::vector<const float*>& dxp,
                         const std::vector<const float*>& dwpart, bool bf16, void* dx, float* dweights) {
  const size_t P = slices.size();
  for_tokens(pool, tokens, work_per_token(k, H, P), [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(H);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = R.slot[t * k + j];
        const int32_t e = R.expert[s];
        float dw = 0.0f;
        for (size_t p = 0; p < P; ++p) {
          const Slice& sl = slices[p];
          if (sl.local[e] < 0) continue;
          const float* d = dxp[p] + s * Hp;
          for (int64_t h = 0; h < H; ++h) acc[h] += d[h];
          const int64_t chunks = (sl.row1 - sl.row0) / 8;
          for (int64_t c = 0; c < chunks; ++c) dw += dwpart[p][s * chunks + c];
        }
        dweights[t * k + j] = dw;
      }
      store_row(acc, bf16, dx, t);
    }
  });
}

bool forward_trivial(int64_t tokens, int64_t k, size_t data, size_t slices, int64_t H, bool bf16, void* out) {
  if (tokens < 0 || k < 0) throw std::invalid_argument("tokens and k must be >= 0");
  if (data != slices) throw std::invalid_argument("one slice data entry per slice is needed");
  if (tokens == 0) return true;
  if (k == 0) {
    const int64_t bytes = checked_mul({tokens, H, int64_t{bf16 ? 2 : 4}}, "the output");
    std::memset(out, 0, to_size(bytes, "the output"));
    return true;
  }
  return false;
}

void* grow_scratch(Pool& pool, std::unique_ptr<NodeBuffer>& buf, int node, int64_t bytes) {
  const size_t want = to_size(bytes == 0 ? 64 : bytes, "an expert scratch buffer");
  if (!buf || buf->size() < want) {
    const size_t grown = buf ? std::max(want, buf->size() + buf->size() / 2) : want;
    buf.reset();  // free the old one first: the node may not hold both
    buf = NodeBuffer::allocate(&pool, grown, {node}, Policy::Preferred);
  }
  return buf->data();
}

}  // namespace experts
}  // namespace cnuma
