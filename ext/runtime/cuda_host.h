// Page-locking host memory through the CUDA runtime the process already loaded
// (torch's). We never load it ourselves: without CUDA, pinning is reported as
// not done rather than failing.
#pragma once

#include <cstddef>
#include <string>

namespace cnuma {

// cudaHostRegister(addr, len, portable). "" on success, else why it was not pinned.
std::string cuda_host_register(void* addr, size_t len);

// cudaHostUnregister(addr), when the runtime is still loaded.
void cuda_host_unregister(void* addr);

}  // namespace cnuma
