// Python bindings of the composer_numa._C module. The kernels and the pool know
// nothing of Python; this file converts arguments, validates tensors coming in
// through DLPack (nanobind ndarray), releases the GIL around kernels and maps
// C++ exceptions to Python ones (NodeMemoryError -> MemoryError,
// std::invalid_argument -> ValueError).
#include <Python.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "adamw.h"
#include "bandwidth.h"
#include "cpu_features.h"
#include "experts.h"
#include "memory.h"
#include "workers.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

// ------------------------------------------------------------ tensors in ----

using Array = nb::ndarray<>;

std::string dtype_name(const nb::dlpack::dtype& d) {
  const char* kind = d.code == (uint8_t)nb::dlpack::dtype_code::Float    ? "float"
                     : d.code == (uint8_t)nb::dlpack::dtype_code::Bfloat ? "bfloat"
                     : d.code == (uint8_t)nb::dlpack::dtype_code::Int    ? "int"
                     : d.code == (uint8_t)nb::dlpack::dtype_code::UInt   ? "uint"
                     : d.code == (uint8_t)nb::dlpack::dtype_code::Bool   ? "bool"
                                                                         : "other";
  return std::string(kind) + std::to_string(d.bits);
}

// CPU and C-contiguous (size-1 dimensions may have any stride), or ValueError.
void check_cpu_contiguous(const Array& a, const std::string& where, const char* name) {
  if (a.device_type() != nb::device::cpu::value)
    throw std::invalid_argument(where + ": " + name + " must be a CPU tensor (got DLPack device " +
                                std::to_string(a.device_type()) + ":" +
                                std::to_string(a.device_id()) + ")");
  int64_t expected = 1;
  for (size_t i = a.ndim(); i-- > 0;) {
    if (a.shape(i) != 1 && a.stride(i) != expected)
      throw std::invalid_argument(where + ": " + name + " must be contiguous");
    expected *= static_cast<int64_t>(a.shape(i));
  }
}

cnuma::DType float_dtype(const Array& a, const std::string& where, const char* name) {
  const nb::dlpack::dtype d = a.dtype();
  if (d.lanes == 1 && d.bits == 32 && d.code == (uint8_t)nb::dlpack::dtype_code::Float)
    return cnuma::DType::F32;
  if (d.lanes == 1 && d.bits == 16 && d.code == (uint8_t)nb::dlpack::dtype_code::Bfloat)
    return cnuma::DType::BF16;
  throw std::invalid_argument(where + ": " + name + " has dtype " + dtype_name(d) +
                              "; expected float32 or bfloat16");
}

// ------------------------------------------------------------ memory -------

// Legacy DLPack ABI (stable since v0.2), built by hand so the owner is a plain
// C++ object: torch may free the tensor on a thread without the GIL.
struct DLDevice { int32_t device_type; int32_t device_id; };
struct DLDataType { uint8_t code; uint8_t bits; uint16_t lanes; };
struct DLTensor {
  void* data; DLDevice device; int32_t ndim; DLDataType dtype;
  int64_t* shape; int64_t* strides; uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};

struct Owned {
  DLManagedTensor mt;
  int64_t shape[1];
  std::unique_ptr<cnuma::NodeBuffer> buf;
};

void owned_delete(DLManagedTensor* mt) { delete static_cast<Owned*>(mt->manager_ctx); }

void capsule_destructor(PyObject* cap) {
  // Still named "dltensor": nobody consumed it, so the mapping is ours to free.
  if (PyCapsule_IsValid(cap, "dltensor")) {
    auto* mt = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
    if (mt != nullptr) mt->deleter(mt);
  }
}

nb::tuple alloc(size_t nbytes, const std::vector<int>& nodes, const std::string& policy, bool pin,
                bool populate) {
  const cnuma::Policy p = cnuma::parse_policy(policy);
  std::unique_ptr<cnuma::NodeBuffer> buf;
  {
    nb::gil_scoped_release release;
    buf = cnuma::NodeBuffer::allocate(nbytes, nodes, p, populate);
  }
  std::string why;
  if (pin) why = buf->pin();
  auto* o = new Owned();
  o->shape[0] = static_cast<int64_t>(nbytes);
  o->mt.dl_tensor = DLTensor{buf->data(), {1 /* kDLCPU */, 0}, 1, {1 /* kDLUInt */, 8, 1},
                             o->shape, nullptr, 0};
  o->mt.manager_ctx = o;
  o->mt.deleter = &owned_delete;
  const bool pinned = buf->pinned();
  o->buf = std::move(buf);
  PyObject* cap = PyCapsule_New(&o->mt, "dltensor", &capsule_destructor);
  if (cap == nullptr) {
    delete o;
    throw nb::python_error();
  }
  return nb::make_tuple(nb::steal(cap), pinned, why);
}

