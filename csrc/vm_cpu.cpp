// CPU evaluator of fused regions: a block interpreter in the style of numexpr.
//
// Registers hold `block` values of the compute type T. Each instruction is
// one tight loop over a block (vectorizable, and with glibc's vector math for
// exp/sin/... because CMake compiles this file with -D__FAST_MATH__
// -fno-math-errno, which declares libmvec's variants without -ffast-math's
// finite-math assumptions). Each thread owns one contiguous range of the
// (normalised) iteration space and walks it block by block.
//
// Fast paths (all exact: they change where values live, not the math):
//  - a register is a pointer: a load of the compute dtype that is contiguous
//    over the block points it at the source (no copy), and an instruction
//    whose result an assign store writes contiguously computes straight into
//    the output (the store is skipped) -- unless some output overlaps an
//    input or another output (make_fast_plan);
//  - loads, stores, iota and column sums walk a block as 2-D tiles (rows of
//    the innermost dim), so a short innermost dim (an (N, 4) region, a
//    broadcast column) costs per tile, not per run;
//  - predicates are evaluated per tile (outer dims) or per row, and a
//    predicate on the innermost dim becomes a strided gather of the valid
//    positions (an arithmetic progression) instead of a test per element;
//  - programs with transcendental ops use short blocks and prefetch the next
//    block's contiguous inputs/outputs, so memory traffic overlaps the math.
//
// Reductions: normalize_region() puts the reduced dims innermost, so each
// output element of a reducing store ("row") is a contiguous range of
// row_len linear indices. A thread finishes rows that lie wholly inside its
// range and writes them directly; rows cut by a range boundary leave
// per-thread partial accumulators that are combined afterwards in thread
// order, so results are deterministic for a given thread count. Sums
// accumulate in double even when T is float.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX__
#include <immintrin.h>
#endif
#include "dtype_convert.h"
#include "op_math.h"
#include "vm.h"

