// Node-local memory: one anonymous mapping placed with mbind, faulted in by the
// pool's workers of the target node, optionally page-locked for CUDA copies.
//
//   auto buf = cnuma::NodeBuffer::allocate(&pool, bytes, {node}, cnuma::Policy::Bind);
//   float* w = static_cast<float*>(buf->data());   // unmapped when buf dies
//
// Whether the node has room is not decided here: the caller asks the machine
// model first (composer_numa.offload.memory holds composer_numa.machine.capacity's
// cross-process reservation while it checks and this faults the pages in).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/mempolicy.h"
#include "runtime/pool.h"

namespace cnuma {

// The RAII owner of one mapping. Never copied; munmap (after cudaHostUnregister
// when pinned) in the destructor.
class NodeBuffer {
 public:
  // nodes: the target node (Bind, Preferred) or the interleave set. Checks the
  // arguments (std::invalid_argument); a size larger than this machine's
  // physical memory or than a mapping can be is a MemoryRequestError. With
  // `populate`, every page is faulted in by `pool`'s workers of the node (all
  // workers when interleaving), so it lands where the policy says.
  static std::unique_ptr<NodeBuffer> allocate(Pool* pool, size_t nbytes, const std::vector<int>& nodes,
                                              Policy policy, bool populate = true);
  ~NodeBuffer();
  NodeBuffer(const NodeBuffer&) = delete;
  NodeBuffer& operator=(const NodeBuffer&) = delete;

  void* data() const { return addr_; }
  size_t size() const { return nbytes_; }         // requested bytes
  size_t mapped_size() const { return mapped_; }  // page-rounded length of the mapping
  Policy policy() const { return policy_; }
  const std::vector<int>& nodes() const { return nodes_; }

  // Page-lock through the CUDA runtime already loaded in the process (torch's).
  // Returns "" on success or why it was not pinned; never throws.
  std::string pin();
  bool pinned() const { return pinned_; }

 private:
  NodeBuffer() = default;
  void* addr_ = nullptr;
  size_t nbytes_ = 0;
  size_t mapped_ = 0;
  Policy policy_ = Policy::Bind;
  std::vector<int> nodes_;
  bool pinned_ = false;
};

// Zero-fill [addr, addr + nbytes) with the workers of `node` (any worker when -1).
void parallel_zero(Pool& pool, void* addr, size_t nbytes, int node);

}  // namespace cnuma
