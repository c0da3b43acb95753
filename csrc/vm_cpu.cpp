// CPU evaluator of fused regions: a block interpreter in the style of numexpr.
//
// Registers are arrays of `block` values of the compute type T. Each
// instruction is one tight loop over a block (vectorizable, and with glibc's
// vector math for exp/sin/... because CMake compiles this one file with
// -D__FAST_MATH__ -fno-math-errno, which declares libmvec's variants without
// -ffast-math's finite-math assumptions). Each thread owns one contiguous
// range of the (normalised) iteration space and walks it block by block.
//
// Reductions: normalize_region() puts the reduced dims innermost, so each
// output element of a reducing store ("row") is a contiguous range of
// row_len linear indices. A thread finishes rows that lie wholly inside its
// range and writes them directly; rows cut by a range boundary leave
// per-thread partial accumulators that are combined afterwards in thread
// order, so results are deterministic for a given thread count. Sums
// accumulate in double even when T is float.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "dtype_convert.h"
#include "op_math.h"
#include "vm.h"

namespace fg {
namespace {

// Below this many elements a region runs on the calling thread only: the
// cost of waking a thread team exceeds the work.
constexpr int64_t kParallelMin = 32768;
// Register file budget per thread; the block length follows from it so that
// the live registers of a program stay in L1/L2.
constexpr int64_t kRegBytes = 64 * 1024;

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

inline bool pred_eval(const Pred& P, int64_t coord, int64_t* extra) {
  const int64_t t = P.mul * coord + P.add;
  if (t < 0 || t % P.div != 0) return false;
  const int64_t q = t / P.div;
  if (q >= P.len) return false;
  *extra += q * P.stride;
  return true;
}

// Predicated load of one run (c: run coordinates; out[len]). Invalid
// elements are 0 and their address is never formed or read.
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

template <class T>
void do_load(const Region& r, const LoadRec& L, const int64_t* c0, int64_t n, T* out) {
  const int nd = r.ndim;
  with_storage(L.dtype, [&](auto tag) {
    using S = FG_STORAGE_T(tag);
    if (L.preds.empty()) {
      const S* base = reinterpret_cast<const S*>(L.ptr);
      for_runs(r, c0, n, [&](const int64_t* c, int64_t i, int64_t len) {
        load_run<S, T>(base + L.offset + dot(c, L.stride, nd), L.stride[nd - 1], len, out + i);
      });
    } else {
      for_runs(r, c0, n, [&](const int64_t* c, int64_t i, int64_t len) {
        load_pred_run<S, T>(L, c, nd, len, out + i);
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

// Sum of x[n] in double, 8 independent lanes so the loop vectorizes without
// reassociation flags (fixed order: deterministic).
template <class T>
double seg_sum(const T* x, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += double(x[i + j]);
  double s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
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

// Writes a finished row (output element number `row` over the outer dims).
void write_row(const Region& r, const StoreRec& S, int64_t row, double acc) {
  int64_t off = 0, q = row;
  for (int d = r.ndim - r.nred - 1; d >= 0; --d) {
    off += (q % r.shape[d]) * S.stride[d];
    q /= r.shape[d];
  }
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

// Per-thread interpreter over one range of the iteration space.
template <class T>
struct Worker {
  const Region& r;
  int64_t block;
  T* regs;                // [nregs][block]
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
      const int64_t row = pos / R, row_end = (row + 1) * R;
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
    const int64_t os = r.ostride[nd - 1];
    for_runs(r, c0, n, [&](const int64_t* c, int64_t i0, int64_t len) {
      double* a = acc + dot(c, r.ostride, nd);
      const T* x = v + i0;
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
    });
  }

  void exec_block(int64_t s, int64_t n) {
    const int nd = r.ndim;
    int64_t c0[kMaxNdim];
    int64_t lin = s;
    for (int d = nd - 1; d >= 0; --d) {
      c0[d] = lin % r.shape[d];
      lin /= r.shape[d];
    }
    for (const Instr& I : r.instrs) {
      switch (I.op) {
        case OP_LOAD:
          do_load<T>(r, r.loads[I.a], c0, n, reg(I.dst));
          break;
        case OP_CONST: {
          T* d = reg(I.dst);
          const T v = T(r.consts[I.a]);
          for (int64_t i = 0; i < n; ++i) d[i] = v;
          break;
        }
        case OP_IOTA: {
          T* d = reg(I.dst);
          const int dim = (int)I.a;
          const double scale = r.consts[I.b], shift = r.consts[I.c];
          for_runs(r, c0, n, [&](const int64_t* c, int64_t i0, int64_t len) {
            if (dim == nd - 1) {
              for (int64_t j = 0; j < len; ++j) d[i0 + j] = T(scale * double(c[dim] + j) + shift);
            } else {
              const T v = T(scale * double(c[dim]) + shift);
              for (int64_t j = 0; j < len; ++j) d[i0 + j] = v;
            }
          });
          break;
        }
        case OP_STORE: {
          const StoreRec& S = r.stores[I.a];
          const T* v = reg(I.b);
          if (S.mode != MODE_ASSIGN && r.red_outer) {
            reduce_store_outer(I.a, v, c0, n);
          } else if (S.mode != MODE_ASSIGN) {
            reduce_store(I.a, v, s, n);
          } else {
            with_storage(S.dtype, [&](auto tag) {
              using S_ = FG_STORAGE_T(tag);
              S_* base = reinterpret_cast<S_*>(S.ptr);
              for_runs(r, c0, n, [&](const int64_t* c, int64_t i0, int64_t len) {
                store_run<S_, T>(base + dot(c, S.stride, nd), S.stride[nd - 1], len, v + i0);
              });
            });
          }
          break;
        }
          // The math ops: one vectorizable loop each, generated from ops.def.
#define FG_CASE_0(E)
#define FG_CASE_1(E)                                          \
  case OP_##E: {                                              \
    T* d = reg(I.dst);                                        \
    const T* x = reg(I.a);                                    \
    for (int64_t i = 0; i < n; ++i) d[i] = fg_##E<T>(x[i]);  \
    break;                                                    \
  }
#define FG_CASE_2(E)                                                   \
  case OP_##E: {                                                       \
    T* d = reg(I.dst);                                                 \
    const T* x = reg(I.a);                                             \
    const T* y = reg(I.b);                                             \
    for (int64_t i = 0; i < n; ++i) d[i] = fg_##E<T>(x[i], y[i]);     \
    break;                                                             \
  }
#define FG_CASE_3(E)                                                          \
  case OP_##E: {                                                              \
    T* d = reg(I.dst);                                                        \
    const T* x = reg(I.a);                                                    \
    const T* y = reg(I.b);                                                    \
    const T* z = reg(I.c);                                                    \
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

template <class T>
void run_typed(const Region& r, int nthreads) {
  const int64_t nregs = std::max<int64_t>(r.nregs, 1);
  int64_t block = kRegBytes / (nregs * (int64_t)sizeof(T));
  block = std::max<int64_t>(64, std::min<int64_t>(1024, block)) & ~int64_t(15);
  int nt = 1;
  if (r.numel >= kParallelMin)
    nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, r.numel / (kParallelMin / 2)));

  const size_t ns = r.stores.size();
  const size_t reg_bytes = (size_t)nt * nregs * block * sizeof(T);
  std::unique_ptr<T, FreeDeleter> regs((T*)std::aligned_alloc(64, (reg_bytes + 63) & ~size_t(63)));
  if (!regs) throw std::bad_alloc();
  std::vector<RowState> state(nt * ns + 1);
  std::vector<RowPartial> partials(nt * ns * 2 + 1);
  std::vector<int> npartials(nt * ns + 1, 0);
  // Outer strategy: per-thread accumulators, [nt][nstores][nout] (slots of
  // assign stores are left unused, which keeps the indexing trivial).
  std::vector<double> oacc(r.red_outer ? (size_t)nt * ns * r.nout : 0);
  std::vector<char> used(nt, 0);

  auto body = [&](int tid, int tcount) {
    used[tid] = 1;
    Worker<T> w{r, block, regs.get() + (size_t)tid * nregs * block, &state[tid * ns],
                &partials[tid * ns * 2], &npartials[tid * ns],
                r.red_outer ? &oacc[(size_t)tid * ns * r.nout] : nullptr};
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
