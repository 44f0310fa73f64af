// Python bindings of the composer_numa._C module. Each concern registers its
// functions from its own file through a register_* hook declared here.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "cpu_features.h"

namespace nb = nanobind;

NB_MODULE(_C, m) {
  m.doc() = "composer-numa native kernels";

  m.def("cpu_features", []() {
    const cnuma::CpuFeatures& f = cnuma::cpu_features();
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
  m.def("simd_level", &cnuma::simd_level,
        "The SIMD path kernels use: 'avx512', 'avx2' or 'scalar' (capped by COMPOSER_NUMA_SIMD).");
}
