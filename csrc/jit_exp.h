// Float exp of the compiled loops (python/fastgrad/jit.py) on AVX-512 CPUs, in place of
// libmvec's: included by op_math.h only where FG_JIT_EXP512 is defined (the JIT's compile
// command, with -mprefer-vector-width=512: where PyTorch's kernels run 512-bit vectors) and
// the compiler is GCC targeting AVX-512F. Elsewhere (the interpreter, CUDA, 256-bit loops,
// other compilers or CPUs) float exp stays libm's / libmvec's.
//
// Why: in the loops that compute exp per element (log_softmax's and logsumexp's VJPs, the
// sigmoid and softplus family) libmvec's 16-lane expf was most of the time: log_softmax's
// VJP over 3906 rows of 256 floats, one thread, spent 377 us of its 648 in it, where PyTorch's
// whole backward took 430 (its kernel uses SLEEF's expf, bundled in libtorch, which fastgrad
// does not link). In a loop of exp(x) * x over 16384 floats in L1 (one core of the AMD EPYC
// VM) this one takes 0.224 ns a float, libmvec's 0.310: docs/performance.md, "Softmax and
// log_softmax".
//
// Accuracy, against exp in double rounded to float (the default rounding mode, as for libm):
// over all 2^32 floats at most 1 ulp off; over the 5.2e8 whose exp is a finite float other
// than 0 and 1, 2.0% not correctly rounded. On the random values of tests/test_jit.py's
// test_compiled_float_exp (about 393000: random bits and [-104.5, 89.5]), 2.1% here, 16.8% (up
// to 2 ulps) for libmvec's, 0.4% for torch.exp. +-0 -> 1, +inf -> inf, -inf -> 0, NaN -> NaN,
// inf above 88.72 (the scaling rounds to nearest whatever the rounding mode), subnormal
// results rounded once (0 where the process flushes subnormals, as for libmvec's).
#pragma once
#include <immintrin.h>

namespace fg {
namespace jit_exp {

// exp of 16 floats: x = n ln2 + r with n = round(x / ln2) and |r| <= ln2 / 2 (r computed in two
// fused steps, ln2 split into its float value and the rest), e^r = 1 + r + r^2 q(r) with q of
// degree 4 (coefficients fitted for the least maximum relative error on [-ln2/2, ln2/2], about
// 4e-9 before rounding), then scaled by 2^n with scalef (exact, one rounding into the
// subnormals, inf past the top). x is first clamped to [-104, 89], past which the result is 0
// or inf anyway, so that n stays finite; min and max return their second operand when either
// is NaN, which keeps NaN.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(0x1.715476p+0f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0x1.62e430p-1f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(1.9046543e-9f), r);
  __m512 q = _mm512_set1_ps(0x1.68889p-10f);
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0x1.123a8cp-7f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0x1.555b42p-5f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0x1.55549p-3f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0x1.fffff8p-2f));
  __m512 p = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f));  // 1 + r q
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));         // 1 + r + r^2 q
  return _mm512_scalef_round_ps(p, n, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

}  // namespace jit_exp
}  // namespace fg

// How the loops reach it: op_math.h calls expf, which GCC treats as its builtin (so it may
// compute it under a select, predicated: a call of another function there keeps the whole loop
// scalar) and, under __FAST_MATH__, math.h declares with vector variants by the vector-function
// ABI's names. The three that a loop built for AVX-512 calls are defined here under those names,
// hidden, so that a loop's library binds its calls to them rather than to libmvec's: 16 lanes,
// and 8 and 4 for the epilogues (their upper lanes zeroed, so that no garbage is computed on).
// A loop's scalar remainder still calls libm's expf (correctly rounded in almost every case).
// Not inline: the compiler emits calls to these names, not to the C++ functions, so the
// definitions must be there whether or not anything names them; this header is compiled once
// per loop's library.
#define FG_JIT_EXP_VARIANT(T, NAME, ABI) \
  extern "C" __attribute__((visibility("hidden"))) T NAME(T x) __asm__(ABI);
FG_JIT_EXP_VARIANT(__m512, fg_jit_expf_16, "_ZGVeN16v_expf")
FG_JIT_EXP_VARIANT(__m256, fg_jit_expf_8, "_ZGVdN8v_expf")
FG_JIT_EXP_VARIANT(__m128, fg_jit_expf_4, "_ZGVbN4v_expf")
#undef FG_JIT_EXP_VARIANT
__m512 fg_jit_expf_16(__m512 x) { return fg::jit_exp::exp16(x); }
__m256 fg_jit_expf_8(__m256 x) {
  const __m512 w = _mm512_maskz_mov_ps(0x00FF, _mm512_castps256_ps512(x));
  return _mm512_castps512_ps256(fg::jit_exp::exp16(w));
}
__m128 fg_jit_expf_4(__m128 x) {
  const __m512 w = _mm512_maskz_mov_ps(0x000F, _mm512_castps128_ps512(x));
  return _mm512_castps512_ps128(fg::jit_exp::exp16(w));
}

// exp of in[16] into out[16], exported so that a test can call exp16 itself from a loop's
// library (ctypes) and compare the loop's exp with it bit for bit.
extern "C" void fg_jit_exp16(const float* in, float* out) {
  _mm512_storeu_ps(out, fg::jit_exp::exp16(_mm512_loadu_ps(in)));
}
