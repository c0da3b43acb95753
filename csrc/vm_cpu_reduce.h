// Reduction building blocks of the CPU interpreter (vm_cpu.cpp): the
// identities and combine rules of sum/max/min, the per-segment reductions
// (sums in double over 16 lanes, NaN-propagating max/min), writing a finished
// row, the per-thread row state and partials, and the outer strategy's
// combine of the threads' accumulators. The reducing stores that use them
// (Worker::reduce_store for rows, Worker::reduce_store_outer for the outer
// strategy) are part of the interpreter in vm_cpu.cpp; its header comment
// describes both strategies.
//
// Internal to the CPU VM: included only from vm_cpu.cpp (one translation
// unit, its compile flags; hence the anonymous namespace).
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX__
#include <immintrin.h>
#endif
#include "dtype_convert.h"
#include "op_math.h"
#include "vm.h"
#include "vm_cpu_loops.h"
#include "vm_cpu_tuning.h"

namespace fg {
namespace {

inline double red_init(int mode) {
  if (mode == MODE_SUM) return 0.0;
  if (mode == MODE_MAX) return -std::numeric_limits<double>::infinity();
  return std::numeric_limits<double>::infinity();
}

inline double red_combine(int mode, double a, double b) {
  if (mode == MODE_SUM) return a + b;
  if (mode == MODE_MAX) return fg_MAX(a, b);
  return fg_MIN(a, b);
}

// Sum of x[n] in double, 16 independent lanes so the loop vectorizes without
// reassociation flags and keeps several adds in flight (fixed order:
// deterministic).
template <class T>
double seg_sum(const T* x, int64_t n) {
#ifdef __AVX__
  // float: the same 16 lanes and the same final tree, but each group of 4
  // floats converts straight from memory (GCC's own code for the loop below
  // loads 8 and shuffles, which costs ~1.4x at cache bandwidth).
  if (std::is_same<T, float>::value && n >= 16) {
    const float* f = reinterpret_cast<const float*>(x);
    __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm_loadu_ps(f + i)));
      a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm_loadu_ps(f + i + 4)));
      a2 = _mm256_add_pd(a2, _mm256_cvtps_pd(_mm_loadu_ps(f + i + 8)));
      a3 = _mm256_add_pd(a3, _mm256_cvtps_pd(_mm_loadu_ps(f + i + 12)));
    }
    double t[4];
    _mm256_storeu_pd(t, _mm256_add_pd(_mm256_add_pd(a0, a2), _mm256_add_pd(a1, a3)));
    double s = (t[0] + t[2]) + (t[1] + t[3]);
    for (; i < n; ++i) s += double(f[i]);
    return s;
  }
#endif
  constexpr int W = 16;
  double acc[W] = {};
  int64_t i = 0;
  for (; i + W <= n; i += W)
    for (int j = 0; j < W; ++j) acc[j] += double(x[i + j]);
  for (int w = W / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  double s = acc[0];
  for (; i < n; ++i) s += double(x[i]);
  return s;
}

// v, materialised as is: an empty asm the compiler cannot see through keeps
// a product from being contracted into the add that follows (-ffp-contract
// is GCC's default; an FMA would round once where the program rounds twice).
template <class T>
inline T rounded(T v) {
  asm("" : "+m"(v));
  return v;
}

// Sum in double of the products x[i]*y[i] (i < n), each rounded to T as
// fg_MUL rounds it: the value and order of seg_sum of the products.
template <class T>
double seg_dot(const T* x, const T* y, int64_t n) {
  int64_t i = 0;
#ifdef __AVX__
  if (std::is_same<T, float>::value && n >= 16) {
    // (float products convert to double before they are added: nothing to contract)
    const float* f = reinterpret_cast<const float*>(x);
    const float* g = reinterpret_cast<const float*>(y);
    __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 16 <= n; i += 16) {
      const __m256 p0 = _mm256_mul_ps(_mm256_loadu_ps(f + i), _mm256_loadu_ps(g + i));
      const __m256 p1 = _mm256_mul_ps(_mm256_loadu_ps(f + i + 8), _mm256_loadu_ps(g + i + 8));
      a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(p0)));
      a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(p0, 1)));
      a2 = _mm256_add_pd(a2, _mm256_cvtps_pd(_mm256_castps256_ps128(p1)));
      a3 = _mm256_add_pd(a3, _mm256_cvtps_pd(_mm256_extractf128_ps(p1, 1)));
    }
    double t[4];
    _mm256_storeu_pd(t, _mm256_add_pd(_mm256_add_pd(a0, a2), _mm256_add_pd(a1, a3)));
    double s = (t[0] + t[2]) + (t[1] + t[3]);
    for (; i < n; ++i) s += double(fg_MUL<float>(f[i], g[i]));
    return s;
  }
