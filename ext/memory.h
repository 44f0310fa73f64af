// Node-local memory: anonymous mappings placed with mbind (raw syscalls, no
// libnuma), checked against the node's free memory before any page is touched,
// faulted in by the pool's workers, optionally page-locked for CUDA copies.
//
//   auto buf = cnuma::NodeBuffer::allocate(bytes, {node}, cnuma::Policy::Bind);
//   float* w = static_cast<float*>(buf->data());   // unmapped when buf dies
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace cnuma {

enum class Policy { Bind, Preferred, Interleave };

Policy parse_policy(const std::string& name);  // "bind" | "preferred" | "interleave"
const char* policy_name(Policy p);

// A request that the target node(s) cannot hold. Bindings map it to MemoryError.
class NodeMemoryError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct NodeMemInfo {
  int node;
  int64_t total_bytes;
  int64_t free_bytes;       // MemFree
  int64_t available_bytes;  // MemFree + reclaimable page cache and slab, minus a reserve
};

std::vector<int> online_nodes();        // /sys/devices/system/node/online
std::vector<int> memory_nodes();        // online nodes with memory, inside Mems_allowed
std::vector<int> allowed_mem_nodes();   // Mems_allowed_list of this process
NodeMemInfo node_meminfo(int node);     // throws std::invalid_argument for unknown nodes

// The RAII owner of one mapping. Never copied; munmap (after cudaHostUnregister
// when pinned) in the destructor.
class NodeBuffer {
 public:
  // nodes: the target node (Bind, Preferred) or the interleave set. Validates the
  // nodes (std::invalid_argument), checks free memory (NodeMemoryError), maps,
  // mbinds, and faults every page in with the pool's workers on those nodes.
  static std::unique_ptr<NodeBuffer> allocate(size_t nbytes, const std::vector<int>& nodes,
                                              Policy policy, bool populate = true);
  ~NodeBuffer();
  NodeBuffer(const NodeBuffer&) = delete;
  NodeBuffer& operator=(const NodeBuffer&) = delete;

  void* data() const { return addr_; }
  size_t size() const { return nbytes_; }          // requested bytes
  size_t mapped_size() const { return mapped_; }   // page-rounded length of the mapping
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

// Resident pages per node for [addr, addr + nbytes) (move_pages query form).
// Pages not yet faulted in are counted under key -1; unmapped ranges are skipped.
std::map<int, int64_t> pages_per_node(const void* addr, size_t nbytes);

// The memory policy of the mapping containing addr: (mode name, nodes).
std::pair<std::string, std::vector<int>> mempolicy_of(const void* addr);

// Zero-fill [addr, addr + nbytes) with the workers of `node` (any worker when -1).
void parallel_zero(void* addr, size_t nbytes, int node);

size_t page_size();

}  // namespace cnuma
