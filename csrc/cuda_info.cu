// CUDA device discovery through the (statically linked) CUDA runtime.
#include <cuda_runtime.h>
#include "cuda_info.h"

namespace fg {

int cuda_device_count(std::string* reason) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    if (reason) *reason = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return 0;
  }
  if (reason) *reason = n > 0 ? "ok" : "no CUDA device visible";
  return n;
}

std::string cuda_runtime_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

}  // namespace fg