nb::dict meminfo_dict(int node) {
  const cnuma::NodeMemInfo i = cnuma::node_meminfo(node);
  nb::dict d;
  d["node"] = i.node;
  d["total_bytes"] = i.total_bytes;
  d["free_bytes"] = i.free_bytes;
  d["available_bytes"] = i.available_bytes;
  return d;
}

void zero_(const Array& a, int node) {
  check_cpu_contiguous(a, "zero_", "tensor");
  const size_t nbytes = a.nbytes();
  if (nbytes == 0) return;
  void* data = a.data();
  nb::gil_scoped_release release;
  cnuma::parallel_zero(data, nbytes, node);
}

// ------------------------------------------------------------ workers ------

nb::list workers_list() {
  nb::list out;
  for (const cnuma::WorkerInfo& w : cnuma::workers()) {
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

// Which worker processed each unit of [0, n): exposes the static chunking.
std::vector<int> chunk_owners(int64_t n, int64_t align, std::optional<int> node) {
  if (n < 0) throw std::invalid_argument("n must be >= 0");
  std::vector<int> owner(static_cast<size_t>(n), -1);
  nb::gil_scoped_release release;
  if (node) {
    std::vector<cnuma::NodeTask> tasks;
    tasks.push_back({*node, n, align, [&](int64_t b, int64_t e, int w) {
                       for (int64_t i = b; i < e; ++i) owner[i] = w;
                     }});
    cnuma::run_on_nodes(tasks);
  } else {
    cnuma::run_on_workers([&](int w) {
      const auto [b, e] = cnuma::static_chunk(n, cnuma::num_threads(), w, align);
      for (int64_t i = b; i < e; ++i) owner[i] = w;
    });
  }
  return owner;
}

// ------------------------------------------------------------ adamw --------

using JobTuple = std::tuple<int, Array, Array, Array, Array, std::optional<Array>, double, double,
                            double, double, double, int64_t, double, bool>;

void adamw_step(const std::vector<JobTuple>& tuples) {
  std::vector<cnuma::AdamWJob> jobs;
  jobs.reserve(tuples.size());
  for (size_t k = 0; k < tuples.size(); ++k) {
    const auto& [node, param, grad, exp_avg, exp_avg_sq, master, lr, beta1, beta2, eps, wd, step,
                 grad_scale, maximize] = tuples[k];
    const std::string where = "adamw_step job " + std::to_string(k);
    cnuma::AdamWJob j;
    j.node = node;
    j.n = static_cast<int64_t>(param.size());
    const std::pair<const Array*, const char*> all[] = {
        {&param, "param"}, {&grad, "grad"}, {&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"}};
    for (const auto& [arr, name] : all) {
      check_cpu_contiguous(*arr, where, name);
      if (static_cast<int64_t>(arr->size()) != j.n)
        throw std::invalid_argument(where + ": " + name + " has " + std::to_string(arr->size()) +
                                    " elements but param has " + std::to_string(j.n));
    }
    j.param_dtype = float_dtype(param, where, "param");
    j.grad_dtype = float_dtype(grad, where, "grad");
    j.state_dtype = float_dtype(exp_avg, where, "exp_avg");
    if (float_dtype(exp_avg_sq, where, "exp_avg_sq") != j.state_dtype)
      throw std::invalid_argument(where + ": exp_avg and exp_avg_sq must have the same dtype");
    if (master) {
      check_cpu_contiguous(*master, where, "master");
      if (float_dtype(*master, where, "master") != cnuma::DType::F32)
        throw std::invalid_argument(where + ": master weights must be float32");
      if (static_cast<int64_t>(master->size()) != j.n)
        throw std::invalid_argument(where + ": master has " + std::to_string(master->size()) +
                                    " elements but param has " + std::to_string(j.n));
      j.master = static_cast<float*>(master->data());
    }
    if (!(lr >= 0.0)) throw std::invalid_argument(where + ": lr must be >= 0");
    if (!(eps >= 0.0)) throw std::invalid_argument(where + ": eps must be >= 0");
    if (!(beta1 >= 0.0 && beta1 < 1.0) || !(beta2 >= 0.0 && beta2 < 1.0))
      throw std::invalid_argument(where + ": betas must be in [0, 1)");
    j.param = param.data();
    j.grad = grad.data();
    j.exp_avg = exp_avg.data();
    j.exp_avg_sq = exp_avg_sq.data();
    j.s = cnuma::adamw_scalars(lr, beta1, beta2, eps, wd, step, grad_scale, maximize);
    jobs.push_back(j);
  }
  nb::gil_scoped_release release;
  cnuma::adamw_step(jobs);
}

nb::dict bandwidth(const std::string& kernel, int64_t elements, int cpu_node, int mem_node,
                   int passes) {
  cnuma::BandwidthResult r;
  {
    nb::gil_scoped_release release;
    r = cnuma::measure_bandwidth(kernel, elements, cpu_node, mem_node, passes);
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

NB_MODULE(_C, m) {
  m.doc() = "composer-numa native kernels";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const cnuma::NodeMemoryError& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    }
  });

  // cpu features
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

  // memory
  m.def("alloc", &alloc, "nbytes"_a, "nodes"_a, "policy"_a, "pin"_a = false, "populate"_a = true,
        "Map nbytes bound to nodes; returns (DLPack capsule of uint8[nbytes], pinned, why_not).");
  m.def("pages_per_node", [](uintptr_t ptr, size_t nbytes) {
    nb::gil_scoped_release release;
    return cnuma::pages_per_node(reinterpret_cast<const void*>(ptr), nbytes);
  }, "ptr"_a, "nbytes"_a, "Resident pages per node of [ptr, ptr+nbytes); -1 = not faulted in.");
  m.def("mempolicy_of", [](uintptr_t ptr) {
    return cnuma::mempolicy_of(reinterpret_cast<const void*>(ptr));
  }, "ptr"_a, "(mode, nodes) of the mapping containing ptr (get_mempolicy MPOL_F_ADDR).");
  m.def("node_meminfo", &meminfo_dict, "node"_a);
  m.def("online_nodes", &cnuma::online_nodes);
  m.def("memory_nodes", &cnuma::memory_nodes,
        "Online nodes with memory inside this process's Mems_allowed.");
  m.def("page_size", &cnuma::page_size);
  m.def("zero_", &zero_, "tensor"_a, "node"_a = -1,
        "Zero a contiguous CPU tensor in place with the workers of node (-1: all).");

  // workers
  m.def("num_threads", &cnuma::num_threads);
  m.def("set_num_threads", [](int n) {
    nb::gil_scoped_release release;
    cnuma::set_num_threads(n);
  }, "n"_a, "Use n workers (0: one per physical core of the current affinity).");
  m.def("workers", &workers_list);
  m.def("worker_nodes", &cnuma::worker_nodes);
  m.def("shutdown_pool", []() {
    nb::gil_scoped_release release;
    cnuma::shutdown_pool();
  });
  m.def("chunk_owners", &chunk_owners, "n"_a, "align"_a = 1, "node"_a = nb::none(),
        "The worker that processed each unit of [0, n) (static chunking, for tests).");

  // adamw
  m.def("adamw_step", &adamw_step, "jobs"_a,
        "Fused AdamW over jobs (node, param, grad, exp_avg, exp_avg_sq, master|None, lr, beta1, "
        "beta2, eps, weight_decay, step, grad_scale, maximize), one dispatch, GIL released.");
  m.def("simd_path", &cnuma::simd_path);
  m.def("float_to_bf16", &cnuma::float_to_bf16);

  // bandwidth
  m.def("bandwidth", &bandwidth, "kernel"_a, "elements"_a, "cpu_node"_a, "mem_node"_a,
        "passes"_a = 5);

  // experts (NumaExperts kernels; bindings live next to them in experts.cpp)
  cnuma::register_experts(m);
}
