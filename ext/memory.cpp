#include "memory.h"

#include <dlfcn.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "sysfs.h"
#include "workers.h"

namespace cnuma {
namespace {

// Linux uapi values (mempolicy.h); we call the syscalls directly, without libnuma.
constexpr int kMpolDefault = 0, kMpolPreferred = 1, kMpolBind = 2, kMpolInterleave = 3,
              kMpolLocal = 4, kMpolPreferredMany = 5, kMpolWeightedInterleave = 6;
constexpr int kMpolModeFlags = (1 << 15) | (1 << 14) | (1 << 13);
constexpr unsigned kMpolFNode = 1, kMpolFAddr = 2;
constexpr size_t kHugePage = size_t{2} << 20;
constexpr int kMaxNodes = 1024;

std::string human(int64_t bytes) {
  const char* unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 4) {
    v /= 1024.0;
    ++u;
  }
  char buf[64];
  std::snprintf(buf, sizeof(buf), u == 0 ? "%.0f %s" : "%.1f %s", v, unit[u]);
  return buf;
}

std::map<std::string, int64_t> parse_meminfo(const std::string& text) {
  // Lines look like "Node 0 MemFree:  5315348 kB" (sysfs) or "MemFree: 5315348 kB" (procfs).
  std::map<std::string, int64_t> m;
  std::stringstream ss(text);
  std::string line;
  while (std::getline(ss, line)) {
    const auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string key = line.substr(0, colon);
    const auto sp = key.rfind(' ');
    if (sp != std::string::npos) key = key.substr(sp + 1);
    std::stringstream rest(line.substr(colon + 1));
    int64_t v = 0;
    std::string unit;
    rest >> v >> unit;
    m[key] = unit == "kB" ? v * 1024 : v;
  }
  return m;
}

// What the process's memory cgroup still allows (v2 memory.max or v1 limit),
// counting its page cache as reclaimable; -1 when unlimited or unknown.
int64_t cgroup_room() {
  std::stringstream ss(read_text("/proc/self/cgroup"));
  std::string line;
  while (std::getline(ss, line)) {
    const auto a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string ctrl = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    std::string limit_s, usage_s, stat_s;
    if (ctrl.empty() && line.compare(0, 2, "0:") == 0) {
      const std::string d = "/sys/fs/cgroup" + path;
      limit_s = read_text(d + "/memory.max");
      usage_s = read_text(d + "/memory.current");
      stat_s = read_text(d + "/memory.stat");
    } else if (ctrl == "memory") {
      const std::string d = "/sys/fs/cgroup/memory" + path;
      limit_s = read_text(d + "/memory.limit_in_bytes");
      usage_s = read_text(d + "/memory.usage_in_bytes");
      stat_s = read_text(d + "/memory.stat");
    } else {
      continue;
    }
    if (limit_s.empty() || usage_s.empty() || limit_s.compare(0, 3, "max") == 0) continue;
    try {
      const int64_t limit = std::stoll(limit_s), usage = std::stoll(usage_s);
      if (limit >= (int64_t{1} << 60)) continue;  // v1's "unlimited"
      int64_t file = 0;
      std::stringstream st(stat_s);
      std::string k;
      int64_t v;
      while (st >> k >> v)
        if (k == "file" || k == "cache") file = std::max(file, v);
      return std::max<int64_t>(0, limit - usage + file);
    } catch (const std::exception&) {
      continue;
    }
  }
  return -1;
}

std::vector<unsigned long> nodemask(const std::vector<int>& nodes, unsigned long* maxnode) {
  constexpr int bits = 8 * sizeof(unsigned long);
  std::vector<unsigned long> mask(kMaxNodes / bits, 0);
  for (int n : nodes) mask[n / bits] |= 1ul << (n % bits);
  *maxnode = kMaxNodes + 1;  // the kernel reads maxnode - 1 bits
  return mask;
}

void touch_pages(void* addr, size_t len, int node) {
  const size_t ps = page_size();
  const int64_t pages = static_cast<int64_t>(len / ps);
  char* base = static_cast<char*>(addr);
  // Huge-page aligned chunks keep each 2 MiB region faulted by one worker.
  const int64_t align = static_cast<int64_t>(kHugePage / ps);
  std::vector<NodeTask> tasks;
  tasks.push_back({node, pages, align, [=](int64_t b, int64_t e, int) {
                     for (int64_t p = b; p < e; ++p)
                       *reinterpret_cast<volatile char*>(base + p * ps) = 0;
                   }});
  run_on_nodes(tasks);
}

// The CUDA runtime torch loaded, if any, looked up at each use (no cached state):
// we never load it ourselves, and dlclose only drops the reference dlopen added.
class CudaRt {
 public:
  CudaRt() {
    for (const char* name : {"libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0",
                             "libcudart.so"}) {
      handle_ = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);
      if (handle_ == nullptr) continue;
      host_register = reinterpret_cast<int (*)(void*, size_t, unsigned)>(
          dlsym(handle_, "cudaHostRegister"));
      host_unregister = reinterpret_cast<int (*)(void*)>(dlsym(handle_, "cudaHostUnregister"));
      error_string = reinterpret_cast<const char* (*)(int)>(dlsym(handle_, "cudaGetErrorString"));
      if (host_register && host_unregister) return;
      dlclose(handle_);
      handle_ = nullptr;
      host_register = nullptr;
      host_unregister = nullptr;
    }
  }
  ~CudaRt() {
    if (handle_ != nullptr) dlclose(handle_);
  }
  CudaRt(const CudaRt&) = delete;
  CudaRt& operator=(const CudaRt&) = delete;
  bool loaded() const { return host_register != nullptr; }

