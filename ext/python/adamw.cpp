// The fused AdamW step over (node, param, grad, exp_avg, exp_avg_sq, master, hyper-parameters) jobs.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/adamw.h"
#include "python/module.h"
#include "python/tensors.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace cnuma::python {
namespace {

DType float_dtype(const Array& a, const std::string& where, const char* name) {
  if (is_dtype(a, nb::dlpack::dtype_code::Float, 32)) return DType::F32;
  if (is_dtype(a, nb::dlpack::dtype_code::Bfloat, 16)) return DType::BF16;
  throw std::invalid_argument(where + ": " + name + " has dtype " + dtype_name(a.dtype()) +
                              "; expected float32 or bfloat16");
}

using JobTuple = std::tuple<int, Array, Array, Array, Array, std::optional<Array>, double, double,
                            double, double, double, int64_t, double, bool>;

void adamw_step(Pool& pool, const std::vector<JobTuple>& tuples) {
  std::vector<AdamWJob> jobs;
  jobs.reserve(tuples.size());
  for (size_t k = 0; k < tuples.size(); ++k) {
    const auto& [node, param, grad, exp_avg, exp_avg_sq, master, lr, beta1, beta2, eps, wd, step,
                 grad_scale, maximize] = tuples[k];
    const std::string where = "adamw_step job " + std::to_string(k);
    AdamWJob j;
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
      if (float_dtype(*master, where, "master") != DType::F32)
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
    j.s = adamw_scalars(lr, beta1, beta2, eps, wd, step, grad_scale, maximize);
    jobs.push_back(j);
  }
  nb::gil_scoped_release release;
  cnuma::adamw_step(pool, jobs);
}

}  // namespace

void register_adamw(nb::module_& m) {
  m.def("adamw_step", &adamw_step, "pool"_a, "jobs"_a,
        "Fused AdamW over jobs (node, param, grad, exp_avg, exp_avg_sq, master|None, lr, beta1, "
        "beta2, eps, weight_decay, step, grad_scale, maximize), one dispatch on pool, GIL released.");
  m.def("adamw_prefetch", &prefetch_wanted, "all_fp32"_a = true,
        "Whether adamw_step's SIMD loops issue software prefetches on this CPU for all-fp32 jobs or "
        "jobs with bf16 streams (Intel: yes; AMD: only with bf16 streams; COMPOSER_NUMA_ADAMW_PREFETCH=0/1 "
        "overrides). Results are the same either way.");
}

}  // namespace cnuma::python
