// The Experts class (NumaExperts' native layer). Every tensor is checked here,
// so a wrong shape, dtype or device is a ValueError and never an out-of-bounds access.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <climits>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/checked.h"
#include "kernels/experts/experts.h"
#include "kernels/experts/quant.h"
#include "python/module.h"
#include "python/tensors.h"

namespace nb = nanobind;

namespace cnuma::python {
namespace {

const char* dtype_text(experts::DType d) { return d == experts::DType::BF16 ? "bfloat16" : "float32"; }

bool is_layer_dtype(const Array& a, experts::DType d) {
  return d == experts::DType::BF16 ? is_dtype(a, nb::dlpack::dtype_code::Bfloat, 16)
                                   : is_dtype(a, nb::dlpack::dtype_code::Float, 32);
}

void check_tensor(const Array& a, const std::string& name) { check_cpu_contiguous(a, "NumaExperts", name); }

void check_flat(const Array& a, const std::string& name, int64_t elements, bool layer_dtype,
                experts::DType d) {
  check_tensor(a, name);
  if (layer_dtype ? !is_layer_dtype(a, d) : !is_dtype(a, nb::dlpack::dtype_code::Float, 32))
    throw std::invalid_argument("NumaExperts: " + name + " must be " +
                                (layer_dtype ? dtype_text(d) : "float32"));
  if (static_cast<int64_t>(a.size()) != elements)
    throw std::invalid_argument("NumaExperts: " + name + " has " + std::to_string(a.size()) +
                                " elements, expected " + std::to_string(elements));
}

void check_matrix(const Array& a, const std::string& name, int64_t rows, int64_t cols) {
  check_tensor(a, name);
  if (a.ndim() != 2 || static_cast<int64_t>(a.shape(0)) != rows ||
      static_cast<int64_t>(a.shape(1)) != cols)
    throw std::invalid_argument("NumaExperts: " + name + " must have shape [" + std::to_string(rows) +
                                ", " + std::to_string(cols) + "]");
}

struct Call {
  int64_t tokens = 0, k = 0;
  const int64_t* ids = nullptr;
  const float* weights = nullptr;
};

Call check_routing(const experts::Layer& L, const Array& x, const Array& ids, const Array& weights) {
  check_tensor(x, "x");
  if (x.ndim() != 2 || static_cast<int64_t>(x.shape(1)) != L.hidden)
    throw std::invalid_argument("NumaExperts: x must have shape [tokens, " + std::to_string(L.hidden) + "]");
  if (!is_layer_dtype(x, L.dtype))
    throw std::invalid_argument(std::string("NumaExperts: x must be ") + dtype_text(L.dtype));
  Call c;
  c.tokens = static_cast<int64_t>(x.shape(0));
  check_tensor(ids, "topk_ids");
  if (ids.ndim() != 2 || static_cast<int64_t>(ids.shape(0)) != c.tokens)
    throw std::invalid_argument("NumaExperts: topk_ids must have shape [tokens, k]");
  if (!is_dtype(ids, nb::dlpack::dtype_code::Int, 64))
    throw std::invalid_argument("NumaExperts: topk_ids must be int64");
  c.k = static_cast<int64_t>(ids.shape(1));
  check_matrix(weights, "topk_weights", c.tokens, c.k);
  if (!is_dtype(weights, nb::dlpack::dtype_code::Float, 32))
    throw std::invalid_argument("NumaExperts: topk_weights must be float32");
  int64_t slots = 0;
  if (__builtin_mul_overflow(c.tokens, c.k, &slots) || slots >= (int64_t{1} << 31))
    throw std::invalid_argument("NumaExperts: tokens * k must be below 2^31");
  c.ids = static_cast<const int64_t*>(ids.data());
  c.weights = static_cast<const float*>(weights.data());
  return c;
}

std::vector<experts::SliceData> check_weights(const experts::Experts& ex, const std::vector<Array>& w13,
                                              const std::vector<Array>& w2) {
  const size_t P = ex.slices().size();
  if (w13.size() != P || w2.size() != P)
    throw std::invalid_argument("NumaExperts: one w13 and one w2 tensor per slice are needed");
  std::vector<experts::SliceData> d(P);
  for (size_t p = 0; p < P; ++p) {
    check_flat(w13[p], "w13[" + std::to_string(p) + "]", ex.w13_elements(p), true, ex.layer().dtype);
    check_flat(w2[p], "w2[" + std::to_string(p) + "]", ex.w2_elements(p), true, ex.layer().dtype);
    d[p].w13 = w13[p].data();
    d[p].w2 = w2[p].data();
  }
  return d;
}

// The forward's saved pre-activations, per slice (the float and the quantized
// layers' slice data both carry save_gate / save_up).
template <class Ex, class Data>
void check_saved(const Ex& ex, std::vector<Data>& d, int64_t slots, const std::vector<Array>& gate,
                 const std::vector<Array>& up) {
  const size_t P = ex.slices().size();
  if (gate.size() != P || up.size() != P)
    throw std::invalid_argument("NumaExperts: one saved gate and up tensor per slice are needed");
  for (size_t p = 0; p < P; ++p) {
    const experts::Slice& s = ex.slices()[p];
    const int64_t n = slots * (s.row1 - s.row0);
    check_flat(gate[p], "saved gate[" + std::to_string(p) + "]", n, false, ex.layer().dtype);
    check_flat(up[p], "saved up[" + std::to_string(p) + "]", n, false, ex.layer().dtype);
    d[p].save_gate = static_cast<float*>(gate[p].data());
    d[p].save_up = static_cast<float*>(up[p].data());
  }
}

experts::DType parse_dtype(const std::string& s) {
  if (s == "float32") return experts::DType::F32;
  if (s == "bfloat16") return experts::DType::BF16;
  throw std::invalid_argument("NumaExperts: dtype must be 'float32' or 'bfloat16', got '" + s + "'");
}

// The layer and its slices from the constructors' arguments (both layers take
// the same ones); `who` names the class in the one-line errors.
std::pair<experts::Layer, std::vector<experts::Slice>> layer_and_slices(
    const char* who, int64_t num_experts, int64_t hidden, int64_t intermediate, const std::string& dtype,
    const std::vector<int>& nodes, const std::vector<std::vector<int32_t>>& local, const std::vector<int64_t>& rows,
    const std::vector<int64_t>& row0, const std::vector<int64_t>& row1) {
  const size_t P = nodes.size();
  if (local.size() != P || rows.size() != P || row0.size() != P || row1.size() != P)
    throw std::invalid_argument(std::string(who) + ": nodes, local, rows, row0 and row1 must have one entry per slice");
  experts::Layer L;
  L.experts = num_experts;
  L.hidden = hidden;
  // Padded only when in range; the constructor rejects the rest with a ValueError.
  L.hidden_padded = hidden > 0 && hidden <= INT32_MAX ? checked_round_up(hidden, experts::kAlign, "hidden") : hidden;
  L.intermediate = intermediate;
  L.dtype = parse_dtype(dtype);
  std::vector<experts::Slice> slices(P);
  for (size_t p = 0; p < P; ++p) slices[p] = {nodes[p], local[p], rows[p], row0[p], row1[p]};
  return {L, std::move(slices)};
}

// ------------------------------------------------------------ quantized --

void check_bytes(const Array& a, const std::string& name, int64_t bytes) {
  check_tensor(a, name);
  if (!is_dtype(a, nb::dlpack::dtype_code::UInt, 8) && !is_dtype(a, nb::dlpack::dtype_code::Int, 8))
    throw std::invalid_argument("NumaExperts: " + name + " must be uint8 or int8");
  if (static_cast<int64_t>(a.size()) != bytes)
    throw std::invalid_argument("NumaExperts: " + name + " has " + std::to_string(a.size()) + " bytes, expected " +
                                std::to_string(bytes));
}

void check_scales(const experts::QuantExperts& ex, const Array& a, const std::string& name, int64_t n) {
  check_tensor(a, name);
  const bool bf = ex.spec().scale_bf16;
  if (!is_dtype(a, bf ? nb::dlpack::dtype_code::Bfloat : nb::dlpack::dtype_code::Float, 16))
    throw std::invalid_argument("NumaExperts: " + name + " must be " + (bf ? "bfloat16" : "float16"));
  if (static_cast<int64_t>(a.size()) != n)
    throw std::invalid_argument("NumaExperts: " + name + " has " + std::to_string(a.size()) +
                                " elements, expected " + std::to_string(n));
}

std::vector<experts::QuantSliceData> check_quant(const experts::QuantExperts& ex, const std::vector<Array>& w13,
                                                 const std::vector<Array>& w2, const std::vector<Array>& s13,
                                                 const std::vector<Array>& s2) {
  const size_t P = ex.slices().size();
  if (w13.size() != P || w2.size() != P || s13.size() != P || s2.size() != P)
    throw std::invalid_argument("NumaExperts: one w13, w2, s13 and s2 tensor per slice are needed");
  std::vector<experts::QuantSliceData> d(P);
  for (size_t p = 0; p < P; ++p) {
    const std::string i = "[" + std::to_string(p) + "]";
    check_bytes(w13[p], "w13" + i, ex.w13_bytes(p));
    check_bytes(w2[p], "w2" + i, ex.w2_bytes(p));
    check_scales(ex, s13[p], "s13" + i, ex.s13_elements(p));
    check_scales(ex, s2[p], "s2" + i, ex.s2_elements(p));
    d[p].w13 = static_cast<const uint8_t*>(w13[p].data());
    d[p].w2 = static_cast<const uint8_t*>(w2[p].data());
    d[p].s13 = static_cast<const uint16_t*>(s13[p].data());
    d[p].s2 = static_cast<const uint16_t*>(s2[p].data());
  }
  return d;
}

void register_quant(nb::module_& m) {
  using experts::QuantExperts;
  nb::class_<QuantExperts>(m, "QuantExperts",
                           "Quantized expert slices and their scratch buffers (composer_numa.offload.quant drives it).")
      .def("__init__",
           [](QuantExperts* self, int64_t num_experts, int64_t hidden, int64_t intermediate, const std::string& dtype,
              int bits, int64_t group, const std::string& scale_dtype, const std::vector<int>& nodes,
              const std::vector<std::vector<int32_t>>& local, const std::vector<int64_t>& rows,
              const std::vector<int64_t>& row0, const std::vector<int64_t>& row1) {
             if (scale_dtype != "float16" && scale_dtype != "bfloat16")
               throw std::invalid_argument("QuantExperts: scale_dtype must be 'float16' or 'bfloat16', got '" +
                                           scale_dtype + "'");
             auto [L, slices] = layer_and_slices("QuantExperts", num_experts, hidden, intermediate, dtype, nodes,
                                                 local, rows, row0, row1);
             experts::QuantSpec spec;
             spec.bits = bits;
             spec.group = group;
             spec.scale_bf16 = scale_dtype == "bfloat16";
             new (self) QuantExperts(L, std::move(slices), spec);
           },
           nb::arg("num_experts"), nb::arg("hidden"), nb::arg("intermediate"), nb::arg("dtype"), nb::arg("bits"),
           nb::arg("group"), nb::arg("scale_dtype"), nb::arg("nodes"), nb::arg("local"), nb::arg("rows"),
           nb::arg("row0"), nb::arg("row1"))
      .def("w13_bytes", [](const QuantExperts& e, size_t p) { return e.w13_bytes(p); })
      .def("w2_bytes", [](const QuantExperts& e, size_t p) { return e.w2_bytes(p); })
      .def("s13_elements", [](const QuantExperts& e, size_t p) { return e.s13_elements(p); })
      .def("s2_elements", [](const QuantExperts& e, size_t p) { return e.s2_elements(p); })
      .def("forward",
           [](QuantExperts& ex, Pool& pool, const Array& x, const Array& ids, const Array& weights, const Array& out,
              const std::vector<Array>& w13, const std::vector<Array>& w2, const std::vector<Array>& s13,
              const std::vector<Array>& s2, const std::optional<std::vector<Array>>& save_gate,
              const std::optional<std::vector<Array>>& save_up) {
             const Call c = check_routing(ex.layer(), x, ids, weights);
             check_matrix(out, "out", c.tokens, ex.layer().hidden);
             if (!is_layer_dtype(out, ex.layer().dtype))
               throw std::invalid_argument(std::string("NumaExperts: out must be ") + dtype_text(ex.layer().dtype));
             std::vector<experts::QuantSliceData> d = check_quant(ex, w13, w2, s13, s2);
             if (save_gate.has_value() != save_up.has_value())
               throw std::invalid_argument("NumaExperts: save_gate and save_up go together");
             if (save_gate) check_saved(ex, d, c.tokens * c.k, *save_gate, *save_up);
             const void* xp = x.data();
             void* op = out.data();
             nb::gil_scoped_release release;
             ex.forward(pool, xp, c.tokens, c.ids, c.weights, c.k, op, d);
           },
           nb::arg("pool"), nb::arg("x"), nb::arg("topk_ids"), nb::arg("topk_weights"), nb::arg("out"), nb::arg("w13"),
           nb::arg("w2"), nb::arg("s13"), nb::arg("s2"), nb::arg("save_gate") = nb::none(),
           nb::arg("save_up") = nb::none(), "out = experts(x) over quantized weights; GIL released.")
      .def("backward",
           [](QuantExperts& ex, Pool& pool, const Array& dout, const Array& ids, const Array& weights,
              const std::vector<Array>& w13, const std::vector<Array>& w2, const std::vector<Array>& s13,
              const std::vector<Array>& s2, const std::vector<Array>& save_gate, const std::vector<Array>& save_up,
              const Array& dx, const Array& dweights) {
             const Call c = check_routing(ex.layer(), dout, ids, weights);
             check_matrix(dx, "grad_x", c.tokens, ex.layer().hidden);
             if (!is_layer_dtype(dx, ex.layer().dtype))
               throw std::invalid_argument(std::string("NumaExperts: grad_x must be ") + dtype_text(ex.layer().dtype));
             check_matrix(dweights, "grad_topk_weights", c.tokens, c.k);
             if (!is_dtype(dweights, nb::dlpack::dtype_code::Float, 32))
               throw std::invalid_argument("NumaExperts: grad_topk_weights must be float32");
             std::vector<experts::QuantSliceData> d = check_quant(ex, w13, w2, s13, s2);
             check_saved(ex, d, c.tokens * c.k, save_gate, save_up);
             const void* dp = dout.data();
             void* dxp = dx.data();
             float* dwp = static_cast<float*>(dweights.data());
             nb::gil_scoped_release release;
             ex.backward(pool, dp, c.tokens, c.ids, c.weights, c.k, d, dxp, dwp);
           },
           nb::arg("pool"), nb::arg("grad_output"), nb::arg("topk_ids"), nb::arg("topk_weights"), nb::arg("w13"),
           nb::arg("w2"), nb::arg("s13"), nb::arg("s2"), nb::arg("save_gate"), nb::arg("save_up"),
           nb::arg("grad_x"), nb::arg("grad_topk_weights"),
           "Gradients of x and the routing weights (the quantized weights are frozen); GIL released.");
  m.def("quant_experts_kernel", &experts::quant_kernel_name,
        "The kernel path quantized NumaExperts use now, e.g. 'avx512+vnni+amx'.");
}

}  // namespace

void register_experts(nb::module_& m) {
  using experts::Experts;
  nb::class_<Experts>(m, "Experts",
                      "Packed expert slices and their scratch buffers (composer_numa.experts drives it).")
      .def("__init__",
           [](Experts* self, int64_t num_experts, int64_t hidden, int64_t intermediate,
              const std::string& dtype, const std::vector<int>& nodes,
              const std::vector<std::vector<int32_t>>& local, const std::vector<int64_t>& rows,
              const std::vector<int64_t>& row0, const std::vector<int64_t>& row1) {
             auto [L, slices] = layer_and_slices("Experts", num_experts, hidden, intermediate, dtype, nodes, local,
                                                 rows, row0, row1);
             new (self) Experts(L, std::move(slices));
           },
           nb::arg("num_experts"), nb::arg("hidden"), nb::arg("intermediate"), nb::arg("dtype"),
           nb::arg("nodes"), nb::arg("local"), nb::arg("rows"), nb::arg("row0"), nb::arg("row1"))
      .def_prop_ro("hidden_padded", [](const Experts& e) { return e.layer().hidden_padded; })
      .def("w13_elements", [](const Experts& e, size_t p) { return e.w13_elements(p); })
      .def("w2_elements", [](const Experts& e, size_t p) { return e.w2_elements(p); })
      .def("forward",
           [](Experts& ex, Pool& pool, const Array& x, const Array& ids, const Array& weights, const Array& out,
              const std::vector<Array>& w13, const std::vector<Array>& w2,
              const std::optional<std::vector<Array>>& save_gate,
              const std::optional<std::vector<Array>>& save_up) {
             const Call c = check_routing(ex.layer(), x, ids, weights);
             check_matrix(out, "out", c.tokens, ex.layer().hidden);
             if (!is_layer_dtype(out, ex.layer().dtype))
               throw std::invalid_argument(std::string("NumaExperts: out must be ") + dtype_text(ex.layer().dtype));
             std::vector<experts::SliceData> d = check_weights(ex, w13, w2);
             if (save_gate.has_value() != save_up.has_value())
               throw std::invalid_argument("NumaExperts: save_gate and save_up go together");
             if (save_gate) check_saved(ex, d, c.tokens * c.k, *save_gate, *save_up);
             const void* xp = x.data();
             void* op = out.data();
             nb::gil_scoped_release release;
             ex.forward(pool, xp, c.tokens, c.ids, c.weights, c.k, op, d);
           },
           nb::arg("pool"), nb::arg("x"), nb::arg("topk_ids"), nb::arg("topk_weights"), nb::arg("out"), nb::arg("w13"),
           nb::arg("w2"), nb::arg("save_gate") = nb::none(), nb::arg("save_up") = nb::none(),
           "out = experts(x) for tokens routed by topk_ids/topk_weights; GIL released.")
      .def("backward",
           [](Experts& ex, Pool& pool, const Array& dout, const Array& x, const Array& ids, const Array& weights,
              const std::vector<Array>& w13, const std::vector<Array>& w2,
              const std::vector<Array>& save_gate, const std::vector<Array>& save_up,
              const std::optional<std::vector<Array>>& grad13,
              const std::optional<std::vector<Array>>& grad2, const Array& dx, const Array& dweights) {
             const Call c = check_routing(ex.layer(), x, ids, weights);
             const int64_t H = ex.layer().hidden;
             check_matrix(dout, "grad_output", c.tokens, H);
             check_matrix(dx, "grad_x", c.tokens, H);
             if (!is_layer_dtype(dout, ex.layer().dtype) || !is_layer_dtype(dx, ex.layer().dtype))
               throw std::invalid_argument(std::string("NumaExperts: gradients must be ") +
                                           dtype_text(ex.layer().dtype));
             check_matrix(dweights, "grad_topk_weights", c.tokens, c.k);
             if (!is_dtype(dweights, nb::dlpack::dtype_code::Float, 32))
               throw std::invalid_argument("NumaExperts: grad_topk_weights must be float32");
             std::vector<experts::SliceData> d = check_weights(ex, w13, w2);
             check_saved(ex, d, c.tokens * c.k, save_gate, save_up);
             if (grad13.has_value() != grad2.has_value())
               throw std::invalid_argument("NumaExperts: grad13 and grad2 go together");
             if (grad13) {
               if (grad13->size() != d.size() || grad2->size() != d.size())
                 throw std::invalid_argument("NumaExperts: one gradient buffer per slice is needed");
               for (size_t p = 0; p < d.size(); ++p) {
                 check_flat((*grad13)[p], "grad w13[" + std::to_string(p) + "]", ex.w13_elements(p), true,
                            ex.layer().dtype);
                 check_flat((*grad2)[p], "grad w2[" + std::to_string(p) + "]", ex.w2_elements(p), true,
                            ex.layer().dtype);
                 d[p].grad13 = (*grad13)[p].data();
                 d[p].grad2 = (*grad2)[p].data();
               }
             }
             const void* dp = dout.data();
             const void* xp = x.data();
             void* dxp = dx.data();
             float* dwp = static_cast<float*>(dweights.data());
             nb::gil_scoped_release release;
             ex.backward(pool, dp, xp, c.tokens, c.ids, c.weights, c.k, d, dxp, dwp);
           },
           nb::arg("pool"), nb::arg("grad_output"), nb::arg("x"), nb::arg("topk_ids"), nb::arg("topk_weights"),
           nb::arg("w13"), nb::arg("w2"), nb::arg("save_gate"), nb::arg("save_up"), nb::arg("grad13"),
           nb::arg("grad2"), nb::arg("grad_x"), nb::arg("grad_topk_weights"),
           "Gradients of x, the routing weights and (unless grad13/grad2 are None) every slice's\n"
           "weights, overwritten in the weights' packed layout; GIL released.");
  m.def("experts_kernel",
        [](const std::string& dtype) { return experts::kernel_name(parse_dtype(dtype)); },
        nb::arg("dtype"), "The kernel path NumaExperts uses now for a dtype, e.g. 'avx512+bf16dot+amx'.");
  register_quant(m);
}

}  // namespace cnuma::python
