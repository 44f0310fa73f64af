// What the float and the quantized layers share around their kernels: the last
// step of a call (the slices' partial results summed per token in a fixed order,
// slice order then choice order, so the result does not depend on the thread
// count) and the per-slice scratch buffers.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <memory>
#include <vector>

#include "common/checked.h"
#include "kernels/experts/experts.h"
#include "kernels/experts/routing.h"
#include "runtime/node_buffer.h"
#include "runtime/pool.h"

namespace cnuma {
namespace experts {

// out[t] = sum_j weight(t, j) * (sum over the slices p holding expert(t, j) of
// y[p][slot(t, j) * Hp ...]); out is bf16 or float32 [tokens][H].
void combine_outputs(Pool& pool, const Routing& R, int64_t tokens, int64_t k, int64_t H, int64_t Hp,
                     const std::vector<Slice>& slices, const std::vector<const float*>& y, bool bf16, void* out);

// dx[t] = sum_j sum_p dxp[p][slot(t, j) * Hp ...] and dweights[t * k + j] = sum_p
// of the slice's per-8-row partial sums dwpart[p][slot * chunks ...].
void combine_input_grads(Pool& pool, const Routing& R, int64_t tokens, int64_t k, int64_t H, int64_t Hp,
                         const std::vector<Slice>& slices, const std::vector<const float*>& dxp,
                         const std::vector<const float*>& dwpart, bool bf16, void* dx, float* dweights);

// The checks every forward makes before routing: sizes, one data entry per
// slice, and the calls with nothing to compute (no tokens: nothing written; no
// choices: out is zeros). True when the call is finished.
bool forward_trivial(int64_t tokens, int64_t k, size_t data, size_t slices, int64_t H, bool bf16, void* out);

// The checks every backward makes (sizes, one data entry per slice, the saved
// pre-activations present), then dx [tokens][H] and dweights [tokens][k]
// zeroed: the kernels add into them.
template <class Data>
void backward_prologue(int64_t tokens, int64_t k, const std::vector<Data>& data, size_t slices, int64_t H, bool bf16,
                       void* dx, float* dweights) {
  if (tokens < 0 || k < 0) throw std::invalid_argument("tokens and k must be >= 0");
  if (data.size() != slices) throw std::invalid_argument("one slice data entry per slice is needed");
  for (const Data& d : data)
    if (tokens > 0 && k > 0 && (d.save_gate == nullptr || d.save_up == nullptr))
      throw std::invalid_argument("backward needs the activations saved by forward");
  if (tokens > 0) std::memset(dx, 0, to_size(checked_mul({tokens, H, int64_t{bf16 ? 2 : 4}}, "grad_x"), "grad_x"));
  const int64_t S = checked_mul(tokens, k, "the routing slots");
  if (S > 0) std::memset(dweights, 0, to_size(checked_mul(S, 4, "grad_topk_weights"), "grad_topk_weights"));
}

// A slice's scratch buffer, on its node, at least `bytes` long: grown by half
// again when too small (so a call with more tokens reallocates rarely), then
// reused by every later call. Returns its data.
void* grow_scratch(Pool& pool, std::unique_ptr<NodeBuffer>& buf, int node, int64_t bytes);

}  // namespace experts
}  // namespace cnuma
