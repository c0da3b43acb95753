// A hand-fused C++ loop of one benchmark's math (the "floor" the VM is
// measured against): the same math, compiler and flags as vm_cpu.cpp, but
// no interpreter.
#pragma once
#include <cstdint>

namespace fg {

// out[i] = cos(x[i])*exp(x[i]) + sin(x[i])*exp(x[i]) for i < n (the gradient
// of (sin(x)*exp(x)).sum()), x and out contiguous; dtype 0 = float32,
// 1 = float64 (dtypes.def). OpenMP over nthreads. Throws
// std::invalid_argument on a bad dtype, n < 0, nthreads < 1 or a null
// pointer with n > 0. Call without the GIL.
void hand_fused_sin_exp_grad(uintptr_t x, uintptr_t out, int64_t n, int dtype, int nthreads);

// dst[0, nbytes) = src[0, nbytes) with streaming stores (stream_store.h), OpenMP over nthreads:
// the benchmark's copy bandwidth is the faster of this and PyTorch's copy_, whose plain stores
// first read each line they write (a floor measured with them alone was beaten by the
// streaming loops it is meant to bound). Both pointers 64-byte aligned, nbytes a multiple of 64.
// Throws std::invalid_argument otherwise or on nthreads < 1. Call without the GIL.
void stream_copy(uintptr_t src, uintptr_t dst, int64_t nbytes, int nthreads);

}  // namespace fg
