#include "runtime/mempolicy.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace cnuma {
namespace {

// Linux uapi values (mempolicy.h).
constexpr int kMpolDefault = 0, kMpolPreferred = 1, kMpolBind = 2, kMpolInterleave = 3, kMpolLocal = 4,
              kMpolPreferredMany = 5, kMpolWeightedInterleave = 6;
constexpr int kMpolModeFlags = (1 << 15) | (1 << 14) | (1 << 13);
constexpr unsigned long kMpolFAddr = 2;
constexpr int kBits = 8 * sizeof(unsigned long);
// Above every user address of x86-64 (5-level paging) and arm64: a longer range is a bad argument.
constexpr uintptr_t kAddressLimit = uintptr_t{1} << 57;

// A node mask with room for `bits` nodes; maxnode as the kernel wants it (it reads maxnode - 1 bits).
std::vector<unsigned long> mask_for(int bits, unsigned long* maxnode) {
  const int words = (bits + kBits - 1) / kBits;
  *maxnode = static_cast<unsigned long>(words) * kBits + 1;
  return std::vector<unsigned long>(static_cast<size_t>(words), 0);
}

}  // namespace

size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

Policy parse_policy(const std::string& name) {
  if (name == "bind") return Policy::Bind;
  if (name == "preferred") return Policy::Preferred;
  if (name == "interleave") return Policy::Interleave;
  throw std::invalid_argument("unknown memory policy '" + name.substr(0, 40) +
                              "' (expected bind, preferred or interleave)");
}

const char* policy_name(Policy p) {
  switch (p) {
    case Policy::Bind: return "bind";
    case Policy::Preferred: return "preferred";
    case Policy::Interleave: return "interleave";
  }
  return "?";
}

void check_nodes(const std::vector<int>& nodes, Policy policy) {
  if (nodes.empty()) throw std::invalid_argument("no NUMA node given");
  if (policy != Policy::Interleave && nodes.size() != 1)
    throw std::invalid_argument(std::string("policy '") + policy_name(policy) + "' takes exactly one node");
  if (nodes.size() > static_cast<size_t>(kMaxNodes))
    throw std::invalid_argument("more than " + std::to_string(kMaxNodes) + " NUMA nodes given");
  for (int n : nodes) {
    if (n < 0 || n >= kMaxNodes)
      throw std::invalid_argument("NUMA node " + std::to_string(n) + " is out of range [0, " +
                                  std::to_string(kMaxNodes) + ")");
    if (std::count(nodes.begin(), nodes.end(), n) > 1)
      throw std::invalid_argument("NUMA node " + std::to_string(n) + " is listed twice");
  }
}

void apply_policy(void* addr, size_t len, Policy policy, const std::vector<int>& nodes) {
  check_nodes(nodes, policy);
  unsigned long maxnode;
  std::vector<unsigned long> mask = mask_for(*std::max_element(nodes.begin(), nodes.end()) + 1, &maxnode);
  for (int n : nodes) mask[n / kBits] |= 1ul << (n % kBits);
  const int mode = policy == Policy::Bind ? kMpolBind : policy == Policy::Preferred ? kMpolPreferred : kMpolInterleave;
  if (syscall(SYS_mbind, addr, len, mode, mask.data(), maxnode, 0) != 0) {
    const int err = errno;
    // No NUMA memory policies in this kernel (CONFIG_NUMA=n, or qemu-user, which
    // answers ENOSYS): the pages keep the default policy, as every page there
    // does. composer_numa.offload.memory warns once (bind-not-applied).
    if (err == ENOSYS) return;
    throw std::runtime_error(std::string("mbind(") + policy_name(policy) + ", node " + std::to_string(nodes[0]) +
                             (nodes.size() > 1 ? ", ..." : "") + ") failed: " + std::strerror(err));
  }
}

std::pair<std::string, std::vector<int>> policy_of(const void* addr) {
  int mode = 0;
  unsigned long maxnode;
  std::vector<unsigned long> mask = mask_for(kMaxNodes, &maxnode);
  if (syscall(SYS_get_mempolicy, &mode, mask.data(), maxnode, addr, kMpolFAddr) != 0) {
    const int err = errno;
    throw std::runtime_error(std::string("get_mempolicy failed: ") + std::strerror(err));
  }
  std::vector<int> nodes;
  for (int n = 0; n < kMaxNodes; ++n)
    if (mask[n / kBits] & (1ul << (n % kBits))) nodes.push_back(n);
  std::string name;
  switch (mode & ~kMpolModeFlags) {
    case kMpolDefault: name = "default"; break;
    case kMpolPreferred: name = "preferred"; break;
    case kMpolBind: name = "bind"; break;
    case kMpolInterleave: name = "interleave"; break;
    case kMpolLocal: name = "local"; break;
    case kMpolPreferredMany: name = "preferred-many"; break;
    case kMpolWeightedInterleave: name = "weighted-interleave"; break;
    default: name = "mode-" + std::to_string(mode);
  }
  return {name, nodes};
}

std::map<int, int64_t> pages_per_node(const void* addr, size_t nbytes) {
  std::map<int, int64_t> counts;
  if (nbytes == 0) return counts;
  const uintptr_t start = reinterpret_cast<uintptr_t>(addr);
  if (start >= kAddressLimit || nbytes > kAddressLimit - start)
    throw std::invalid_argument("the range [ptr, ptr + nbytes) is outside the address space");
  // The work is one query per page: bound it by what a buffer can be, this machine's memory.
  const double physical = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(page_size());
  if (static_cast<double>(nbytes) > physical)
    throw std::invalid_argument("the range [ptr, ptr + nbytes) is larger than this machine's memory");
  const size_t ps = page_size();
  const uintptr_t first = start / ps * ps;
  const uintptr_t last = start + nbytes;  // exclusive
  constexpr size_t kBatch = 4096;
  std::vector<void*> pages(kBatch);
  std::vector<int> status(kBatch);
  for (uintptr_t p = first; p < last;) {
    size_t n = 0;
    for (; n < kBatch && p < last; ++n, p += ps) pages[n] = reinterpret_cast<void*>(p);
    if (syscall(SYS_move_pages, 0, n, pages.data(), nullptr, status.data(), 0) != 0) {
      const int err = errno;
      throw std::runtime_error(std::string("move_pages failed: ") + std::strerror(err));
    }
    for (size_t i = 0; i < n; ++i) {
      if (status[i] >= 0) counts[status[i]]++;
      else if (status[i] != -EFAULT) counts[-1]++;
    }
  }
  return counts;
}

}  // namespace cnuma
