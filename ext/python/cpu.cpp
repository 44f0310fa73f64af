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
    d["avx512vnni"] = f.avx512vnni;  // quantized experts' int16 dot products
    d["amx_int8"] = f.amx_tile && f.amx_int8;  // usable only with the tile unit, like "amx"
    d["amd"] = f.amd;  // vendor: kernels tune per vendor (adamw_prefetch)
    d["asimd"] = f.asimd;  // aarch64 from here on: the names of /proc/cpuinfo's Features line
    d["asimddp"] = f.asimddp;
    d["bf16"] = f.bf16;
    d["i8mm"] = f.i8mm;
    d["sve"] = f.sve;
    d["sve2"] = f.sve2;
    return d;
  }, "Which SIMD extensions the running CPU and OS support.");
  m.def("simd_level", &simd_level,
        "The SIMD path kernels use: 'avx512', 'avx2', 'neon' or 'scalar' (capped by COMPOSER_NUMA_SIMD).");
  m.def("simd_path", []() { return static_cast<int>(active_isa()); },
        "simd_level() as a number: 2 = avx512, 1 = avx2, 3 = neon, 0 = scalar.");
  m.def("float_to_bf16", [](float f) { return f32_to_bf16(f); }, nb::arg("value"),
        "The bf16 bits every kernel writes for a float (nearest even; NaN -> 0x7fc0).");
}

}  // namespace cnuma::python
