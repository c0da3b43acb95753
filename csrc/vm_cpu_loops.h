// Block and tile iteration for the CPU interpreter (vm_cpu.cpp): walking a
// block of the iteration space as runs / 2-D tiles, loads (plain and
// predicated, with predicates turned into strided gathers), stores, and the
// prefetch of the next block.
//
// Internal to the CPU VM: included only by vm_cpu.cpp, so it is compiled in
// that one translation unit with its flags (-O3 -fno-math-errno
// -D__FAST_MATH__) and its functions inline there as before; hence the
// anonymous namespace.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include "dtype_convert.h"
#include "stream_store.h"
#include "vm.h"

namespace fg {
namespace {

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

// Fences the thread's streaming stores as it leaves the scope (when `on`): other threads
// see the streamed lines only after it.
struct StreamFence {
  bool on = true;
  ~StreamFence() {
    if (on) stream_fence();
  }
};

// d[i] = f(i) for i < n, written with streaming stores: computed a piece at
// a time into a buffer that stays in L1, each piece then streamed out.
template <class T, class F>
inline void stream_apply(T* d, int64_t n, F f) {
  alignas(64) T tmp[64];
  for (int64_t i0 = 0; i0 < n; i0 += 64) {
    const int64_t m = std::min<int64_t>(64, n - i0);
    for (int64_t j = 0; j < m; ++j) tmp[j] = f(i0 + j);
    stream_run(d + i0, tmp, m);
  }
}

// d[i] = f(x[i], v) for the n elements of a block (c0: its first
// coordinate), or f(v, x[i]) when v_first, where v is the one value that
// load L (of storage T, broadcast along the innermost dim: stride 0) has on
// each run of that dim: read once per run instead of filled into a register.
template <class T, class F>
inline void bcast_binary(const Region& r, const LoadRec& L, const int64_t* c0, int64_t n, const T* x, T* d,
                         bool v_first, bool nt, F f) {
  const int nd = r.ndim;
  const T* base = reinterpret_cast<const T*>(L.ptr) + L.offset;
  const int64_t so = nd > 1 ? L.stride[nd - 2] : 0;
  for_tiles(r, c0, n, [&](const int64_t* c, int64_t i0, int64_t rows, int64_t len) {
    const T* p = base + dot(c, L.stride, nd);
    for (int64_t q = 0; q < rows; ++q) {
      const T v = p[q * so];
      const T* xq = x + i0 + q * len;
      T* dq = d + i0 + q * len;
      if (nt && v_first)
        stream_apply<T>(dq, len, [&](int64_t j) { return f(v, xq[j]); });
      else if (nt)
        stream_apply<T>(dq, len, [&](int64_t j) { return f(xq[j], v); });
      else if (v_first)
        for (int64_t j = 0; j < len; ++j) dq[j] = f(v, xq[j]);
      else
        for (int64_t j = 0; j < len; ++j) dq[j] = f(xq[j], v);
    }
  });
}

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

}  // namespace
}  // namespace fg