namespace fg {
namespace {

// Below this many elements a region runs on the calling thread only: the
// cost of waking a thread team exceeds the work.
constexpr int64_t kParallelMin = 32768;
// Elementwise regions are cut into about this many chunks per thread.
constexpr int64_t kChunksPerThread = 16;
// Register file budget per thread; the block length follows from it so that
// the live registers of a program stay in L1/L2.
constexpr int64_t kRegBytes = 64 * 1024;
// Longest block (elements), and the blocks of programs with transcendental
// ops whose data streams from memory / fits in cache (see run_typed).
constexpr int64_t kMaxBlock = 4096;
constexpr int64_t kHeavyBlock = 256;
constexpr int64_t kHeavyCachedBlock = 1024;
// Bytes a region reads and writes above which it is taken to stream from
// memory rather than from cache (measured crossover: between 2.4 and 8 MB).
constexpr double kStreamBytes = 4.0 * 1024 * 1024;
constexpr int64_t kMaxOuterBlock = 16384;

// Ops that cost tens of cycles per element (libm / libmvec calls).
inline bool is_heavy(int64_t op) {
  switch (op) {
    case OP_EXP: case OP_LOG: case OP_SIN: case OP_COS: case OP_TANH: case OP_SIGMOID:
    case OP_LOG1P: case OP_EXPM1: case OP_POW:
      return true;
    default:
      return false;
  }
}

// Calls f with a null pointer of the storage type of `dtype` (used as a type tag).
template <class F>
inline void with_storage(int dtype, F&& f) {
  switch (dtype) {
#define FG_DTYPE(E, N, C, S) \
  case C:                    \
    f((S*)nullptr);          \
    break;
#include "dtypes.def"
#undef FG_DTYPE
  }
}
#define FG_STORAGE_T(tag) typename std::remove_pointer<decltype(tag)>::type

inline int64_t dot(const int64_t* c, const int64_t* s, int nd) {
  int64_t o = 0;
  for (int d = 0; d < nd; ++d) o += c[d] * s[d];
  return o;
}

// Calls f(coord, first, len) for each run of a block along the innermost
// dim: elements [first, first+len) of the block have coordinates
// coord[0..nd-1) fixed and coord[nd-1] .. coord[nd-1]+len-1.
// c0[ndim]: coordinate of the block's first element.
template <class F>
inline void for_runs(const Region& r, const int64_t* c0, int64_t n, F&& f) {
  const int nd = r.ndim;
  const int64_t inner = r.shape[nd - 1];
  int64_t c[kMaxNdim];
  for (int d = 0; d < nd; ++d) c[d] = c0[d];
  int64_t i = 0;
  for (;;) {
    const int64_t len = std::min(inner - c[nd - 1], n - i);
    f((const int64_t*)c, i, len);
    i += len;
    if (i >= n) return;
    c[nd - 1] = 0;
    for (int d = nd - 2; d >= 0; --d) {
      if (++c[d] < r.shape[d]) break;
      c[d] = 0;
    }
  }
}

// Calls f(coord, first, rows, len) for each tile of a block: a tile is
// `rows` consecutive values of dim nd-2 (from coord[nd-2]) times `len`
// consecutive values of the innermost dim (from coord[nd-1]); element (q, j)
// of the tile is element first + q*len + j of the block. rows > 1 only for
// whole rows (coord[nd-1] == 0, len == shape[nd-1]), so a short innermost dim
// costs one call per tile rather than one per run.
template <class F>
inline void for_tiles(const Region& r, const int64_t* c0, int64_t n, F&& f) {
  const int nd = r.ndim;
  if (nd == 1) {
    f(c0, int64_t(0), int64_t(1), n);
    return;
  }
  const int64_t inner = r.shape[nd - 1], outer = r.shape[nd - 2];
  int64_t c[kMaxNdim];
  for (int d = 0; d < nd; ++d) c[d] = c0[d];
  int64_t i = 0;
  while (i < n) {
    int64_t rows = 1, len;
    if (c[nd - 1] != 0 || n - i < inner) {
      len = std::min(inner - c[nd - 1], n - i);
    } else {
      len = inner;
      rows = std::min((n - i) / inner, outer - c[nd - 2]);
    }
    f((const int64_t*)c, i, rows, len);
    i += rows * len;
    if (i >= n) return;
    // advance: past the tile's last element
    c[nd - 1] += len;
    if (c[nd - 1] < inner) continue;  // (cannot happen: a tile ends a row or the block)
    c[nd - 1] = 0;
    c[nd - 2] += rows;
    if (c[nd - 2] < outer) continue;
    c[nd - 2] = 0;
    for (int d = nd - 3; d >= 0; --d) {
      if (++c[d] < r.shape[d]) break;
      c[d] = 0;
    }
  }
}

// ---- loads ------------------------------------------------------------------

// p: first element of the run; st: its stride in elements; out[n].
template <class S, class T>
inline void load_run(const S* p, int64_t st, int64_t n, T* out) {
  if (st == 1) {
    for (int64_t i = 0; i < n; ++i) out[i] = from_storage<T>(p[i]);
  } else if (st == 0) {
    const T v = from_storage<T>(p[0]);
    for (int64_t i = 0; i < n; ++i) out[i] = v;
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = from_storage<T>(p[i * st]);
  }
}

// A tile of `rows` runs of `len` (row stride so, element stride si) into
// out[rows*len].
template <class S, class T>
inline void load_tile(const S* p, int64_t so, int64_t si, int64_t rows, int64_t len, T* out) {
  if (rows == 1 || (si == 1 && so == len)) {
    load_run<S, T>(p, si, rows * len, out);
  } else if (si == 0) {  // broadcast along the innermost dim (expand of a column)
    if (len == 1) {
      for (int64_t q = 0; q < rows; ++q) out[q] = from_storage<T>(p[q * so]);
    } else {
      for (int64_t q = 0; q < rows; ++q) {
        const T v = from_storage<T>(p[q * so]);
        T* o = out + q * len;
        for (int64_t j = 0; j < len; ++j) o[j] = v;
      }
    }
  } else if (len < 16) {  // short rows: walk each column down the rows
    for (int64_t j = 0; j < len; ++j) {
      const S* pj = p + j * si;
      for (int64_t q = 0; q < rows; ++q) out[q * len + j] = from_storage<T>(pj[q * so]);
    }
  } else {
    for (int64_t q = 0; q < rows; ++q) load_run<S, T>(p + q * so, si, len, out + q * len);
  }
}

inline bool pred_eval(const Pred& P, int64_t coord, int64_t* extra) {
  const int64_t t = P.mul * coord + P.add;
  if (t < 0 || t % P.div != 0) return false;
  const int64_t q = t / P.div;
  if (q >= P.len) return false;
  *extra += q * P.stride;
  return true;
}

// Predicated load of one run (c: run coordinates; out[len]), element by
// element. Invalid elements are 0 and their address is never formed or read.
// (The general fallback: more than one predicate on the innermost dim.)
template <class S, class T>
inline void load_pred_run(const LoadRec& L, const int64_t* c, int nd, int64_t len, T* out) {
  const int inner = nd - 1;
  // Predicates on outer dims are constant along the run.
  int64_t extra0 = 0;
  for (const Pred& P : L.preds) {
    if (P.dim != inner && !pred_eval(P, c[P.dim], &extra0)) {
      for (int64_t j = 0; j < len; ++j) out[j] = T(0);
      return;
    }
  }
  const S* base = reinterpret_cast<const S*>(L.ptr);
  const int64_t st = L.stride[inner];
  for (int64_t j = 0; j < len; ++j) {
    const int64_t ci = c[inner] + j;
    int64_t extra = extra0;
    bool ok = true;
    for (const Pred& P : L.preds)
      if (P.dim == inner && !pred_eval(P, ci, &extra)) {
        ok = false;
        break;
      }
    if (ok) {
      // Only a valid element's address is formed.
      const int64_t off = L.offset + dot(c, L.stride, inner) + ci * st + extra;
      out[j] = from_storage<T>(base[off]);
    } else {
      out[j] = T(0);
    }
  }
}

// Rounded quotients (b != 0), clamped to int64 (descriptor values are
// arbitrary; the clamped bounds are then clipped to the run anyway).
inline __int128 floor_div128(__int128 a, __int128 b) {
  __int128 q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}
inline int64_t clamp64(__int128 v) {
  return (int64_t)std::max<__int128>(std::min<__int128>(v, INT64_MAX), INT64_MIN);
}
inline int64_t floor_div(__int128 a, __int128 b) { return clamp64(floor_div128(a, b)); }
inline int64_t ceil_div(__int128 a, __int128 b) { return clamp64(-floor_div128(-a, b)); }

// The elements of the innermost-dim range [ci, ci+len) that satisfy one
// predicate P on that dim: positions j0 + k*step (k < cnt) of the range,
// with predicate index q0 + k*dq. (t = mul*c + add must be a multiple of div
// with 0 <= t/div < len: an arithmetic progression clipped to an interval.)
struct Progression {
  int64_t j0, step, cnt, q0, dq;
};
inline Progression pred_progression(const Pred& P, int64_t ci, int64_t len) {
  Progression g{0, 1, 0, 0, 0};
  if (P.len <= 0 || len <= 0) return g;
  const __int128 lo_t = 0, hi_t = (__int128)(P.len - 1) * P.div;
  int64_t lo, hi;  // coordinates with lo_t <= t <= hi_t
  if (P.mul > 0) {
    lo = ceil_div(lo_t - P.add, P.mul);
    hi = floor_div(hi_t - P.add, P.mul);
  } else {
    lo = ceil_div(hi_t - P.add, P.mul);
    hi = floor_div(lo_t - P.add, P.mul);
  }
  lo = std::max(lo, ci);
  hi = std::min(hi, ci + len - 1);
  if (lo > hi) return g;
  // t is a multiple of div on every (div/gcd)-th coordinate: find the first.
  int64_t a = P.mul < 0 ? -P.mul : P.mul, b = P.div;
  while (b) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  const int64_t period = P.div / a;
  int64_t first = -1;
  for (int64_t x = lo; x <= hi && x < lo + period; ++x)
    if ((P.mul * x + P.add) % P.div == 0) {
      first = x;
      break;
    }
  if (first < 0) return g;
  g.j0 = first - ci;
  g.step = period;
  g.cnt = (hi - first) / period + 1;
  g.q0 = (P.mul * first + P.add) / P.div;
  g.dq = P.mul / a;
  return g;
}

// Predicated load of one tile (see for_tiles): predicates on dims other than
// the tile's are evaluated once per tile, those on dim nd-2 once per row, and
// one predicate on the innermost dim becomes a strided gather of the valid
// positions (the same in every row). Invalid elements are 0 and their address
// is never formed or read.
template <class S, class T>
void load_pred_tile(const LoadRec& L, const int64_t* c, int nd, int64_t rows, int64_t len, T* out) {
  const int in = nd - 1, rd = rows > 1 ? nd - 2 : -1;
  const int64_t total = rows * len;
  int64_t extra0 = 0;
  int n_inner = 0, n_row = 0;
  const Pred* ip = nullptr;
  for (const Pred& P : L.preds) {
    if (P.dim == in && P.mul != 0) {
      ++n_inner;
      ip = &P;
    } else if (P.dim == rd) {
      ++n_row;
    } else if (!pred_eval(P, c[P.dim], &extra0)) {  // constant over the tile
      for (int64_t i = 0; i < total; ++i) out[i] = T(0);
      return;
    }
  }
  if (n_inner > 1) {  // general fallback, element by element
    int64_t cr[kMaxNdim];
    for (int d = 0; d < nd; ++d) cr[d] = c[d];
    for (int64_t q = 0; q < rows; ++q) {
      if (rows > 1) cr[nd - 2] = c[nd - 2] + q;
      load_pred_run<S, T>(L, cr, nd, len, out + q * len);
    }
    return;
  }
  Progression g{0, 1, len, 0, 0};
  int64_t pst = 0;
  if (ip) {
    g = pred_progression(*ip, c[in], len);
    pst = ip->stride;
  }
  for (int64_t i = 0; i < total; ++i) out[i] = T(0);
  if (g.cnt == 0) return;
  const S* base = reinterpret_cast<const S*>(L.ptr);
  const int64_t si = L.stride[in], so = rows > 1 ? L.stride[nd - 2] : 0;
  // offset of element (row 0, position j0) without the row predicates
  const int64_t off0 = L.offset + dot(c, L.stride, nd) + extra0 + g.j0 * si + g.q0 * pst;
  const int64_t de = g.step * si + g.dq * pst;  // per valid element along the row
  if (n_row == 0) {
    if (g.cnt * 4 < rows) {  // few valid positions per row: walk them down the rows
      for (int64_t k = 0; k < g.cnt; ++k) {
        const int64_t ok = off0 + k * de;
        T* o = out + g.j0 + k * g.step;
        for (int64_t q = 0; q < rows; ++q) o[q * len] = from_storage<T>(base[ok + q * so]);
      }
    } else {
      for (int64_t q = 0; q < rows; ++q) {
        const int64_t oq = off0 + q * so;
        T* o = out + q * len + g.j0;
        if (g.step == 1 && de == 1) {
          for (int64_t k = 0; k < g.cnt; ++k) o[k] = from_storage<T>(base[oq + k]);
        } else {
          for (int64_t k = 0; k < g.cnt; ++k) o[k * g.step] = from_storage<T>(base[oq + k * de]);
        }
      }
    }
    return;
  }
  for (int64_t q = 0; q < rows; ++q) {
    int64_t extra = 0;
    bool ok = true;
    for (const Pred& P : L.preds)
      if (P.dim == rd && !pred_eval(P, c[rd] + q, &extra)) {
        ok = false;
        break;
      }
    if (!ok) continue;
    const int64_t oq = off0 + q * so + extra;
    T* o = out + q * len + g.j0;
    for (int64_t k = 0; k < g.cnt; ++k) o[k * g.step] = from_storage<T>(base[oq + k * de]);
  }
}

template <class T>
void do_load(const Region& r, const LoadRec& L, const int64_t* c0, int64_t n, T* out) {
  const int nd = r.ndim;
  with_storage(L.dtype, [&](auto tag) {
    using S = FG_STORAGE_T(tag);
    if (L.preds.empty()) {
      const S* base = reinterpret_cast<const S*>(L.ptr);
      const int64_t so = nd > 1 ? L.stride[nd - 2] : 0;
      for_tiles(r, c0, n, [&](const int64_t* c, int64_t i, int64_t rows, int64_t len) {
        load_tile<S, T>(base + L.offset + dot(c, L.stride, nd), so, L.stride[nd - 1], rows, len, out + i);
      });
    } else {
      for_tiles(r, c0, n, [&](const int64_t* c, int64_t i, int64_t rows, int64_t len) {
        load_pred_tile<S, T>(L, c, nd, rows, len, out + i);
      });
    }
  });
}

// ---- stores -----------------------------------------------------------------

template <class S, class T>
inline void store_run(S* p, int64_t st, int64_t n, const T* v) {
  if (st == 1) {
    for (int64_t i = 0; i < n; ++i) p[i] = to_storage<S>(v[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) p[i * st] = to_storage<S>(v[i]);
  }
}

template <class S, class T>
inline void store_tile(S* p, int64_t so, int64_t si, int64_t rows, int64_t len, const T* v) {
  if (rows == 1 || (si == 1 && so == len)) {
    store_run<S, T>(p, si, rows * len, v);
  } else if (len < 16) {
    for (int64_t j = 0; j < len; ++j) {
      S* pj = p + j * si;
      for (int64_t q = 0; q < rows; ++q) pj[q * so] = to_storage<S>(v[q * len + j]);
    }
  } else {
    for (int64_t q = 0; q < rows; ++q) store_run<S, T>(p + q * so, si, len, v + q * len);
  }
}

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

// What run_typed decides once per region for the register-pointer fast
// paths (see Worker::exec_block).
struct FastPlan {
  bool enabled = false;             // no store overlaps a load or another store
  bool prefetch = false;            // prefetch the next block of contiguous loads / redirected stores
  std::vector<int> load_ck;         // per load: innermost dims over which it is contiguous (-1: not eligible)
  std::vector<int64_t> load_span;   // per load: elements spanned by those dims
  std::vector<int> store_ck;        // same for stores (assign, compute dtype only)
  std::vector<int64_t> store_span;
  std::vector<int> redirect;        // per instruction: store record its result may be written into, or -1
};


// Asks for the cache lines of the n elements after p[0..n) (the same record's
// part of the next block) while this block computes. A prefetch never faults,
// so the range need not be valid memory.
template <class T>
inline void prefetch_next(const T* p, int64_t n, int write) {
  const char* a = reinterpret_cast<const char*>(p + n);
  const char* e = reinterpret_cast<const char*>(p + 2 * n);
  if (write)
    for (; a < e; a += 64) __builtin_prefetch(a, 1, 3);
  else
    for (; a < e; a += 64) __builtin_prefetch(a, 0, 3);
}

// Per-thread interpreter over one range of the iteration space.
//
// Registers are pointers: an instruction writes its own block buffer and
// points its register at it, except that (when the FastPlan allows it and
// the block is contiguous in memory for that record)
//  - a load of the compute dtype points its register at the source
//    (no copy: the first consumer reads memory directly), and
//  - an instruction whose result is stored by an assign store writes
//    straight into the output (the store is then skipped).
template <class T>
struct Worker {
  const Region& r;
  const FastPlan& fp;
  int64_t block;
  T* regs;                // [nregs][block]
  const T** regp;         // [nregs]: where each register's values are
  char* done;             // [nstores]: written by a redirected instruction this block
  RowState* state;        // [nstores]
  RowPartial* partials;   // [nstores][2]
  int* npartials;         // [nstores]
  double* oacc;           // outer strategy: [nstores][nout] accumulators (reducing stores only)
  int64_t range_begin = 0;

  T* reg(int64_t k) const { return regs + k * block; }

  void push_partial(int64_t k, int64_t row, double acc) {
    partials[2 * k + npartials[k]++] = RowPartial{row, acc};
  }

  // v[n]: values of elements [s, s+n) for reducing store k.
  void reduce_store(int64_t k, const T* v, int64_t s, int64_t n) {
    const StoreRec& S = r.stores[k];
    RowState& st = state[k];
    const int64_t R = r.row_len;
    int64_t i = 0, pos = s;
    while (i < n) {
      const int64_t row = pos / R;
      if (pos == row * R && n - i >= R) {
        // Whole rows inside the block (so inside our range): reduce each and
        // write it, stepping the output offset with an odometer.
        const int64_t nrows = (n - i) / R;
        int64_t oc[kMaxNdim];
        int64_t off = row_offset(r, S, row, oc);
        const int no = r.ndim - r.nred;
        with_storage(S.dtype, [&](auto tag) {
          using S_ = FG_STORAGE_T(tag);
          S_* base = reinterpret_cast<S_*>(S.ptr);
          const T* x = v + i;
          const bool short_sum = S.mode == MODE_SUM && R < 16;  // seg_sum's order for R < 16
          for (int64_t q = 0; q < nrows; ++q, x += R) {
            double a;
            if (short_sum) {
              a = 0.0;
              for (int64_t j = 0; j < R; ++j) a += double(x[j]);
            } else {
              a = seg_reduce(S.mode, x, R);
            }
            base[off] = to_storage<S_>(a);
            if (no == 1) {
              off += S.stride[0];
              continue;
            }
            for (int d = no - 1; d >= 0; --d) {
              off += S.stride[d];
              if (++oc[d] < r.shape[d]) break;
              off -= oc[d] * S.stride[d];
              oc[d] = 0;
            }
          }
        });
        i += nrows * R;
        pos += nrows * R;
        continue;
      }
      const int64_t row_end = (row + 1) * R;
      const int64_t len = std::min(row_end - pos, n - i);
      const double part = seg_reduce(S.mode, v + i, len);
      if (st.row == row) {
        st.acc = red_combine(S.mode, st.acc, part);
      } else {
        st.row = row;
        st.acc = part;
      }
      i += len;
      pos += len;
      if (pos == row_end) {
        if (row * R >= range_begin)
          write_row(r, S, row, st.acc);  // the whole row was ours
        else
          push_partial(k, row, st.acc);  // started in an earlier thread's range
        st.row = -1;
      }
    }
  }

  // Outer strategy: v[n] are elements [s, s+n) (first coordinate c0) for
  // reducing store k; each lands in this thread's accumulator of its output.
  void reduce_store_outer(int64_t k, const T* v, const int64_t* c0, int64_t n) {
    const int mode = r.stores[k].mode;
    double* acc = oacc + k * r.nout;
    const int nd = r.ndim;
    const int64_t os = r.ostride[nd - 1], os2 = nd > 1 ? r.ostride[nd - 2] : 0;
    for_tiles(r, c0, n, [&](const int64_t* c, int64_t i0, int64_t rows, int64_t len) {
      double* a0 = acc + dot(c, r.ostride, nd);
      if (mode == MODE_SUM && os == 1 && os2 == 0 && rows > 1 && len <= 8) {
        // Many short rows into the same few outputs (a column sum of a
        // narrow matrix): keep the sums in registers.
        switch (len) {
#define FG_NARROW(L) \
  case L:            \
    sum_rows<L>(a0, v + i0, rows); \
    return;
          FG_NARROW(1) FG_NARROW(2) FG_NARROW(3) FG_NARROW(4)
          FG_NARROW(5) FG_NARROW(6) FG_NARROW(7) FG_NARROW(8)
#undef FG_NARROW
        }
      }
      int64_t q0 = 0;
      if (mode == MODE_SUM && os == 1 && os2 == 0) {
        // Rows into the same outputs (a column sum): four rows per pass over
        // the accumulators, in a fixed order (deterministic).
        for (; q0 + 4 <= rows; q0 += 4) {
          const T* x = v + i0 + q0 * len;
          const T *x1 = x + len, *x2 = x1 + len, *x3 = x2 + len;
          for (int64_t j = 0; j < len; ++j)
            a0[j] += (double(x[j]) + double(x1[j])) + (double(x2[j]) + double(x3[j]));
        }
      }
      for (int64_t q = q0; q < rows; ++q) {
        double* a = a0 + q * os2;
        const T* x = v + i0 + q * len;
        if (os == 1) {
          if (mode == MODE_SUM)
            for (int64_t j = 0; j < len; ++j) a[j] += double(x[j]);
          else if (mode == MODE_MAX)
            for (int64_t j = 0; j < len; ++j) a[j] = fg_MAX(a[j], double(x[j]));
          else
            for (int64_t j = 0; j < len; ++j) a[j] = fg_MIN(a[j], double(x[j]));
        } else {
          for (int64_t j = 0; j < len; ++j) a[j * os] = red_combine(mode, a[j * os], double(x[j]));
        }
      }
    });
  }

  // a[j] += sum over q of x[q*L + j] (j < L): four partial sums per output,
  // in registers, added in a fixed order (deterministic).
  template <int L>
  static void sum_rows(double* a, const T* x, int64_t rows) {
    double p[4][L] = {};
    int64_t q = 0;
    for (; q + 4 <= rows; q += 4)
      for (int u = 0; u < 4; ++u)
        for (int j = 0; j < L; ++j) p[u][j] += double(x[(q + u) * L + j]);
    for (; q < rows; ++q)
      for (int j = 0; j < L; ++j) p[0][j] += double(x[q * L + j]);
    for (int j = 0; j < L; ++j) a[j] += (p[0][j] + p[1][j]) + (p[2][j] + p[3][j]);
  }

  // Block [s, s+n) lies within one stretch of `span` elements over which a
  // record with ck contiguous innermost dims is contiguous.
  bool contiguous(int ck, int64_t span, int64_t s, int64_t n) const {
    return ck >= r.ndim || (ck >= 0 && s / span == (s + n - 1) / span);
  }

  // Where instruction i writes its result (and points its register).
  T* dst_for(size_t i, int64_t dst, const int64_t* c0, int64_t s, int64_t n) {
    if (fp.enabled) {
      const int k = fp.redirect[i];
      if (k >= 0 && contiguous(fp.store_ck[k], fp.store_span[k], s, n)) {
        const StoreRec& S = r.stores[k];
        done[k] = 1;
        T* p = reinterpret_cast<T*>(S.ptr) + dot(c0, S.stride, r.ndim);
        if (fp.prefetch) prefetch_next(p, n, 1);
        regp[dst] = p;
        return p;
      }
    }
    T* p = reg(dst);
    regp[dst] = p;
    return p;
  }

  void exec_block(int64_t s, int64_t n) {
    const int nd = r.ndim;
    int64_t c0[kMaxNdim];
    int64_t lin = s;
    for (int d = nd - 1; d >= 0; --d) {
      c0[d] = lin % r.shape[d];
      lin /= r.shape[d];
    }
    if (fp.enabled)
      for (size_t k = 0; k < r.stores.size(); ++k) done[k] = 0;
    const size_t ni = r.instrs.size();
    for (size_t ii = 0; ii < ni; ++ii) {
      const Instr& I = r.instrs[ii];
      switch (I.op) {
        case OP_LOAD: {
          const LoadRec& L = r.loads[I.a];
          if (fp.enabled && fp.redirect[ii] < 0 && contiguous(fp.load_ck[I.a], fp.load_span[I.a], s, n)) {
            const T* p = reinterpret_cast<const T*>(L.ptr) + L.offset + dot(c0, L.stride, nd);
            if (fp.prefetch) prefetch_next(p, n, 0);
            regp[I.dst] = p;
            break;
          }
          do_load<T>(r, L, c0, n, dst_for(ii, I.dst, c0, s, n));
          break;
        }
        case OP_CONST: {
          T* d = dst_for(ii, I.dst, c0, s, n);
          const T v = T(r.consts[I.a]);
          for (int64_t i = 0; i < n; ++i) d[i] = v;
          break;
        }
        case OP_IOTA: {
          T* d = dst_for(ii, I.dst, c0, s, n);
          const int dim = (int)I.a;
          const double scale = r.consts[I.b], shift = r.consts[I.c];
          for_tiles(r, c0, n, [&](const int64_t* c, int64_t i0, int64_t rows, int64_t len) {
            for (int64_t q = 0; q < rows; ++q) {
              T* o = d + i0 + q * len;
              if (dim == nd - 1) {
                for (int64_t j = 0; j < len; ++j) o[j] = T(scale * double(c[dim] + j) + shift);
              } else {
                const T v = T(scale * double(c[dim] + (dim == nd - 2 ? q : 0)) + shift);
                for (int64_t j = 0; j < len; ++j) o[j] = v;
              }
            }
          });
          break;
        }
        case OP_STORE: {
          const StoreRec& S = r.stores[I.a];
          const T* v = regp[I.b];
          if (S.mode != MODE_ASSIGN && r.red_outer) {
            reduce_store_outer(I.a, v, c0, n);
          } else if (S.mode != MODE_ASSIGN) {
            reduce_store(I.a, v, s, n);
          } else if (!(fp.enabled && done[I.a])) {
            with_storage(S.dtype, [&](auto tag) {
              using S_ = FG_STORAGE_T(tag);
              S_* base = reinterpret_cast<S_*>(S.ptr);
              const int64_t so = nd > 1 ? S.stride[nd - 2] : 0;
              for_tiles(r, c0, n, [&](const int64_t* c, int64_t i0, int64_t rows, int64_t len) {
                store_tile<S_, T>(base + dot(c, S.stride, nd), so, S.stride[nd - 1], rows, len, v + i0);
              });
            });
          }
          break;
        }
          // The math ops: one vectorizable loop each, generated from ops.def.
#define FG_CASE_0(E)
#define FG_CASE_1(E)                                          \
  case OP_##E: {                                              \
    const T* x = regp[I.a];                                   \
    T* d = dst_for(ii, I.dst, c0, s, n);                      \
    for (int64_t i = 0; i < n; ++i) d[i] = fg_##E<T>(x[i]);  \
    break;                                                    \
  }
#define FG_CASE_2(E)                                                   \
  case OP_##E: {                                                       \
    const T* x = regp[I.a];                                            \
    const T* y = regp[I.b];                                            \
    T* d = dst_for(ii, I.dst, c0, s, n);                               \
    for (int64_t i = 0; i < n; ++i) d[i] = fg_##E<T>(x[i], y[i]);     \
    break;                                                             \
  }
#define FG_CASE_3(E)                                                          \
  case OP_##E: {                                                              \
    const T* x = regp[I.a];                                                   \
    const T* y = regp[I.b];                                                   \
    const T* z = regp[I.c];                                                   \
    T* d = dst_for(ii, I.dst, c0, s, n);                                      \
    for (int64_t i = 0; i < n; ++i) d[i] = fg_##E<T>(x[i], y[i], z[i]);      \
    break;                                                                    \
  }
#define FG_OP(E, N, A) FG_CASE_##A(E)
#include "ops.def"
#undef FG_OP
#undef FG_CASE_0
#undef FG_CASE_1
#undef FG_CASE_2
#undef FG_CASE_3
        default:
          break;
      }
    }
  }

