// A pool of worker threads, each pinned to one CPU, grouped by NUMA node.
//
// The pool is an explicit object: whoever creates it says which CPUs the
// workers run on and which node each CPU belongs to (composer_numa.offload.runtime
// computes those slots from the machine model and owns the process's default
// pool). Kernels receive the pool they run on; nothing here reads the machine.
//
//   cnuma::Pool pool({{0, 0}, {2, 0}, {4, 1}});          // (cpu, node) per worker
//   // every element of [0, n) exactly once, in 16-aligned contiguous chunks
//   pool.parallel_for(n, 16, [&](int64_t begin, int64_t end) { ... });
//   // node-local work: each task's units are split over the workers of its node
//   pool.run_on_nodes({{node, units, align, [&](int64_t b, int64_t e, int worker) { ... }}});
//
// Chunking is static and contiguous, so for element-wise kernels the result is
// bit-identical for any number of workers. A call from inside a worker (of any
// pool) runs inline: no nested parallelism. Exceptions thrown by a task are
// rethrown in the caller. Calls from several threads are serialised.
//
// fork(): the child has none of the parent's threads. The first use of the
// pool in the child starts new workers on the same slots (and never waits for
// a lock a parent thread held at the moment of fork).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "runtime/fork_safe_mutex.h"

namespace cnuma {

struct WorkerSlot {
  int cpu;   // the CPU the worker is pinned to
  int node;  // the NUMA node of that CPU, as the caller's machine model says
};

struct WorkerInfo {
  int index;          // position in the pool, 0..size-1
  int cpu;
  int node;
  int index_in_node;  // position among the workers of `node`
  long tid;           // kernel thread id in this process (for tests reading the affinity back)
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

class Pool {
 public:
  // Starts one worker per slot and waits until each is pinned. Throws
  // std::invalid_argument for an empty or oversized list, a negative node, or
  // a CPU the process may not run on (the kernel refused the pinning).
  explicit Pool(std::vector<WorkerSlot> slots, int spin_us = 50);
  ~Pool();  // joins the workers
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  int size() const { return static_cast<int>(slots_.size()); }
  const std::vector<WorkerSlot>& slots() const { return slots_; }
  std::vector<int> nodes() const;       // nodes with at least one worker, ascending
  std::vector<WorkerInfo> workers();    // starts the workers first in a forked child

  // Run fn(worker_index) once on every worker and wait.
  void run_on_workers(const std::function<void(int worker)>& fn);
  // Split [0, n) over all workers (static, `align`-aligned) and wait.
  void parallel_for(int64_t n, int64_t align, const std::function<void(int64_t, int64_t)>& fn);
  // Run each task on the workers of its node, all tasks in one dispatch, and wait.
  void run_on_nodes(const std::vector<NodeTask>& tasks);

  // Join the workers now; any later use throws std::runtime_error.
  void close();
  bool closed() const { return closed_; }

  // True on a worker thread of any pool.
  static bool in_worker();

 private:
  class Crew;
  Crew& crew_locked();  // the workers of this process, started if needed; mu_ held

  std::vector<WorkerSlot> slots_;
  std::vector<int> index_in_node_;
  std::chrono::microseconds spin_;
  ForkSafeMutex mu_;  // serialises dispatch, start and close
  std::unique_ptr<Crew> crew_;
  pid_t crew_pid_ = 0;  // the process crew_'s threads belong to
  bool closed_ = false;
};

}  // namespace cnuma
