// The Pool class: an explicit set of pinned workers that kernels run on.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "python/module.h"
#include "runtime/pool.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace cnuma::python {
namespace {

constexpr int64_t kMaxChunkUnits = int64_t{1} << 28;

nb::list workers_list(Pool& pool) {
  std::vector<WorkerInfo> infos;
  {
    nb::gil_scoped_release release;  // starts the workers first in a forked child
    infos = pool.workers();
  }
  nb::list out;
  for (const WorkerInfo& w : infos) {
    nb::dict d;
    d["index"] = w.index;
    d["cpu"] = w.cpu;
    d["node"] = w.node;
    d["index_in_node"] = w.index_in_node;
    d["tid"] = w.tid;
    out.append(d);
  }
  return out;
}

// Which worker processed each unit of [0, n): exposes the static chunking (tests).
std::vector<int> chunk_owners(Pool& pool, int64_t n, int64_t align, std::optional<int> node) {
  if (n < 0 || n > kMaxChunkUnits)
    throw std::invalid_argument("chunk_owners: n must be in [0, 2^28], got " + std::to_string(n));
  if (align < 1) throw std::invalid_argument("chunk_owners: align must be >= 1, got " + std::to_string(align));
  std::vector<int> owner(static_cast<size_t>(n), -1);
  nb::gil_scoped_release release;
  if (node) {
    pool.run_on_nodes({{*node, n, align, [&](int64_t b, int64_t e, int w) {
                          for (int64_t i = b; i < e; ++i) owner[i] = w;
                        }}});
  } else {
    const int parts = pool.size();
    pool.run_on_workers([&](int w) {
      const auto [b, e] = static_chunk(n, parts, w, align);
      for (int64_t i = b; i < e; ++i) owner[i] = w;
    });
  }
  return owner;
}

}  // namespace

void register_pool(nb::module_& m) {
  nb::class_<Pool>(m, "Pool",
                   "Pinned worker threads, one per (cpu, node) slot. composer_numa.offload.runtime owns the "
                   "process's default pool; kernels take the pool they run on.")
      .def("__init__",
           [](Pool* self, const std::vector<std::pair<int, int>>& slots, int spin_us) {
             std::vector<WorkerSlot> s;
             s.reserve(slots.size());
             for (const auto& [cpu, node] : slots) s.push_back({cpu, node});
             nb::gil_scoped_release release;
             new (self) Pool(std::move(s), spin_us);
           },
           "slots"_a, "spin_us"_a = 50,
           "Start one worker per (cpu, node) slot, each pinned to its CPU; spin_us: how long an idle "
           "worker spins before it sleeps.")
      .def_prop_ro("size", &Pool::size, "Number of workers.")
      .def("__len__", &Pool::size)
      .def("slots", [](const Pool& p) {
        std::vector<std::pair<int, int>> out;
        for (const WorkerSlot& s : p.slots()) out.emplace_back(s.cpu, s.node);
        return out;
      }, "The (cpu, node) of each worker.")
      .def("nodes", &Pool::nodes, "Nodes with at least one worker, ascending.")
      .def("workers", &workers_list, "Per worker: index, cpu, node, index_in_node and kernel thread id.")
      .def("chunk_owners", &chunk_owners, "n"_a, "align"_a = 1, "node"_a = nb::none(),
           "The worker that processed each unit of [0, n) (static chunking, for tests).")
      .def("close", [](Pool& p) {
        nb::gil_scoped_release release;
        p.close();
      }, "Join the workers now; later use raises RuntimeError.")
      .def_prop_ro("closed", &Pool::closed)
      .def("__repr__", [](const Pool& p) {
        std::string nodes;
        for (int n : p.nodes()) nodes += (nodes.empty() ? "" : ",") + std::to_string(n);
        return "Pool(" + std::to_string(p.size()) + " workers, nodes " + nodes + (p.closed() ? ", closed)" : ")");
      });
}

}  // namespace cnuma::python