  void run_range(int64_t a, int64_t b) {
    range_begin = a;
    if (r.red_outer)
      for (size_t k = 0; k < r.stores.size(); ++k)
        if (r.stores[k].mode != MODE_ASSIGN)
          std::fill(oacc + k * r.nout, oacc + (k + 1) * r.nout, red_init(r.stores[k].mode));
    for (size_t k = 0; k < r.stores.size(); ++k) state[k].row = -1, npartials[k] = 0;
    for (int64_t s = a; s < b; s += block) exec_block(s, std::min(block, b - s));
    for (size_t k = 0; k < r.stores.size(); ++k)
      if (state[k].row >= 0) push_partial(k, state[k].row, state[k].acc);  // cut by our range end
  }
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

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// Innermost dims over which a record (strides st) is contiguous: -1 if
// none, and the number of elements those dims span.
inline int contig_dims(const Region& r, const int64_t* st, int64_t* span) {
  int64_t expect = 1;
  int k = 0;
  for (int d = r.ndim - 1; d >= 0; --d, ++k) {
    if (r.shape[d] == 1) continue;
    if (st[d] != expect) break;
    expect *= r.shape[d];
  }
  *span = std::max<int64_t>(expect, 1);
  return k == 0 ? -1 : k;
}

// Byte range [lo, hi) a record may touch (conservative); empty if none.
struct Extent {
  uintptr_t lo = 0, hi = 0;
};
inline Extent extent_of(const Region& r, const char* ptr, int dtype, int64_t offset, const int64_t* st,
                        const std::vector<Pred>* preds) {
  __int128 lo = offset, hi = offset;
  for (int d = 0; d < r.ndim; ++d) {
    const __int128 e = (__int128)st[d] * (r.shape[d] - 1);
    (e < 0 ? lo : hi) += e;
  }
  if (preds)
    for (const Pred& P : *preds) {
      if (P.len <= 0) return Extent{};  // never valid: touches nothing
      const __int128 e = (__int128)P.stride * (P.len - 1);
      (e < 0 ? lo : hi) += e;
    }
  const int64_t isz = dtype_itemsize(dtype);
  Extent x;
  x.lo = (uintptr_t)((__int128)(uintptr_t)ptr + lo * isz);
  x.hi = (uintptr_t)((__int128)(uintptr_t)ptr + (hi + 1) * isz);
  return x;
}
inline bool overlap(const Extent& a, const Extent& b) {
  return a.lo < a.hi && b.lo < b.hi && a.lo < b.hi && b.lo < a.hi;
}

// Decides the register-pointer fast paths (Worker). They change when memory
// is read and written within a block, so they are off when a store may
// overlap a load or another store.
FastPlan make_fast_plan(const Region& r, int compute_dtype) {
  FastPlan fp;
  const size_t nl = r.loads.size(), ns = r.stores.size();
  std::vector<Extent> le(nl), se(ns);
  for (size_t i = 0; i < nl; ++i) {
    const LoadRec& L = r.loads[i];
    le[i] = extent_of(r, L.ptr, L.dtype, L.offset, L.stride, &L.preds);
  }
  for (size_t k = 0; k < ns; ++k) {
    const StoreRec& S = r.stores[k];
    se[k] = extent_of(r, S.ptr, S.dtype, 0, S.stride, nullptr);
    for (size_t i = 0; i < nl; ++i)
      if (overlap(se[k], le[i])) return fp;
    for (size_t j = 0; j < k; ++j)
      if (overlap(se[k], se[j])) return fp;
  }
  fp.enabled = true;
  fp.load_ck.assign(nl, -1);
  fp.load_span.assign(nl, 1);
  fp.store_ck.assign(ns, -1);
  fp.store_span.assign(ns, 1);
  for (size_t i = 0; i < nl; ++i) {
    const LoadRec& L = r.loads[i];
    if (L.dtype == compute_dtype && L.preds.empty()) fp.load_ck[i] = contig_dims(r, L.stride, &fp.load_span[i]);
  }
  for (size_t k = 0; k < ns; ++k) {
    const StoreRec& S = r.stores[k];
    if (S.dtype == compute_dtype && S.mode == MODE_ASSIGN) fp.store_ck[k] = contig_dims(r, S.stride, &fp.store_span[k]);
  }
  // A stored register's value is computed straight into the store's output
  // by the last instruction that writes the register before the store.
  const size_t ni = r.instrs.size();
  fp.redirect.assign(ni, -1);
  for (size_t j = 0; j < ni; ++j) {
    const Instr& S = r.instrs[j];
    if (S.op != OP_STORE || fp.store_ck[S.a] < 0) continue;
    for (size_t i = j; i-- > 0;) {
      const Instr& I = r.instrs[i];
      if (I.op == OP_STORE || I.dst != S.b) continue;
      if (fp.redirect[i] < 0) fp.redirect[i] = (int)S.a;
      break;
    }
  }
  return fp;
}

template <class T>
void run_typed(const Region& r, int nthreads) {
  const int64_t nregs = std::max<int64_t>(r.nregs, 1);
  // Block length: programs with a transcendental op are compute-bound, and
  // run short blocks while prefetching the next block's contiguous inputs
  // and outputs, so memory traffic overlaps the math (a long burst of
  // misses would stall it, as would a long burst of stores). Memory-bound
  // programs run long blocks (less per-block overhead) and leave streaming
  // to the hardware prefetcher.
  // (Data that fits in cache needs no prefetching: then longer blocks win.)
  bool heavy = false;
  for (const Instr& I : r.instrs) heavy |= is_heavy(I.op);
  int64_t item_bytes = 0;
  for (const LoadRec& L : r.loads) item_bytes += dtype_itemsize(L.dtype);
  for (const StoreRec& S : r.stores) item_bytes += dtype_itemsize(S.dtype);
  const bool streaming = double(r.numel) * double(item_bytes) > kStreamBytes;
  const int64_t max_block = heavy ? (streaming ? kHeavyBlock : kHeavyCachedBlock) : kMaxBlock;
  int64_t block = kRegBytes / (nregs * (int64_t)sizeof(T));
  block = std::max<int64_t>(64, std::min<int64_t>(max_block, block)) & ~int64_t(15);
  // A column sum (outer strategy, rows of the innermost dim reduced) adds
  // several rows per pass over its accumulators: let a block hold 4 rows.
  if (!heavy && r.red_outer && r.ndim >= 2 && r.ostride[r.ndim - 2] == 0 && r.ostride[r.ndim - 1] == 1)
    block = std::max(block, std::min({4 * r.shape[r.ndim - 1], kMaxOuterBlock,
                                      4 * kRegBytes / (nregs * (int64_t)sizeof(T))}) & ~int64_t(15));
  int nt = 1;
  if (r.numel >= kParallelMin)
    nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, r.numel / (kParallelMin / 2)));

  const size_t ns = r.stores.size();
  const size_t reg_bytes = (size_t)nt * nregs * block * sizeof(T);
  std::unique_ptr<T, FreeDeleter> regs((T*)std::aligned_alloc(64, (reg_bytes + 63) & ~size_t(63)));
  if (!regs) throw std::bad_alloc();
  FastPlan fp = make_fast_plan(r, std::is_same<T, float>::value ? DT_F32 : DT_F64);
  fp.prefetch = heavy && streaming;
  std::vector<const T*> regp((size_t)nt * nregs, nullptr);
  std::vector<char> done(nt * ns + 1, 0);
  std::vector<RowState> state(nt * ns + 1);
  std::vector<RowPartial> partials(nt * ns * 2 + 1);
  std::vector<int> npartials(nt * ns + 1, 0);
  // Outer strategy: per-thread accumulators, [nt][nstores][nout] (slots of
  // assign stores are left unused, which keeps the indexing trivial).
  std::vector<double> oacc(r.red_outer ? (size_t)nt * ns * r.nout : 0);
  std::vector<char> used(nt, 0);

  std::atomic<int64_t> next{0};
  auto body = [&](int tid, int tcount) {
    used[tid] = 1;
    Worker<T> w{r, fp, block, regs.get() + (size_t)tid * nregs * block, &regp[(size_t)tid * nregs],
                &done[tid * ns], &state[tid * ns],
                &partials[tid * ns * 2], &npartials[tid * ns],
                r.red_outer ? &oacc[(size_t)tid * ns * r.nout] : nullptr};
    if (tcount > 1 && !r.has_reduce) {
      // Elementwise: threads take chunks from a shared counter, so a thread
      // that gets less CPU (a busy machine) does less of the work. (Which
      // thread computes an element does not change its value.)
      const int64_t chunk = std::max<int64_t>(block, (r.numel / (tcount * kChunksPerThread)) / block * block);
      for (;;) {
        const int64_t a = next.fetch_add(chunk, std::memory_order_relaxed);
        if (a >= r.numel) break;
        w.run_range(a, std::min(r.numel, a + chunk));
      }
      return;
    }
    // With reductions a thread's range is fixed (deterministic results).
    const int64_t chunk = (r.numel + tcount - 1) / tcount;
    const int64_t a = std::min(r.numel, chunk * tid), b = std::min(r.numel, a + chunk);
    w.run_range(a, b);
  };
  if (nt == 1) {
    body(0, 1);
  } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
    body(omp_get_thread_num(), omp_get_num_threads());
