// The math of every op in ops.def, written once as `fg_<ENUM_NAME>` and shared
// by the CPU interpreter and (later) the CUDA VM, so CPU tests exercise the
// same math the GPU runs. T is the region's compute type (float or double).
//
// Semantics follow PyTorch exactly on NaN / +-inf / signed zero, because
// fastgrad must give the results torch.autograd.grad gives. The code is
// written so that GCC can vectorize loops over it: selects rather than
// branches, and libm calls by their plain C names (expf, exp, ...) so that
// glibc's vector variants (libmvec) declared under __FAST_MATH__ apply.
#pragma once
#ifndef __CUDACC_RTC__  // (NVRTC declares the CUDA math functions itself)
#include <math.h>
#endif
#include "float16.h"
#include "hd.h"
// A compiled loop built by GCC for 512-bit vectors (jit.py defines FG_JIT_EXP512) vectorises
// float exp with jit_exp.h's rather than libmvec's: why, how and how accurate, there.
#if defined(FG_JIT_EXP512) && defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__) && \
    defined(__FAST_MATH__)
#include "jit_exp.h"
#endif


namespace fg {

// Overloads that pick the float or double libm entry point by name.
#define FG_LIBM1(name)                                               \
  FG_HD inline float m_##name(float x) { return ::name##f(x); }    \
  FG_HD inline double m_##name(double x) { return ::name(x); }
FG_LIBM1(exp)
FG_LIBM1(log)
FG_LIBM1(sin)
FG_LIBM1(cos)
FG_LIBM1(tanh)
FG_LIBM1(sqrt)
FG_LIBM1(fabs)
FG_LIBM1(log1p)
FG_LIBM1(expm1)
FG_LIBM1(erf)
FG_LIBM1(tan)
FG_LIBM1(atan)
FG_LIBM1(sinh)
FG_LIBM1(cosh)
FG_LIBM1(asin)
FG_LIBM1(acos)
FG_LIBM1(asinh)
FG_LIBM1(acosh)
FG_LIBM1(atanh)
#undef FG_LIBM1
FG_HD inline float m_pow(float x, float y) { return ::powf(x, y); }
FG_HD inline double m_pow(double x, double y) { return ::pow(x, y); }

// ---- unary ----------------------------------------------------------------
// The ops that are their libm function. (erf is GELU's; the trigonometric and hyperbolic
// functions are ops rather than compositions of exp, sin and cos, which lose accuracy: sinh
// near 0, cosh near its overflow, tan near its poles.)
#define FG_LIBM_OP(NAME, name) \
  template <class T> FG_HD inline T fg_##NAME(T x) { return m_##name(x); }
FG_LIBM_OP(EXP, exp)
FG_LIBM_OP(LOG, log)
FG_LIBM_OP(SIN, sin)
FG_LIBM_OP(TANH, tanh)
FG_LIBM_OP(SQRT, sqrt)
FG_LIBM_OP(ABS, fabs)
FG_LIBM_OP(LOG1P, log1p)
FG_LIBM_OP(EXPM1, expm1)
FG_LIBM_OP(ERF, erf)
FG_LIBM_OP(TAN, tan)
FG_LIBM_OP(ATAN, atan)
FG_LIBM_OP(SINH, sinh)
FG_LIBM_OP(COSH, cosh)
FG_LIBM_OP(ASIN, asin)
FG_LIBM_OP(ACOS, acos)
FG_LIBM_OP(ASINH, asinh)
FG_LIBM_OP(ACOSH, acosh)
FG_LIBM_OP(ATANH, atanh)
#undef FG_LIBM_OP
template <class T> FG_HD inline T fg_NEG(T x) { return -x; }
// On the host, cos reads x + 0 (the same value: cos is even, so -0 -> +0 changes nothing):
// with sin and cos of one value in a loop GCC would otherwise fuse them into one sincos call,
// which has no vector variant, and leave the whole loop scalar. (On CUDA the fused sincos is
// what one wants.)
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
template <class T> FG_HD inline T fg_COS(T x) { return m_cos(x); }
#else
template <class T> FG_HD inline T fg_COS(T x) { return m_cos(x + T(0)); }
#endif
// Stable for large |x|: exp never sees a positive argument, so it cannot
// overflow (1/(1+exp(-x)) for x >= 0, exp(x)/(1+exp(x)) for x < 0).
// NaN -> NaN, +inf -> 1, -inf -> 0.
// (A select of two ready values, then arithmetic: GCC will not if-convert
// a multiply that only one branch performs, and would not vectorize.)
template <class T> FG_HD inline T fg_SIGMOID(T x) {
  const T e = m_exp(-m_fabs(x));
  return (x < T(0) ? e : T(1)) / (T(1) + e);
}
// (torch.rsqrt's own arithmetic: one division of 1 by the square root)
template <class T> FG_HD inline T fg_RSQRT(T x) { return T(1) / m_sqrt(x); }
// torch.sign: NaN -> 0, +-0 -> 0.
template <class T> FG_HD inline T fg_SIGN(T x) { return T(x > T(0)) - T(x < T(0)); }
template <class T> FG_HD inline T fg_RECIPROCAL(T x) { return T(1) / x; }
// torch.relu keeps NaN and -0.
template <class T> FG_HD inline T fg_RELU(T x) { return x < T(0) ? T(0) : x; }
template <class T> FG_HD inline T fg_ISNAN(T x) { return x != x ? T(1) : T(0); }
template <class T> FG_HD inline T fg_NOT(T x) { return x == T(0) ? T(1) : T(0); }
// Round to a narrower float type and back (the value a cast in the forward
// graph would have produced).
template <class T> FG_HD inline T fg_TO_F32(T x) { return T(float(x)); }
template <class T> FG_HD inline T fg_TO_F16(T x) { return T(half_to_float(float_to_half(float(x)))); }
template <class T> FG_HD inline T fg_TO_BF16(T x) { return T(bf16_to_float(float_to_bf16(float(x)))); }

// ---- binary ---------------------------------------------------------------
template <class T> FG_HD inline T fg_ADD(T a, T b) { return a + b; }
template <class T> FG_HD inline T fg_SUB(T a, T b) { return a - b; }
template <class T> FG_HD inline T fg_MUL(T a, T b) { return a * b; }
template <class T> FG_HD inline T fg_DIV(T a, T b) { return a / b; }
// C pow semantics, which are torch.pow's: pow(x, 0) = 1 (even for NaN),
// pow(1, y) = 1, pow(negative, non-integer) = NaN.
template <class T> FG_HD inline T fg_POW(T a, T b) { return m_pow(a, b); }
// torch.maximum / torch.minimum: NaN in either operand gives NaN.
template <class T> FG_HD inline T fg_MAX(T a, T b) { return (a > b || a != a) ? a : b; }
template <class T> FG_HD inline T fg_MIN(T a, T b) { return (a < b || a != a) ? a : b; }
template <class T> FG_HD inline T fg_GT(T a, T b) { return a > b ? T(1) : T(0); }
template <class T> FG_HD inline T fg_GE(T a, T b) { return a >= b ? T(1) : T(0); }
template <class T> FG_HD inline T fg_LT(T a, T b) { return a < b ? T(1) : T(0); }
template <class T> FG_HD inline T fg_LE(T a, T b) { return a <= b ? T(1) : T(0); }
template <class T> FG_HD inline T fg_EQ(T a, T b) { return a == b ? T(1) : T(0); }
template <class T> FG_HD inline T fg_NE(T a, T b) { return a != b ? T(1) : T(0); }
// Truthiness as in torch's bool cast: nonzero (NaN included) is true. Written as arithmetic on
// 0/1 selects: with && / || (or bool | bool) a loop that also selects on their result was left
// scalar by GCC ("no vectype"), e.g. hardswish's derivative, 4.7x slower.
template <class T> FG_HD inline T fg_AND(T a, T b) {
  return (a != T(0) ? T(1) : T(0)) * (b != T(0) ? T(1) : T(0));
}
template <class T> FG_HD inline T fg_OR(T a, T b) {
  return (a != T(0) ? T(1) : T(0)) + (b != T(0) ? T(1) : T(0)) > T(0) ? T(1) : T(0);
}

// ---- ternary --------------------------------------------------------------
// A select, not arithmetic: where(1, x, NaN) is x.
template <class T> FG_HD inline T fg_WHERE(T c, T a, T b) { return c != T(0) ? a : b; }

}  // namespace fg
