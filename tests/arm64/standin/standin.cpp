// Stand-in nanobind module for the arm64 rig (tests/arm64/harness.py): returns
// values computed by aarch64 code so an import proves the whole chain works.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <cstddef>
#include <string>
#include <thread>

#if defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace nb = nanobind;

// The architecture this file was compiled for.
static std::string compiled_arch() {
#if defined(__aarch64__)
    return "aarch64";
#elif defined(__x86_64__)
    return "x86_64";
#else
    return "unknown";
#endif
}

// Sum of a float32 vector, with NEON on aarch64.
static float vsum(nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu> a) {
    const float* p = a.data();
    const std::size_t n = a.shape(0);
    std::size_t i = 0;
    float total = 0.0f;
#if defined(__aarch64__)
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (; i + 4 <= n; i += 4) acc = vaddq_f32(acc, vld1q_f32(p + i));
    total = vaddvq_f32(acc);
#endif
    for (; i < n; ++i) total += p[i];
    return total;
}

// Sum on a worker thread (checks that pthreads link and run under emulation).
static long threaded_sum(long n) {
    long out = 0;
    std::thread t([&] { for (long k = 1; k <= n; ++k) out += k; });
    t.join();
    return out;
}

NB_MODULE(_arm64_standin, m) {
    m.def("arch", &compiled_arch, "Architecture the module was compiled for.");
    m.def("vsum", &vsum, nb::arg("a"), "Sum of a 1-D float32 array (NEON on aarch64).");
    m.def("threaded_sum", &threaded_sum, nb::arg("n"), "1 + 2 + ... + n on a worker thread.");
}