#else
    body(0, 1);
#endif
  }

  if (!r.has_reduce) return;
  if (r.red_outer) {
    combine_outer(r, oacc.data(), used, nt);
    return;
  }
  // Rows cut by thread boundaries: combine their pieces in thread order.
  for (size_t k = 0; k < ns; ++k) {
    const StoreRec& S = r.stores[k];
    if (S.mode == MODE_ASSIGN) continue;
    int64_t row = -1;
    double acc = 0;
    for (int t = 0; t < nt; ++t)
      for (int j = 0; j < npartials[t * ns + k]; ++j) {
        const RowPartial& p = partials[(t * ns + k) * 2 + j];
        if (p.row == row) {
          acc = red_combine(S.mode, acc, p.acc);
        } else {
          if (row >= 0) write_row(r, S, row, acc);
          row = p.row;
          acc = p.acc;
        }
      }
    if (row >= 0) write_row(r, S, row, acc);
  }
}

// numel == 0: nothing is computed, but every element of a reducing store's
// output gets the reduction's identity (0, -inf, +inf).
void init_empty_outputs(const Region& r) {
  for (const StoreRec& S : r.stores) {
    if (S.mode == MODE_ASSIGN) continue;
    int dims[kMaxNdim], n = 0;
    bool empty = false;
    for (int d = 0; d < r.ndim; ++d) {
      if (S.stride[d] == 0) continue;  // reduced or broadcast: one output element
      if (r.shape[d] == 0) empty = true;
      dims[n++] = d;
    }
    if (empty) continue;
    const double init = red_init(S.mode);
    with_storage(S.dtype, [&](auto tag) {
      using S_ = FG_STORAGE_T(tag);
      S_* base = reinterpret_cast<S_*>(S.ptr);
      const S_ v = to_storage<S_>(init);
      int64_t c[kMaxNdim] = {};
      for (;;) {
        int64_t off = 0;
        for (int k = 0; k < n; ++k) off += c[k] * S.stride[dims[k]];
        base[off] = v;
        int k = n - 1;
        for (; k >= 0; --k) {
          if (++c[k] < r.shape[dims[k]]) break;
          c[k] = 0;
        }
        if (k < 0) break;
      }
    });
  }
}

}  // namespace

void run_region_cpu(Region& r, int compute, int nthreads) {
  if (r.numel == 0) {
    init_empty_outputs(r);
    return;
  }
  normalize_region(r);
  if (compute == 0)
    run_typed<float>(r, std::max(1, nthreads));
  else
    run_typed<double>(r, std::max(1, nthreads));
}

}  // namespace fg
