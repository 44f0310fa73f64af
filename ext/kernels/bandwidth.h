// STREAM-style memory bandwidth probes run on a pool's workers of one node
// against buffers bound to another, for `composer-numa bench --bandwidth` and
// the optimizer benchmark's roofline.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/pool.h"

namespace cnuma {

struct BandwidthResult {
  std::string kernel;
  int cpu_node;
  int mem_node;
  int threads;                  // workers that ran it
  int64_t bytes_per_pass;       // bytes counted per pass (STREAM convention: no write-allocate)
  std::vector<double> seconds;  // one per pass
};

// kernel: "read" (sum), "copy" (b = a), "triad" (a = b + s*c) or "adamw"
// (in-place 4 reads / 3 writes of fp32, the optimizer's traffic: 28 B/element).
// `elements` fp32 elements per array; buffers are bound to mem_node and faulted
// in there; passes run on the workers of cpu_node (all workers when it has none).
// Sizes are checked before they are multiplied: too many elements is a
// MemoryRequestError. Whether mem_node has room is the caller's question.
BandwidthResult measure_bandwidth(Pool& pool, const std::string& kernel, int64_t elements, int cpu_node,
                                  int mem_node, int passes);

}  // namespace cnuma