  int (*host_register)(void*, size_t, unsigned) = nullptr;
  int (*host_unregister)(void*) = nullptr;
  const char* (*error_string)(int) = nullptr;

 private:
  void* handle_ = nullptr;
};

}  // namespace

size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

Policy parse_policy(const std::string& name) {
  if (name == "bind") return Policy::Bind;
  if (name == "preferred") return Policy::Preferred;
  if (name == "interleave") return Policy::Interleave;
  throw std::invalid_argument("unknown memory policy '" + name +
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

std::vector<int> online_nodes() {
  const std::string s = read_text("/sys/devices/system/node/online");
  std::vector<int> v = parse_cpulist(s);
  if (v.empty()) v.push_back(0);  // kernels without NUMA sysfs: one node
  return v;
}

std::vector<int> allowed_mem_nodes() {
  std::stringstream ss(read_text("/proc/self/status"));
  std::string line;
  while (std::getline(ss, line))
    if (line.compare(0, 18, "Mems_allowed_list:") == 0) return parse_cpulist(line.substr(18));
  return online_nodes();
}

NodeMemInfo node_meminfo(int node) {
  const std::vector<int> online = online_nodes();
  if (std::find(online.begin(), online.end(), node) == online.end()) {
    std::string list;
    for (int n : online) list += (list.empty() ? "" : ",") + std::to_string(n);
    throw std::invalid_argument("NUMA node " + std::to_string(node) +
                                " does not exist (online nodes: " + list + ")");
  }
  std::string text = read_text("/sys/devices/system/node/node" + std::to_string(node) + "/meminfo");
  if (text.empty()) text = read_text("/proc/meminfo");
  const auto m = parse_meminfo(text);
  auto get = [&](const char* k) {
    const auto it = m.find(k);
    return it == m.end() ? int64_t{0} : it->second;
  };
  NodeMemInfo info{node, get("MemTotal"), get("MemFree"), 0};
  // Like the kernel's MemAvailable: free memory plus the page cache and slab
  // that reclaim can give back, keeping a reserve for the watermarks.
  const int64_t reserve = std::max<int64_t>(info.total_bytes / 100, int64_t{16} << 20);
  const int64_t cache = get("Active(file)") + get("Inactive(file)");
  const int64_t slab = get("SReclaimable");
  info.available_bytes = std::max<int64_t>(
      0, info.free_bytes - reserve + cache - std::min(cache / 2, reserve) + slab -
             std::min(slab / 2, reserve));
  return info;
}

std::vector<int> memory_nodes() {
  const std::vector<int> allowed = allowed_mem_nodes();
  std::vector<int> out;
  for (int n : online_nodes()) {
    if (std::find(allowed.begin(), allowed.end(), n) == allowed.end()) continue;
    if (node_meminfo(n).total_bytes > 0) out.push_back(n);
  }
  return out;
}

std::unique_ptr<NodeBuffer> NodeBuffer::allocate(size_t nbytes, const std::vector<int>& nodes,
                                                 Policy policy, bool populate) {
  if (nbytes == 0) throw std::invalid_argument("cannot map 0 bytes");
  if (nodes.empty()) throw std::invalid_argument("no NUMA node given");
  if (policy != Policy::Interleave && nodes.size() != 1)
    throw std::invalid_argument(std::string("policy '") + policy_name(policy) +
                                "' takes exactly one node");
  const std::vector<int> allowed = allowed_mem_nodes();
  std::vector<NodeMemInfo> infos;
  for (int n : nodes) {
    if (n < 0 || n >= kMaxNodes) throw std::invalid_argument("NUMA node " + std::to_string(n) +
                                                             " is out of range");
    if (std::count(nodes.begin(), nodes.end(), n) > 1)
      throw std::invalid_argument("NUMA node " + std::to_string(n) + " is listed twice");
    infos.push_back(node_meminfo(n));  // throws for nodes that do not exist
    if (infos.back().total_bytes == 0)
      throw std::invalid_argument("NUMA node " + std::to_string(n) + " has no memory");
    if (std::find(allowed.begin(), allowed.end(), n) == allowed.end())
      throw std::invalid_argument("NUMA node " + std::to_string(n) +
                                  " is not in this process's cpuset (Mems_allowed)");
  }
  // Refuse what the node(s) cannot hold before touching a page: under a strict
  // binding the alternative is the OOM killer.
  const int64_t need = static_cast<int64_t>(nbytes);
  auto refuse = [&](const NodeMemInfo& i, int64_t want) {
    throw NodeMemoryError("cannot allocate " + human(want) + " on NUMA node " +
                          std::to_string(i.node) + " (policy " + policy_name(policy) +
                          "): the node has " + human(i.free_bytes) + " free (" +
                          human(i.available_bytes) + " available, " + human(i.total_bytes) +
                          " total)");
  };
  if (policy == Policy::Bind) {
    if (need > infos[0].available_bytes) refuse(infos[0], need);
  } else if (policy == Policy::Interleave) {
    const int64_t share = need / static_cast<int64_t>(infos.size()) + 2 * kHugePage;
    for (const auto& i : infos)
      if (share > i.available_bytes) refuse(i, share);
  } else {  // preferred spills to other nodes: the machine as a whole must hold it
    int64_t room = 0;
    for (int n : memory_nodes()) room += node_meminfo(n).available_bytes;
    if (need > room)
      throw NodeMemoryError("cannot allocate " + human(need) + " preferring NUMA node " +
                            std::to_string(infos[0].node) + ": the node has " +
                            human(infos[0].free_bytes) + " free and all allowed nodes together " +
                            human(room) + " available");
  }
  const int64_t cg = cgroup_room();
  if (cg >= 0 && need > cg)
    throw NodeMemoryError("cannot allocate " + human(need) + " on NUMA node " +
                          std::to_string(nodes[0]) + ": the memory cgroup allows only " +
                          human(cg) + " more (node has " + human(infos[0].free_bytes) + " free)");

  const size_t ps = page_size();
  size_t len = (nbytes + ps - 1) / ps * ps;
  const bool huge = len >= kHugePage;
  if (huge) len = (len + kHugePage - 1) / kHugePage * kHugePage;
  const size_t over = huge ? len + kHugePage : len;
  void* raw = mmap(nullptr, over, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED)
    throw NodeMemoryError("cannot map " + human(need) + " for NUMA node " +
                          std::to_string(nodes[0]) + ": " + std::strerror(errno));
  char* addr = static_cast<char*>(raw);
  if (huge) {  // trim to a 2 MiB aligned window so transparent huge pages can back it
    char* aligned = reinterpret_cast<char*>(
        (reinterpret_cast<uintptr_t>(addr) + kHugePage - 1) & ~(uintptr_t)(kHugePage - 1));
    if (aligned > addr) munmap(addr, aligned - addr);
    const size_t tail = (addr + over) - (aligned + len);
    if (tail > 0) munmap(aligned + len, tail);
    addr = aligned;
    madvise(addr, len, MADV_HUGEPAGE);
  }
  std::unique_ptr<NodeBuffer> buf(new NodeBuffer());
  buf->addr_ = addr;
  buf->nbytes_ = nbytes;
  buf->mapped_ = len;
  buf->policy_ = policy;
  buf->nodes_ = nodes;

  unsigned long maxnode;
  std::vector<unsigned long> mask = nodemask(nodes, &maxnode);
  const int mode = policy == Policy::Bind        ? kMpolBind
                   : policy == Policy::Preferred ? kMpolPreferred
                                                 : kMpolInterleave;
  if (syscall(SYS_mbind, addr, len, mode, mask.data(), maxnode, 0) != 0)
    throw std::runtime_error(std::string("mbind(") + policy_name(policy) + ", node " +
                             std::to_string(nodes[0]) + ") failed: " + std::strerror(errno));
  if (populate) touch_pages(addr, len, policy == Policy::Interleave ? -1 : nodes[0]);
  return buf;
}

std::string NodeBuffer::pin() {
  if (pinned_) return "";
  const CudaRt rt;
  if (!rt.loaded()) return "the CUDA runtime is not loaded in this process";
  const int rc = rt.host_register(addr_, mapped_, 1 /* cudaHostRegisterPortable */);
  if (rc != 0)
    return std::string("cudaHostRegister failed: ") +
           (rt.error_string ? rt.error_string(rc) : std::to_string(rc));
  pinned_ = true;
  return "";
}

NodeBuffer::~NodeBuffer() {
  if (pinned_) {
    const CudaRt rt;
    if (rt.loaded()) rt.host_unregister(addr_);
  }
  if (addr_ != nullptr) munmap(addr_, mapped_);
}

std::map<int, int64_t> pages_per_node(const void* addr, size_t nbytes) {
  std::map<int, int64_t> counts;
  if (nbytes == 0) return counts;
  const size_t ps = page_size();
  const uintptr_t first = reinterpret_cast<uintptr_t>(addr) / ps * ps;
  const uintptr_t last = reinterpret_cast<uintptr_t>(addr) + nbytes;  // exclusive
  constexpr size_t kBatch = 4096;
  std::vector<void*> pages(kBatch);
  std::vector<int> status(kBatch);
  for (uintptr_t p = first; p < last;) {
    size_t n = 0;
    for (; n < kBatch && p < last; ++n, p += ps) pages[n] = reinterpret_cast<void*>(p);
    if (syscall(SYS_move_pages, 0, n, pages.data(), nullptr, status.data(), 0) != 0)
      throw std::runtime_error(std::string("move_pages failed: ") + std::strerror(errno));
    for (size_t i = 0; i < n; ++i) {
      if (status[i] >= 0) counts[status[i]]++;
      else if (status[i] != -EFAULT) counts[-1]++;
    }
  }
  return counts;
}

std::pair<std::string, std::vector<int>> mempolicy_of(const void* addr) {
  int mode = 0;
  unsigned long maxnode;
  std::vector<unsigned long> mask = nodemask({}, &maxnode);
  if (syscall(SYS_get_mempolicy, &mode, mask.data(), maxnode, addr, kMpolFAddr) != 0)
    throw std::runtime_error(std::string("get_mempolicy failed: ") + std::strerror(errno));
  (void)kMpolFNode;
  std::vector<int> nodes;
  constexpr int bits = 8 * sizeof(unsigned long);
  for (int n = 0; n < kMaxNodes; ++n)
    if (mask[n / bits] & (1ul << (n % bits))) nodes.push_back(n);
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

void parallel_zero(void* addr, size_t nbytes, int node) {
  char* base = static_cast<char*>(addr);
  std::vector<NodeTask> tasks;
  tasks.push_back({node, static_cast<int64_t>(nbytes), 4096, [=](int64_t b, int64_t e, int) {
                     std::memset(base + b, 0, static_cast<size_t>(e - b));
                   }});
  run_on_nodes(tasks);
}

}  // namespace cnuma
