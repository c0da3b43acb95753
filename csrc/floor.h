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

}  // namespace fg
