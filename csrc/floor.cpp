// The hand-fused reference loop (floor.h). Compiled with the same options as
// vm_cpu.cpp (CMakeLists.txt), so it gets the same libmvec vectorization.
#include "floor.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "op_math.h"
#include "stream_store.h"

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

void stream_copy(uintptr_t src, uintptr_t dst, int64_t nbytes, int nthreads) {
  if (nthreads < 1) throw std::invalid_argument("nthreads must be >= 1, got " + std::to_string(nthreads));
  if (nbytes < 0 || nbytes % 64 != 0 || src % 64 != 0 || dst % 64 != 0 || (nbytes > 0 && (!src || !dst)))
    throw std::invalid_argument("stream_copy needs 64-byte aligned pointers and a multiple of 64 bytes");
  const float* s = reinterpret_cast<const float*>(src);
  float* d = reinterpret_cast<float*>(dst);
  const int64_t lines = nbytes / 64, per = 16;  // floats per line
  const int64_t chunk = 4096;                   // lines per task
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
  for (int64_t c = 0; c < (lines + chunk - 1) / chunk; ++c) {
    const int64_t l0 = c * chunk, l1 = std::min(lines, l0 + chunk);
    stream_run(d + l0 * per, s + l0 * per, (l1 - l0) * per);
    stream_fence();
  }
}

}  // namespace fg