#endif
  constexpr int W = 16;
  double acc[W] = {};
  for (; i + W <= n; i += W) {
    T p[W];
    for (int j = 0; j < W; ++j) p[j] = fg_MUL<T>(x[i + j], y[i + j]);
    asm("" : "+m"(p));  // the products, rounded, before any add (see rounded)
    for (int j = 0; j < W; ++j) acc[j] += double(p[j]);
  }
  for (int w = W / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  double s = acc[0];
  for (; i < n; ++i) s += double(rounded(fg_MUL<T>(x[i], y[i])));
  return s;
}

// NaN-propagating max (IsMax) or min of x[n].
template <bool IsMax, class T>
double seg_maxmin(const T* x, int64_t n) {
  const T init = IsMax ? -std::numeric_limits<T>::infinity() : std::numeric_limits<T>::infinity();
  T m[8];
  T nan[8];
  for (int j = 0; j < 8; ++j) m[j] = init, nan[j] = T(0);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) {
      const T v = x[i + j];
      m[j] = IsMax ? (v > m[j] ? v : m[j]) : (v < m[j] ? v : m[j]);
      nan[j] = v != v ? T(1) : nan[j];
    }
  T res = init;
  bool any_nan = false;
  for (int j = 0; j < 8; ++j) {
    res = IsMax ? fg_MAX(res, m[j]) : fg_MIN(res, m[j]);
    any_nan |= nan[j] != T(0);
  }
  for (; i < n; ++i) res = IsMax ? fg_MAX(res, x[i]) : fg_MIN(res, x[i]);
  if (any_nan) return std::numeric_limits<double>::quiet_NaN();
  return double(res);
}

template <class T>
inline double seg_reduce(int mode, const T* x, int64_t n) {
  if (mode == MODE_SUM) return seg_sum(x, n);
  if (mode == MODE_MAX) return seg_maxmin<true>(x, n);
  return seg_maxmin<false>(x, n);
}

// Offset of output element number `row` (over the outer dims) of store S.
inline int64_t row_offset(const Region& r, const StoreRec& S, int64_t row, int64_t* oc) {
  int64_t off = 0, q = row;
  for (int d = r.ndim - r.nred - 1; d >= 0; --d) {
    oc[d] = q % r.shape[d];
    off += oc[d] * S.stride[d];
    q /= r.shape[d];
  }
  return off;
}

// Writes a finished row (output element number `row` over the outer dims).
void write_row(const Region& r, const StoreRec& S, int64_t row, double acc) {
  int64_t oc[kMaxNdim];
  const int64_t off = row_offset(r, S, row, oc);
  with_storage(S.dtype, [&](auto tag) {
    using S_ = FG_STORAGE_T(tag);
    reinterpret_cast<S_*>(S.ptr)[off] = to_storage<S_>(acc);
  });
}

struct RowState {
  int64_t row;  // row being accumulated, -1 when none
  double acc;
};
struct RowPartial {
  int64_t row;
  double acc;
};

// Outer strategy: combine the threads' accumulators (in thread order) and
// write every output element, walking the outer dims with an odometer.
void combine_outer(const Region& r, const double* oacc, const std::vector<char>& used, int nt) {
  const size_t ns = r.stores.size();
  const int nd = r.ndim;
  int od[kMaxNdim], no = 0;  // the outer dims, outermost first
  for (int d = 0; d < nd; ++d)
    if (!(r.red_mask >> d & 1)) od[no++] = d;
  for (size_t k = 0; k < ns; ++k) {
    const StoreRec& S = r.stores[k];
    if (S.mode == MODE_ASSIGN) continue;
    const int64_t nout = r.nout;
    auto range = [&](int64_t o0, int64_t o1) {
      int64_t c[kMaxNdim], q = o0;
      for (int i = no - 1; i >= 0; --i) {
        c[i] = q % r.shape[od[i]];
        q /= r.shape[od[i]];
      }
      with_storage(S.dtype, [&](auto tag) {
        using S_ = FG_STORAGE_T(tag);
        S_* base = reinterpret_cast<S_*>(S.ptr);
        for (int64_t o = o0; o < o1; ++o) {
          double v = 0;
          bool first = true;
          for (int t = 0; t < nt; ++t) {
            if (!used[t]) continue;
            const double x = oacc[((size_t)t * ns + k) * nout + o];
            v = first ? x : red_combine(S.mode, v, x);
            first = false;
          }
          int64_t off = 0;
          for (int i = 0; i < no; ++i) off += c[i] * S.stride[od[i]];
          base[off] = to_storage<S_>(v);
          for (int i = no - 1; i >= 0; --i) {
            if (++c[i] < r.shape[od[i]]) break;
            c[i] = 0;
          }
        }
      });
    };
#ifdef _OPENMP
    if (nt > 1 && nout >= kParallelMin) {
#pragma omp parallel num_threads(nt)
      {
        const int tid = omp_get_thread_num(), tc = omp_get_num_threads();
        const int64_t chunk = (nout + tc - 1) / tc;
        const int64_t o0 = std::min(nout, chunk * tid), o1 = std::min(nout, o0 + chunk);
        if (o0 < o1) range(o0, o1);
      }
      continue;
    }
#endif
    range(0, nout);
  }
}

}  // namespace
}  // namespace fg
