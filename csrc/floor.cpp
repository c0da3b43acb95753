// The hand-fused reference loop (floor.h). Compiled with the same options as
// vm_cpu.cpp (CMakeLists.txt), so it gets the same libmvec vectorization.
#include "floor.h"

#include <stdexcept>
#include <string>

#include "op_math.h"

namespace fg {
namespace {

template <class T>
void sin_exp_grad(const T* __restrict x, T* __restrict out, int64_t n, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && n >= 32768)
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i];
    // cos of (v + 0), not of v: GCC merges sin(v) and cos(v) of one value
    // into a scalar sincos call, which has no libmvec variant it can use and
    // would leave the loop unvectorized. v + 0 is not folded (it maps -0 to
    // +0, and cos(-0) == cos(+0)), so sin and cos stay separate vector calls.
    out[i] = fg_COS(v + T(0)) * fg_EXP(v) + fg_SIN(v) * fg_EXP(v);
  }
}

}  // namespace

void hand_fused_sin_exp_grad(uintptr_t x, uintptr_t out, int64_t n, int dtype, int nthreads) {
  if (dtype != 0 && dtype != 1)
    throw std::invalid_argument("dtype_code must be 0 (float32) or 1 (float64), got " + std::to_string(dtype));
  if (n < 0) throw std::invalid_argument("n must be >= 0, got " + std::to_string(n));
  if (nthreads < 1) throw std::invalid_argument("nthreads must be >= 1, got " + std::to_string(nthreads));
  if (n > 0 && (x == 0 || out == 0)) throw std::invalid_argument("null data pointer");
  if (dtype == 0)
    sin_exp_grad(reinterpret_cast<const float*>(x), reinterpret_cast<float*>(out), n, nthreads);
  else
    sin_exp_grad(reinterpret_cast<const double*>(x), reinterpret_cast<double*>(out), n, nthreads);
}

}  // namespace fg
