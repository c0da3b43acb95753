// What the CUDA runtime says about this machine. Only compiled when CMake
// found nvcc (FASTGRAD_WITH_CUDA); the runtime is linked statically, so the
// module imports on machines with no GPU or driver (the count is then 0 and
// the reason says why).
#pragma once
#include <string>

namespace fg {
// Number of visible CUDA devices; on failure 0, with the runtime's error in *reason.
int cuda_device_count(std::string* reason);
// CUDA runtime version the module was built against, e.g. "13.0".
std::string cuda_runtime_version();
}  // namespace fg
