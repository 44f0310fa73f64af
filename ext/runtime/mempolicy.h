// The Linux memory-policy system calls, made directly (no libnuma): place a
// range on nodes (mbind), ask a range's policy (get_mempolicy) and where its
// pages are (move_pages in query form). Node ids come from the caller.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace cnuma {

enum class Policy { Bind, Preferred, Interleave };

// Node ids are below this (the kernel's MAX_NUMNODES is at most 1024).
constexpr int kMaxNodes = 1024;

Policy parse_policy(const std::string& name);  // "bind" | "preferred" | "interleave"
const char* policy_name(Policy p);

// Checks node ids for `policy` (std::invalid_argument): in [0, kMaxNodes), none
// twice, exactly one unless interleaving.
void check_nodes(const std::vector<int>& nodes, Policy policy);

// mbind(addr, len, policy, nodes); std::runtime_error naming the errno on failure,
// except ENOSYS (a kernel without NUMA memory policies): then nothing changes.
void apply_policy(void* addr, size_t len, Policy policy, const std::vector<int>& nodes);

// The memory policy of the mapping containing addr: (mode name, nodes).
std::pair<std::string, std::vector<int>> policy_of(const void* addr);

// Resident pages per node for [addr, addr + nbytes) (move_pages query form).
// Pages not yet faulted in are counted under key -1; unmapped ranges are skipped.
// std::invalid_argument for a range outside the address space or larger than the machine's
// physical memory (the work is one query per page).
std::map<int, int64_t> pages_per_node(const void* addr, size_t nbytes);

size_t page_size();

}  // namespace cnuma
