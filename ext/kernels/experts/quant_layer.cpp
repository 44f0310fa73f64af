// The quantized layer itself: validation of its spec and slices, byte counts, scratch.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "common/checked.h"
#include "kernels/experts/quant.h"
#include "runtime/mempolicy.h"
#include "kernels/experts/combine.h"
#include "runtime/node_buffer.h"

namespace cnuma {
namespace experts {

namespace {

void require(bool ok, const std::string& why) {
  if (!ok) throw std::invalid_argument("QuantExperts: " + why);
}

// Scales per reduction of K elements (one per row when not grouped).
int64_t groups_of(int64_t K, int64_t group) { return group > 0 ? K / group : 1; }

}  // namespace

QuantExperts::QuantExperts(const Layer& layer, std::vector<Slice> slices, QuantSpec spec)
    : layer_(layer), spec_(spec), slices_(std::move(slices)) {
  // The float layer's checks of shape and slices (sizes counted at 4 bytes per
  // weight, an upper bound of these), then the quantized ones.
  const Experts shape_check(layer_, slices_);
  require(spec_.bits == 8 || spec_.bits == 4, "bits must be 8 or 4, got " + std::to_string(spec_.bits));
  const int64_t g = spec_.group;
  require(g == 0 || g == 32 || g == 64 || g == 128, "group must be 0, 32, 64 or 128, got " + std::to_string(g));
  require(spec_.bits == 8 || g > 0, "int4 needs a group size (32, 64 or 128)");
  if (g > 0) {
    require(layer_.hidden % g == 0, "hidden " + std::to_string(layer_.hidden) + " is not a multiple of the group " +
                                        std::to_string(g));
    for (const Slice& s : slices_)
      require(s.rows % g == 0 && s.row0 % g == 0 && s.row1 % g == 0,
              "slice rows and boundaries must be multiples of the group " + std::to_string(g));
  }
  const int64_t Hp = layer_.hidden_padded;
  for (const Slice& s : slices_) {
    int64_t held = 0;
    for (int32_t v : s.local) held += v >= 0;
    const int64_t w13 = checked_mul({held, s.rows, Hp, spec_.bits}, "a slice's gate and up weights") / 4;
    const int64_t w2 = checked_mul({held, s.rows, Hp, spec_.bits}, "a slice's down weights") / 8;
    const int64_t s13 = checked_mul({held, s.rows, 2, groups_of(Hp, g)}, "a slice's gate and up scales");
    const int64_t s2 = checked_mul({held, Hp, groups_of(s.rows, g)}, "a slice's down scales");
    checked_add(checked_add(w13, w2, "a slice's weights"), checked_mul(checked_add(s13, s2, "scales"), 2, "scales"),
                "a slice's weights and scales");
    held_.push_back(held);
  }
  scratch_.resize(slices_.size());
}

QuantExperts::~QuantExperts() = default;

// Counted with overflow checks in the constructor.
int64_t QuantExperts::w13_bytes(size_t p) const {
  return held_.at(p) * slices_[p].rows * layer_.hidden_padded * spec_.bits / 4;
}

int64_t QuantExperts::w2_bytes(size_t p) const {
  return held_.at(p) * slices_[p].rows * layer_.hidden_padded * spec_.bits / 8;
}

int64_t QuantExperts::s13_elements(size_t p) const {
  return held_.at(p) * slices_[p].rows * 2 * groups_of(layer_.hidden_padded, spec_.group);
}

int64_t QuantExperts::s2_elements(size_t p) const {
  return held_.at(p) * layer_.hidden_padded * groups_of(slices_[p].rows, spec_.group);
}

int64_t QuantExperts::xblock(int64_t reduction) const {
  if (spec_.group > 0) return spec_.group;
  for (int64_t b : {256, 128, 64})  // reductions are multiples of 32
    if (reduction % b == 0) return b;
  return 32;
}

void* QuantExperts::scratch(Pool& pool, size_t p, int64_t bytes) {
  return grow_scratch(pool, scratch_[p], slices_[p].node, bytes);
}

}  // namespace experts
}  // namespace cnuma
