// CUDA evaluator of fused regions: runs the descriptors of vm.h on the GPU.
// Only compiled when CMake found nvcc (FASTGRAD_WITH_CUDA). Plain C++ header
// (no CUDA types), so bindings.cpp can include it with the host compiler.
// See vm_cuda.cu for the kernel design.
#pragma once
#include <cstdint>
#include <stdexcept>

#include "vm.h"

namespace fg {

// A pointer in the descriptor is not device memory usable on the device
// (bindings turn it into ValueError, like a malformed descriptor).
struct CudaPointerError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Run a parsed region (parse_region) on CUDA device `device`, asynchronously
// on `stream` (a cudaStream_t as an integer; 0 is the legacy default
// stream). The data pointers must be device pointers on that device. compute:
// 0 = float32, 1 = float64. Sets the device for the call and restores the
// caller's current device; never synchronizes (except in the rare fallback
// where the device has no stream-ordered allocator, see vm_cuda.cu).
// check_pointers: ask the CUDA runtime that every non-null data pointer is
// device (or managed) memory of `device`, throwing CudaPointerError if not
// (a host pointer would otherwise fault the kernel and poison the context).
// Throws std::runtime_error with the CUDA error text when CUDA is unusable
// (no driver / device, bad index) or a launch fails. Call without the GIL.
void run_region_cuda(Region& r, int compute, int device, std::uintptr_t stream, bool check_pointers);

}  // namespace fg
