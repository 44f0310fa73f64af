// Tokens grouped by expert (routing) and the scheduler that runs a call's
// phases over the slices' work items on each node's workers.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include <sched.h>

#include "common/checked.h"
#include "common/simd.h"
#include "kernels/experts/experts.h"
#include "runtime/pool.h"

namespace cnuma {
namespace experts {

// Slots (token, choice) grouped by expert, in token order.
struct Routing {
  std::vector<int64_t> start;   // [experts + 1]
  std::vector<int64_t> token;   // slot -> token
  std::vector<int32_t> expert;  // slot -> expert
  std::vector<float> weight;    // slot -> routing weight
  std::vector<int64_t> slot;    // token * k + choice -> slot
  std::vector<int32_t> active;  // experts with at least one slot
  int64_t count(int e) const { return start[e + 1] - start[e]; }
};

// std::out_of_range naming the first id outside [0, experts).
Routing route(int64_t experts, const int64_t* ids, const float* weights, int64_t tokens, int64_t k);

// Blocks taken from a queue at a time (in whole items): runs of neighbouring blocks keep each
// worker's stream contiguous for longer.
constexpr int64_t kGrab = 4;

// Dispatch. All phases of all slices run in ONE dispatch of the pool: each
// node's workers take the items of that node's slices from shared queues
// (experts carry different token counts, so static chunks would idle workers)
// and move on to a slice's next phase once every item of its current phase is
// done. Only the slice's own workers wait for it, so a call from inside a
// worker (run inline, one task after another) cannot deadlock, and waking the
// sleeping workers is paid once per call rather than once per phase.

struct Item {
  int32_t expert;
  int32_t index;  // block, column chunk, ... depending on the phase
  int32_t kind;   // backward phase 2 only
  int32_t count = 1;  // consecutive blocks in one item (the quantized decode's side-by-side streams)
};

using PhaseItems = std::vector<std::vector<std::vector<Item>>>;  // [phase][slice] -> items

CNUMA_INLINE void wait_until(const std::atomic<int64_t>& done, int64_t n) {
  for (int spins = 0; done.load(std::memory_order_acquire) < n;) {
    cpu_relax();
    if (++spins == 256) {  // more workers than cores: let the one we wait for run
      sched_yield();
      spins = 0;
    }
  }
}

template <class Body>
void run_phases(Pool& pool, const std::vector<Slice>& slices, const PhaseItems& items, const Body& body) {
  const size_t P = slices.size(), F = items.size();
  std::unique_ptr<std::atomic<int64_t>[]> next(new std::atomic<int64_t>[F * P]);
  std::unique_ptr<std::atomic<int64_t>[]> done(new std::atomic<int64_t>[F * P]);
  for (size_t i = 0; i < F * P; ++i) {
    next[i].store(0, std::memory_order_relaxed);
    done[i].store(0, std::memory_order_relaxed);
  }
  // Items taken per grab: about kGrab blocks' worth (decode items carry several).
  std::vector<int64_t> grabs(F * P);
  for (size_t i = 0; i < F * P; ++i) {
    const std::vector<Item>& list = items[i / P][i % P];
    int64_t blocks = 0;
    for (const Item& it : list) blocks += it.count;
    const int64_t n = static_cast<int64_t>(list.size());
    grabs[i] = blocks > 0 ? std::max<int64_t>(1, kGrab * n / blocks) : kGrab;
  }
  std::vector<int> nodes;
  for (const Slice& sl : slices)
    if (std::find(nodes.begin(), nodes.end(), sl.node) == nodes.end()) nodes.push_back(sl.node);
  std::vector<NodeTask> tasks;
  for (int node : nodes) {
    tasks.push_back({node, 1 << 12, 1, [&, node](int64_t, int64_t, int) {
                       for (size_t f = 0; f < F; ++f) {
                         for (size_t p = 0; p < P; ++p) {
                           if (slices[p].node != node) continue;
                           const std::vector<Item>& list = items[f][p];
                           const int64_t n = static_cast<int64_t>(list.size());
                           const int64_t grab = grabs[f * P + p];
                           for (;;) {
                             const int64_t i0 = next[f * P + p].fetch_add(grab, std::memory_order_relaxed);
                             if (i0 >= n) break;
                             const int64_t i1 = std::min(n, i0 + grab);
                             for (int64_t i = i0; i < i1; ++i) body(f, p, list[i]);
                             done[f * P + p].fetch_add(i1 - i0, std::memory_order_release);
                           }
                         }
                         for (size_t p = 0; p < P; ++p)
                           if (slices[p].node == node)
                             wait_until(done[f * P + p], static_cast<int64_t>(items[f][p].size()));
                       }
                     }});
  }
  pool.run_on_nodes(tasks);
}

// Per-token reductions: inline on the calling thread when small (a dispatch
// costs more than the work), else split over all workers.
template <class Fn>
void for_tokens(Pool& pool, int64_t tokens, double work_per_token, const Fn& fn) {
  if (static_cast<double>(tokens) * work_per_token <= static_cast<double>(1 << 18))
    fn(int64_t{0}, tokens);
  else
    pool.parallel_for(tokens, 1, fn);
}

// Carves consecutive 64-byte aligned regions out of one buffer. Sizes are
// counted first (bytes(), with overflow checks), then the same takes are made.
struct Carver {
  char* base = nullptr;
  int64_t used = 0;
  template <class T>
  T* take(int64_t count) {
    T* p = base != nullptr ? reinterpret_cast<T*>(base + used) : nullptr;
    const int64_t bytes = checked_mul(count, static_cast<int64_t>(sizeof(T)), "an expert scratch buffer");
    used = checked_add(used, checked_round_up(bytes, int64_t{64}, "an expert scratch buffer"),
                       "an expert scratch buffer");
    return p;
  }
};

}  // namespace experts
}  // namespace cnuma
