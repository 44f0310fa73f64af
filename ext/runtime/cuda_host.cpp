#include "runtime/cuda_host.h"

#include <dlfcn.h>

namespace cnuma {
namespace {

// The CUDA runtime torch loaded, if any, looked up at each use (no cached
// state); dlclose only drops the reference our RTLD_NOLOAD dlopen added.
class CudaRt {
 public:
  CudaRt() {
    for (const char* name : {"libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0", "libcudart.so"}) {
      handle_ = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);
      if (handle_ == nullptr) continue;
      host_register = reinterpret_cast<int (*)(void*, size_t, unsigned)>(dlsym(handle_, "cudaHostRegister"));
      host_unregister = reinterpret_cast<int (*)(void*)>(dlsym(handle_, "cudaHostUnregister"));
      error_string = reinterpret_cast<const char* (*)(int)>(dlsym(handle_, "cudaGetErrorString"));
      if (host_register && host_unregister) return;
      dlclose(handle_);
      handle_ = nullptr;
      host_register = nullptr;
      host_unregister = nullptr;
    }
  }
  ~CudaRt() {
    if (handle_ != nullptr) dlclose(handle_);
  }
  CudaRt(const CudaRt&) = delete;
  CudaRt& operator=(const CudaRt&) = delete;
  bool loaded() const { return host_register != nullptr; }

  int (*host_register)(void*, size_t, unsigned) = nullptr;
  int (*host_unregister)(void*) = nullptr;
  const char* (*error_string)(int) = nullptr;

 private:
  void* handle_ = nullptr;
};

}  // namespace

std::string cuda_host_register(void* addr, size_t len) {
  const CudaRt rt;
  if (!rt.loaded()) return "the CUDA runtime is not loaded in this process";
  const int rc = rt.host_register(addr, len, 1 /* cudaHostRegisterPortable */);
  if (rc != 0)
    return std::string("cudaHostRegister failed: ") + (rt.error_string ? rt.error_string(rc) : std::to_string(rc));
  return "";
}

void cuda_host_unregister(void* addr) {
  const CudaRt rt;
  if (rt.loaded()) rt.host_unregister(addr);
}

}  // namespace cnuma
