// cpu_features(), simd_level(), simd_path(): what the kernels will run on.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "common/bf16.h"
#include "common/cpu_features.h"
#include "python/module.h"

namespace nb = nanobind;

namespace cnuma::python {

void register_cpu(nb::module_& m) {
  m.def("cpu_features", []() {
    const CpuFeatures& f = cpu_features();
    nb::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["avx512f"] = f.avx512f;
    d["avx512bw"] = f.avx512bw;
    d["avx512vl"] = f.avx512vl;
    d["avx512bf16"] = f.avx512bf16;
    d["amx"] = f.amx_tile && f.amx_bf16;
    return d;
  }, "Which SIMD extensions the running CPU and OS support.");
  m.def("simd_level", &simd_level,
        "The SIMD path kernels use: 'avx512', 'avx2' or 'scalar' (capped by COMPOSER_NUMA_SIMD).");
  m.def("simd_path", []() { return static_cast<int>(active_isa()); },
        "simd_level() as a number: 2 = avx512, 1 = avx2, 0 = scalar.");
  m.def("float_to_bf16", [](float f) { return f32_to_bf16(f); }, nb::arg("value"),
        "The bf16 bits every kernel writes for a float (nearest even; NaN -> 0x7fc0).");
}

}  // namespace cnuma::python
