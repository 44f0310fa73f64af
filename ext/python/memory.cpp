// Node-local buffers handed to torch through DLPack, and page/policy queries.
#include <Python.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "python/module.h"
#include "python/tensors.h"
#include "runtime/mempolicy.h"
#include "runtime/node_buffer.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace cnuma::python {
namespace {

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
  std::unique_ptr<NodeBuffer> buf;
};

void owned_delete(DLManagedTensor* mt) { delete static_cast<Owned*>(mt->manager_ctx); }

void capsule_destructor(PyObject* cap) {
  // Still named "dltensor": nobody consumed it, so the mapping is ours to free.
  if (PyCapsule_IsValid(cap, "dltensor")) {
    auto* mt = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
    if (mt != nullptr) mt->deleter(mt);
  }
}

nb::tuple alloc(Pool& pool, size_t nbytes, const std::vector<int>& nodes, const std::string& policy, bool pin,
                bool populate) {
  const Policy p = parse_policy(policy);
  std::unique_ptr<NodeBuffer> buf;
  {
    nb::gil_scoped_release release;
    buf = NodeBuffer::allocate(&pool, nbytes, nodes, p, populate);
  }
  std::string why;
  if (pin) why = buf->pin();
  auto owned = std::make_unique<Owned>();
  owned->shape[0] = static_cast<int64_t>(nbytes);  // below physical memory, so it fits
  owned->mt.dl_tensor = DLTensor{buf->data(), {1 /* kDLCPU */, 0}, 1, {1 /* kDLUInt */, 8, 1}, owned->shape, nullptr, 0};
  owned->mt.manager_ctx = owned.get();
  owned->mt.deleter = &owned_delete;
  const bool pinned = buf->pinned();
  owned->buf = std::move(buf);
  PyObject* cap = PyCapsule_New(&owned->mt, "dltensor", &capsule_destructor);
  if (cap == nullptr) throw nb::python_error();
  (void)owned.release();  // the capsule (then torch) owns it now
  return nb::make_tuple(nb::steal(cap), pinned, why);
}

void zero_(Pool& pool, const Array& a, int node) {
  check_cpu_contiguous(a, "zero_", "tensor");
  const size_t nbytes = a.nbytes();
  if (nbytes == 0) return;
  void* data = a.data();
  nb::gil_scoped_release release;
  parallel_zero(pool, data, nbytes, node);
}

}  // namespace

void register_memory(nb::module_& m) {
  m.def("alloc", &alloc, "pool"_a, "nbytes"_a, "nodes"_a, "policy"_a, "pin"_a = false, "populate"_a = true,
        "Map nbytes placed on nodes, faulted in by pool's workers of the node; returns (DLPack capsule of "
        "uint8[nbytes], pinned, why_not). Does not check the node's free memory: "
        "composer_numa.offload.memory.empty does, under a cross-process reservation.");
  m.def("pages_per_node", [](uintptr_t ptr, size_t nbytes) {
    nb::gil_scoped_release release;
    return pages_per_node(reinterpret_cast<const void*>(ptr), nbytes);
  }, "ptr"_a, "nbytes"_a, "Resident pages per node of [ptr, ptr+nbytes); -1 = not faulted in.");
  m.def("mempolicy_of", [](uintptr_t ptr) { return policy_of(reinterpret_cast<const void*>(ptr)); }, "ptr"_a,
        "(mode, nodes) of the mapping containing ptr (get_mempolicy MPOL_F_ADDR).");
  m.def("page_size", &page_size);
  m.def("zero_", &zero_, "pool"_a, "tensor"_a, "node"_a = -1,
        "Zero a contiguous CPU tensor in place with pool's workers of node (-1: all).");
}

}  // namespace cnuma::python
