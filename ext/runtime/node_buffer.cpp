#include "runtime/node_buffer.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "common/checked.h"
#include "common/errors.h"
#include "runtime/cuda_host.h"

namespace cnuma {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

std::string human(double bytes) {
  const char* unit[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  while (bytes >= 1024.0 && u < 6) {
    bytes /= 1024.0;
    ++u;
  }
  char buf[64];
  std::snprintf(buf, sizeof(buf), u == 0 ? "%.0f %s" : "%.1f %s", bytes, unit[u]);
  return buf;
}

// Physical memory of the machine (sysconf asks sysinfo(2), no file is read).
double physical_bytes() {
  return static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGESIZE));
}

void touch_pages(Pool& pool, void* addr, size_t len, int node) {
  const size_t ps = page_size();
  const int64_t pages = static_cast<int64_t>(len / ps);
  char* base = static_cast<char*>(addr);
  // Huge-page aligned chunks keep each 2 MiB region faulted by one worker.
  const int64_t align = static_cast<int64_t>(kHugePage / ps);
  pool.run_on_nodes({{node, pages, align, [=](int64_t b, int64_t e, int) {
                        for (int64_t p = b; p < e; ++p) *reinterpret_cast<volatile char*>(base + p * ps) = 0;
                      }}});
}

}  // namespace

std::unique_ptr<NodeBuffer> NodeBuffer::allocate(Pool* pool, size_t nbytes, const std::vector<int>& nodes,
                                                 Policy policy, bool populate) {
  if (nbytes == 0) throw std::invalid_argument("cannot map 0 bytes");
  check_nodes(nodes, policy);
  if (populate && pool == nullptr) throw std::invalid_argument("faulting pages in needs a worker pool");
  // Not a capacity check (the caller made that): a request no machine this
  // size can hold is refused before the size is rounded or mapped.
  if (static_cast<double>(nbytes) > physical_bytes())
    throw MemoryRequestError("cannot map " + human(static_cast<double>(nbytes)) + " for NUMA node " +
                             std::to_string(nodes[0]) + ": more than this machine's " + human(physical_bytes()) +
                             " of physical memory");
  size_t len = checked_round_up(nbytes, page_size(), "the mapping");
  const bool huge = len >= kHugePage;
  if (huge) len = checked_round_up(len, kHugePage, "the mapping");
  const size_t over = huge ? len + kHugePage : len;
  void* raw = mmap(nullptr, over, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) {
    const int err = errno;
    throw MemoryRequestError("cannot map " + human(static_cast<double>(nbytes)) + " for NUMA node " +
                             std::to_string(nodes[0]) + ": " + std::strerror(err));
  }
  char* addr = static_cast<char*>(raw);
  if (huge) {  // trim to a 2 MiB aligned window so transparent huge pages can back it
    char* aligned = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(addr) + kHugePage - 1) &
                                            ~static_cast<uintptr_t>(kHugePage - 1));
    if (aligned > addr) munmap(addr, aligned - addr);
    const size_t tail = (addr + over) - (aligned + len);
    if (tail > 0) munmap(aligned + len, tail);
    addr = aligned;
    madvise(addr, len, MADV_HUGEPAGE);
  }
  std::unique_ptr<NodeBuffer> buf(new NodeBuffer());  // owns the mapping from here on
  buf->addr_ = addr;
  buf->nbytes_ = nbytes;
  buf->mapped_ = len;
  buf->policy_ = policy;
  buf->nodes_ = nodes;
  apply_policy(addr, len, policy, nodes);
  if (populate) touch_pages(*pool, addr, len, policy == Policy::Interleave ? -1 : nodes[0]);
  return buf;
}

std::string NodeBuffer::pin() {
  if (pinned_) return "";
  const std::string why = cuda_host_register(addr_, mapped_);
  pinned_ = why.empty();
  return why;
}

NodeBuffer::~NodeBuffer() {
  if (pinned_) cuda_host_unregister(addr_);
  if (addr_ != nullptr) munmap(addr_, mapped_);
}

void parallel_zero(Pool& pool, void* addr, size_t nbytes, int node) {
  if (nbytes == 0) return;
  char* base = static_cast<char*>(addr);
  pool.run_on_nodes({{node, static_cast<int64_t>(nbytes), 4096, [=](int64_t b, int64_t e, int) {
                        std::memset(base + b, 0, static_cast<size_t>(e - b));
                      }}});
}

}  // namespace cnuma
