// bandwidth(): the STREAM-style probes behind `composer-numa bench --bandwidth`.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <string>

#include "kernels/bandwidth.h"
#include "python/module.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace cnuma::python {
namespace {

nb::dict bandwidth(Pool& pool, const std::string& kernel, int64_t elements, int cpu_node, int mem_node,
                   int passes) {
  BandwidthResult r;
  {
    nb::gil_scoped_release release;
    r = measure_bandwidth(pool, kernel, elements, cpu_node, mem_node, passes);
  }
  nb::dict d;
  d["kernel"] = r.kernel;
  d["cpu_node"] = r.cpu_node;
  d["mem_node"] = r.mem_node;
  d["threads"] = r.threads;
  d["bytes_per_pass"] = r.bytes_per_pass;
  d["seconds"] = r.seconds;
  return d;
}

}  // namespace

void register_bandwidth(nb::module_& m) {
  m.def("bandwidth", &bandwidth, "pool"_a, "kernel"_a, "elements"_a, "cpu_node"_a, "mem_node"_a, "passes"_a = 5,
        "Time `passes` passes of kernel (read, copy, triad, adamw) over fp32 arrays of `elements` bound to "
        "mem_node, run by pool's workers of cpu_node. Does not check mem_node's free memory.");
}

}  // namespace cnuma::python
