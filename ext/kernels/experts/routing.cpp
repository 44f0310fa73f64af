#include "kernels/experts/routing.h"

#include <stdexcept>
#include <string>

namespace cnuma {
namespace experts {

Routing route(int64_t experts, const int64_t* ids, const float* weights, int64_t tokens, int64_t k) {
  const int64_t slots = checked_mul(tokens, k, "the routing slots");
  Routing r;
  r.start.assign(experts + 1, 0);
  for (int64_t i = 0; i < slots; ++i) {
    const int64_t e = ids[i];
    if (e < 0 || e >= experts)
      throw std::out_of_range("NumaExperts: topk_ids[" + std::to_string(i / k) + ", " + std::to_string(i % k) +
                              "] = " + std::to_string(e) + " is outside the expert ids [0, " +
                              std::to_string(experts) + ")");
    r.start[e + 1]++;
  }
  for (int64_t e = 0; e < experts; ++e) {
    if (r.start[e + 1] > 0) r.active.push_back(static_cast<int32_t>(e));
    r.start[e + 1] += r.start[e];
  }
  std::vector<int64_t> fill(r.start.begin(), r.start.end() - 1);
  r.token.resize(slots);
  r.expert.resize(slots);
  r.weight.resize(slots);
  r.slot.resize(slots);
  for (int64_t i = 0; i < slots; ++i) {
    const int64_t e = ids[i];
    const int64_t s = fill[e]++;
    r.token[s] = i / k;
    r.expert[s] = static_cast<int32_t>(e);
    r.weight[s] = weights[i];
    r.slot[i] = s;
  }
  return r;
}

}  // namespace experts
}  // namespace cnuma
