#include "kernel_launch.h"

#include <vector>

namespace fg {

namespace {

// The driver's signatures, written out so that no CUDA header is needed (CUresult is an int
// enum; CUfunction, CUstream and CUcontext are pointers).
using LaunchFn = int (*)(void* func, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                         unsigned by, unsigned bz, unsigned shared_bytes, void* stream,
                         void** params, void** extra);
using GetCurrentFn = int (*)(void** ctx);
using PushFn = int (*)(void* ctx);
using PopFn = int (*)(void** ctx);

// Set once from Python under the GIL, read by launches under the GIL.
DriverCalls g_calls;

}  // namespace

DriverCalls bind_driver(const DriverCalls& calls) {
  const DriverCalls before = g_calls;
  g_calls = calls;
  return before;
}

int launch_kernel(uintptr_t func, uintptr_t ctx, unsigned grid, unsigned block, uintptr_t stream,
                  const uint64_t* params, int n) {
  if (!g_calls.launch || !g_calls.get_current || !g_calls.push || !g_calls.pop) return -1;
  // cuLaunchKernel reads each parameter through a pointer to it.
  void* small[32];
  std::vector<void*> large;
  void** ptrs = small;
  if (n > 32) {
    large.resize(n);
    ptrs = large.data();
  }
  for (int i = 0; i < n; ++i) ptrs[i] = const_cast<uint64_t*>(params + i);
  // PyTorch's threads have its context current; a thread that has not run CUDA yet has none.
  void* cur = nullptr;
  int r = reinterpret_cast<GetCurrentFn>(g_calls.get_current)(&cur);
  if (r) return r;
  const bool pushed = cur != reinterpret_cast<void*>(ctx);
  if (pushed && (r = reinterpret_cast<PushFn>(g_calls.push)(reinterpret_cast<void*>(ctx))))
    return r;
  r = reinterpret_cast<LaunchFn>(g_calls.launch)(reinterpret_cast<void*>(func), grid, 1, 1, block,
                                                 1, 1, 0, reinterpret_cast<void*>(stream), ptrs,
                                                 nullptr);
  if (pushed) {
    void* popped = nullptr;
    reinterpret_cast<PopFn>(g_calls.pop)(&popped);
  }
  return r;
}

}  // namespace fg
