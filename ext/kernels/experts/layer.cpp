// The layer itself: validation of its shape and slices, element counts, scratch.
#include <algorithm>
#include <climits>
#include <stdexcept>
#include <string>

#include "common/checked.h"
#include "kernels/experts/experts.h"
#include "runtime/mempolicy.h"
#include "kernels/experts/combine.h"
#include "runtime/node_buffer.h"

namespace cnuma {
namespace experts {

namespace {

// Work items index blocks, rows and experts with int32: larger layers are refused.
constexpr int64_t kMaxIndex = INT32_MAX;

void require(bool ok, const std::string& why) {
  if (!ok) throw std::invalid_argument("Experts: " + why);
}

}  // namespace

Experts::Experts(const Layer& layer, std::vector<Slice> slices) : layer_(layer), slices_(std::move(slices)) {
  const Layer& L = layer_;
  require(L.experts > 0 && L.hidden > 0 && L.intermediate > 0, "experts, hidden and intermediate must be positive");
  require(L.experts <= kMaxIndex, "at most 2^31 - 1 experts");
  require(L.hidden <= kMaxIndex && L.intermediate <= kMaxIndex, "hidden and intermediate must be below 2^31");
  require(L.hidden_padded == checked_round_up(L.hidden, kAlign, "hidden"),
          "hidden_padded must be hidden rounded up to a multiple of 32");
  require(!slices_.empty(), "at least one slice is needed");
  const int64_t esz = L.dtype == DType::BF16 ? 2 : 4;
  for (const Slice& s : slices_) {
    require(s.node >= 0 && s.node < kMaxNodes, "slice node " + std::to_string(s.node) + " is out of range");
    require(static_cast<int64_t>(s.local.size()) == L.experts,
            "each slice maps every expert id (-1 when it does not hold it)");
    require(s.rows > 0 && s.rows <= kMaxIndex && s.rows % kAlign == 0 && s.row0 >= 0 && s.row1 > s.row0 &&
                s.row1 <= s.rows && s.row0 % kAlign == 0 && s.row1 % kAlign == 0,
            "slice rows must be positive multiples of 32 below 2^31 with 0 <= row0 < row1 <= rows");
    int64_t held = 0;
    for (int32_t v : s.local) held += v >= 0;
    std::vector<char> seen(static_cast<size_t>(held), 0);
    for (int32_t v : s.local) {
      if (v < 0) continue;
      require(v < held && !seen[v], "slice expert indices must be 0..n-1, each once");
      seen[v] = 1;
    }
    // Both buffers of the slice, in bytes, must be countable: refuse here what
    // would overflow later (the caller allocates these sizes).
    const int64_t w13 = checked_mul({held, 2, s.rows, L.hidden_padded, esz}, "a slice's gate and up weights");
    const int64_t w2 = checked_mul({held, s.rows, L.hidden_padded, esz}, "a slice's down weights");
    checked_add(w13, w2, "a slice's weights");
    held_.push_back(held);
  }
  scratch_.resize(slices_.size());
}

Experts::~Experts() = default;

int64_t Experts::w13_elements(size_t p) const {
  const Slice& s = slices_.at(p);
  return held_[p] * 2 * s.rows * layer_.hidden_padded;  // counted with overflow checks in the constructor
}

int64_t Experts::w2_elements(size_t p) const {
  const Slice& s = slices_.at(p);
  return held_[p] * s.rows * layer_.hidden_padded;
}

void* Experts::scratch(Pool& pool, size_t p, int64_t bytes) {
  return grow_scratch(pool, scratch_[p], slices_[p].node, bytes);
}

}  // namespace experts
}  // namespace cnuma
