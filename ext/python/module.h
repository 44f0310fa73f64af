// The pieces of the composer_numa._C module: each file binds one concern.
#pragma once

#include <nanobind/nanobind.h>

namespace cnuma::python {

void register_cpu(nanobind::module_& m);        // cpu.cpp: features and the SIMD path
void register_pool(nanobind::module_& m);       // pool.cpp: the Pool class
void register_memory(nanobind::module_& m);     // memory.cpp: node buffers and page queries
void register_adamw(nanobind::module_& m);      // adamw.cpp: the fused AdamW step
void register_bandwidth(nanobind::module_& m);  // bandwidth.cpp: the STREAM-style probes
void register_experts(nanobind::module_& m);    // experts.cpp: the Experts class

}  // namespace cnuma::python
