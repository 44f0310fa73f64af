// Mixture-of-experts SwiGLU kernels, down(silu(gate(x)) * up(x)), over expert
// weights held in node-local slices and computed by each node's own workers.
//
// Weights are packed in blocks of 16 output rows so that one 64-byte load is
// one k-step of 16 rows: bf16 stores a pair of k per row (what AVX-512 BF16
// dot products and AMX B tiles consume directly), fp32 one k per row. Two
// blocks computed together (gate and up; two neighbouring blocks of down) are
// interleaved per k-step, so each work item reads one contiguous stream:
//   w13: [local experts][rows/16][hidden_padded/kp][gate, up][16][kp]
//   w2:  [local experts][hidden_padded/32][rows/kp][2][16][kp]      (kp = 2 bf16, 1 fp32)
// A slice stores `rows` intermediate rows of each of its experts and computes
// rows [row0, row1) of them: `split` stores a slice of every expert, `by-expert`
// whole experts, `replicate` every expert whole on each node with the rows
// divided between the copies. Partial outputs are summed over slices in fp32,
// always in slice order, so results do not depend on the number of threads.
//
// Files: layer.cpp (this class), forward.cpp, backward.cpp, routing.{h,cpp}
// (tokens grouped by expert; the phase scheduler), microkernels.h and
// dispatch.cpp (work items and the kernel path), vector.h/generic.h (16-lane
// primitives and kernels compiled per ISA), scalar/avx2/avx512/amx.cpp.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/fork_safe_mutex.h"
#include "runtime/pool.h"

namespace cnuma {
class NodeBuffer;

namespace experts {

enum class DType { F32, BF16 };

constexpr int64_t kBlock = 16;  // output rows per packed block
constexpr int64_t kAlign = 32;  // hidden padding and slice boundaries: one AMX k-tile of bf16

struct Layer {
  int64_t experts = 0;
  int64_t hidden = 0;
  int64_t hidden_padded = 0;  // hidden rounded up to kAlign
  int64_t intermediate = 0;   // per expert, before padding
  DType dtype = DType::F32;
};

struct Slice {
  int node = 0;
  std::vector<int32_t> local;  // expert id -> index in this slice's buffers, -1 when absent
  int64_t rows = 0;            // intermediate rows stored per expert (multiple of kAlign)
  int64_t row0 = 0, row1 = 0;  // the stored rows this slice computes (multiples of kAlign)
};

// Per-call pointers of one slice. The weights are read at every call (an
// optimizer may have moved them); the rest are outputs.
struct SliceData {
  const void* w13 = nullptr;
  const void* w2 = nullptr;
  float* save_gate = nullptr;  // forward: [slots][row1 - row0] pre-activations for backward
  float* save_up = nullptr;    // (both null at inference)
  void* grad13 = nullptr;      // backward: gradients in the weights' layout (replicas share one)
  void* grad2 = nullptr;
};

// Which kernels a call uses: "avx512" (with "+bf16dot" and "+amx" when used),
// "avx2", "neon" (with "+bf16dot" on CPUs with FEAT_BF16) or "scalar", from
// cnuma::active_isa() and COMPOSER_NUMA_AMX=0.
std::string kernel_name(DType dtype);

class Experts {
 public:
  // Checks the layer and slices (std::invalid_argument), every size with
  // overflow-checked arithmetic: a layer whose weights cannot be counted in
  // int64 bytes is rejected here, before anything is allocated.
  Experts(const Layer& layer, std::vector<Slice> slices);
  ~Experts();
  Experts(const Experts&) = delete;
  Experts& operator=(const Experts&) = delete;

  const Layer& layer() const { return layer_; }
  const std::vector<Slice>& slices() const { return slices_; }
  // Elements of one slice's w13 / w2 buffers (every local expert).
  int64_t w13_elements(size_t slice) const;
  int64_t w2_elements(size_t slice) const;

  // x: [tokens][hidden] in the layer's dtype; ids: [tokens][k] int64; weights:
  // [tokens][k] fp32; out: [tokens][hidden] in the layer's dtype. Runs on the
  // workers of `pool` (each slice's items on the workers of its node).
  void forward(Pool& pool, const void* x, int64_t tokens, const int64_t* ids, const float* weights, int64_t k,
               void* out, const std::vector<SliceData>& data);

  // dout, x: [tokens][hidden] in the layer's dtype; dx: same; dweights: [tokens][k]
  // fp32; data[p].save_* as filled by forward. The weight gradients are written
  // (every element, zero for experts without tokens), or skipped when grad13 or
  // grad2 is null.
  void backward(Pool& pool, const void* dout, const void* x, int64_t tokens, const int64_t* ids,
                const float* weights, int64_t k, const std::vector<SliceData>& data, void* dx, float* dweights);

 private:
  // Scratch of slice p, at least `bytes`, node-local, grown on demand.
  void* scratch(Pool& pool, size_t p, int64_t bytes);

  Layer layer_;
  std::vector<Slice> slices_;
  std::vector<int64_t> held_;   // experts each slice holds
  ForkSafeMutex mu_;            // one call at a time per layer: the scratch buffers are reused
  std::vector<std::unique_ptr<NodeBuffer>> scratch_;  // per slice
};

}  // namespace experts
}  // namespace cnuma
