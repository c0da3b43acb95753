// Launching the kernels python/fastgrad/cuda_jit.py compiles with NVRTC. Python (ctypes) loads
// the driver and hands this file the addresses of the four driver calls a launch makes, so _C
// links no CUDA library for it and it builds without the CUDA toolkit. A launch from C++ costs
// the host about a third of what the same calls through ctypes cost (each ctypes call converts
// its arguments and builds the parameter array in Python), and on small and medium graphs the
// host's time before the kernel is what a call takes.
#pragma once
#include <cstdint>

namespace fg {

// Addresses of cuLaunchKernel, cuCtxGetCurrent, cuCtxPushCurrent_v2 and cuCtxPopCurrent_v2
// (0 for none).
struct DriverCalls {
  uintptr_t launch = 0, get_current = 0, push = 0, pop = 0;
};

// Sets the driver calls launches use; returns the ones set before (so that a test can put a
// stand-in driver in and take it out again).
DriverCalls bind_driver(const DriverCalls& calls);

// Launches kernel `func` (a CUfunction) as `grid` blocks of `block` threads on `stream` (a
// CUstream), with context `ctx` (a CUcontext) made current for the launch when it is not.
// params: [n] 64-bit kernel parameters (the data pointers cuda_jit's kernels take).
// Returns the driver's CUresult (0 on success), or -1 when no driver was bound.
int launch_kernel(uintptr_t func, uintptr_t ctx, unsigned grid, unsigned block, uintptr_t stream,
                  const uint64_t* params, int n);

}  // namespace fg
