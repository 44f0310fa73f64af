// Fused AdamW: one streaming pass per element (grad, m, v, param in; param,
// m, v out) with torch.optim.AdamW's operations in torch's order, in AVX-512,
// AVX2 and scalar versions that give identical bits, run on a worker pool.
#pragma once

#include <cstdint>
#include <vector>

#include "common/simd.h"
#include "runtime/pool.h"

namespace cnuma {

enum class DType : uint8_t { F32, BF16 };

// Scalars of one step, computed in double like torch's Python code does and
// rounded to float once, as torch's CPU kernels do with Python scalars.
struct AdamWScalars {
  float decay;        // 1 - lr * weight_decay
  float lerp_weight;  // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float eps;
  float neg_step_size;          // -lr / (1 - beta1^step)
  float bias_correction2_sqrt;  // (1 - beta2^step) ** 0.5
  float grad_factor;            // grad_scale, negated for maximize
};

// std::invalid_argument for step < 1.
AdamWScalars adamw_scalars(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                           double grad_scale, bool maximize);

// One contiguous run of elements sharing hyper-parameters.
struct AdamWJob {
  int node = -1;            // run on this node's workers (-1: any)
  int64_t n = 0;
  float* master = nullptr;  // fp32 master weights; param is then a (bf16) copy written out
  void* param = nullptr;
  DType param_dtype = DType::F32;
  const void* grad = nullptr;
  DType grad_dtype = DType::F32;
  void* exp_avg = nullptr;
  void* exp_avg_sq = nullptr;
  DType state_dtype = DType::F32;
  AdamWScalars s{};
};

// Whether the SIMD loops issue software prefetches on this CPU for a job whose
// parameters, gradients and moments are all fp32 (all_fp32) or not: yes on Intel;
// on AMD only with bf16 streams. COMPOSER_NUMA_ADAMW_PREFETCH="0"/"1" overrides.
// Never changes a result.
bool prefetch_wanted(bool all_fp32);

// Single-threaded: elements [begin, end) of job on the given path.
void adamw_range(const AdamWJob& job, int64_t begin, int64_t end, Isa isa);

// All jobs in one dispatch on `pool`, on active_isa()'s path; each job's node workers claim
// 16-aligned chunks of it dynamically.
void adamw_step(Pool& pool, const std::vector<AdamWJob>& jobs);

}  // namespace cnuma
