// Persistent pool of pinned workers, one per physical core of the rank's CPU
// set, grouped by NUMA node. This is the extension's only global state.
//
// Usage from another translation unit (kernels never create threads):
//
//   #include "workers.h"
//   // every element of [0, n) exactly once, in 16-aligned contiguous chunks
//   cnuma::parallel_for(n, 16, [&](int64_t begin, int64_t end) { ... });
//
//   // node-local work: each task's units are split over the workers of its node
//   std::vector<cnuma::NodeTask> tasks;
//   tasks.push_back({node, units, align, [&](int64_t b, int64_t e, int worker) { ... }});
//   cnuma::run_on_nodes(tasks);
//
// Chunking is static and contiguous, so for element-wise kernels the result is
// bit-identical for any number of workers. Calls from inside a worker run inline
// (no nested parallelism). Exceptions thrown by `fn` are rethrown in the caller.
#pragma once

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

namespace cnuma {

struct WorkerInfo {
  int index;          // position in the pool, 0..size-1, ordered by node then CPU
  int cpu;            // the CPU the worker is pinned to
  int node;           // NUMA node of that CPU
  int index_in_node;  // position among the workers of `node`
  long tid;           // kernel thread id (for tests reading the affinity back)
};

struct NodeTask {
  int node;       // run on this node's workers (all workers if the pool has none there)
  int64_t units;  // work units (elements, rows, pages ...)
  int64_t align;  // chunk boundaries are multiples of this (>= 1)
  std::function<void(int64_t begin, int64_t end, int worker)> fn;
};

// The [begin, end) share of `part` when n units are split into `parts`
// contiguous chunks whose boundaries are multiples of `align`.
std::pair<int64_t, int64_t> static_chunk(int64_t n, int parts, int part, int64_t align);

// Run fn(worker_index) once on every worker and wait.
void run_on_workers(const std::function<void(int worker)>& fn);

// Split [0, n) over all workers (static, `align`-aligned) and wait.
void parallel_for(int64_t n, int64_t align, const std::function<void(int64_t, int64_t)>& fn);

// Run each task on the workers of its node, all tasks in one dispatch, and wait.
void run_on_nodes(const std::vector<NodeTask>& tasks);

// Pool shape. The pool is created lazily on first use from the calling thread's
// affinity (sched_getaffinity), and re-created when that affinity changes.
int num_threads();
std::vector<WorkerInfo> workers();
std::vector<int> worker_nodes();  // nodes that have at least one worker, ascending
bool in_worker();                 // true on a pool thread

// n > 0: use exactly n workers (spread over nodes in proportion to their cores,
// wrapping around the cores when n exceeds them); n == 0: the default, one per
// physical core (or COMPOSER_NUMA_THREADS). Joins the old workers.
void set_num_threads(int n);

// Join every worker; the next use creates a fresh pool.
void shutdown_pool();

}  // namespace cnuma
