// Streaming (non-temporal) stores, shared by the CPU interpreter's row groups and the compiled
// loops (python/fastgrad/jit.py, which installs this header with op_math.h).
//
// A large output that nothing reads soon is written to memory without the cache first reading
// each line (the "read for ownership" a plain store costs: a third more traffic for a loop
// reading two arrays and writing one) and without evicting what the cache holds.
#pragma once
#include <stdint.h>

#include <type_traits>
#ifdef __AVX__
#include <immintrin.h>
#endif

namespace fg {

// p[0..n) = v[0..n), streamed where p is 32-byte aligned (plain stores before that and for the
// tail). Other threads see the streamed lines only after stream_fence on this thread.
template <class T>
inline void stream_run(T* p, const T* v, int64_t n) {
  int64_t i = 0;
#ifdef __AVX__
  for (; i < n && (reinterpret_cast<uintptr_t>(p + i) & 31); ++i) p[i] = v[i];
  if constexpr (std::is_same<T, float>::value) {
    for (; i + 8 <= n; i += 8)
      _mm256_stream_ps(reinterpret_cast<float*>(p + i), _mm256_loadu_ps(reinterpret_cast<const float*>(v + i)));
  } else if constexpr (std::is_same<T, double>::value) {
    for (; i + 4 <= n; i += 4)
      _mm256_stream_pd(reinterpret_cast<double*>(p + i), _mm256_loadu_pd(reinterpret_cast<const double*>(v + i)));
  }
#endif
  for (; i < n; ++i) p[i] = v[i];
}

// Bytes of one streamed piece of a compiled loop (fg_kernel_stream): a cache line.
constexpr int kStreamLine = 64;

// p[0..kStreamLine / sizeof(T)) = v[...], one cache line streamed from registers; p must be
// 32-byte aligned. In a compiled loop v is a local array the line's values were just computed
// into, which the compiler keeps in registers (a buffer in memory measured no faster than
// plain stores: docs/performance-history.md, "Streaming stores in compiled loops").
template <class T>
inline void stream_line(T* p, const T* v) {
#ifdef __AVX__
  if constexpr (std::is_same<T, float>::value) {
    _mm256_stream_ps(p, _mm256_loadu_ps(v));
    _mm256_stream_ps(p + 8, _mm256_loadu_ps(v + 8));
    return;
  } else if constexpr (std::is_same<T, double>::value) {
    _mm256_stream_pd(p, _mm256_loadu_pd(v));
    _mm256_stream_pd(p + 4, _mm256_loadu_pd(v + 4));
    return;
  }
#endif
  for (int i = 0; i < kStreamLine / int(sizeof(T)); ++i) p[i] = v[i];
}

inline void stream_fence() {
#ifdef __AVX__
  _mm_sfence();
#endif
}

}  // namespace fg
