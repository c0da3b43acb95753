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
//    block's contiguous inputs/outputs, so memory traffic overlaps the math;
//  - a load broadcast along the innermost dim (a row sum read back over its
//    row) is read once per run by the binary ops that use it, and a product
//    that only a sum store reads is added up without being written
//    (plan_direct_reads), each saving a pass over the block;
//  - a large output (8 MiB or more) of a program without transcendental ops,
//    and a row group's large final output (vm_cpu_group.h), are written with
//    streaming stores, straight from the instruction that computes it.
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
#include "dtype_convert.h"
#include "op_math.h"
#include "vm.h"
// The interpreter's internal headers, in this order: GCC's code for
// Worker::exec_block depends on the order of definitions in the translation
// unit, and this order gives the same machine code as when all of it was in
// this one file (checked by comparing the object files' disassembly).
#include "vm_cpu_loops.h"   // block/tile walks, loads, predicates, stores, prefetch
#include "vm_cpu_tuning.h"  // thread and block-size constants, is_heavy
#include "vm_cpu_reduce.h"  // reduction rules, segment reductions, row output, combine_outer
#include "vm_cpu_plan.h"    // FastPlan / make_fast_plan (register-pointer fast paths, direct reads)

namespace fg {
namespace {

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

  // Reduces elements [s, s+n) into reducing store k (rows strategy);
  // seg(i, len) is the reduction of values [i, i+len) of the block (a row or
  // part of one).
  template <class Seg>
  void reduce_rows(int64_t k, int64_t s, int64_t n, Seg&& seg) {
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
          for (int64_t q = 0; q < nrows; ++q) {
            base[off] = to_storage<S_>(seg(i + q * R, R));
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
      const double part = seg(i, len);
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

  // v[n]: values of elements [s, s+n) for reducing store k.
  void reduce_store(int64_t k, const T* v, int64_t s, int64_t n) {
    const int mode = r.stores[k].mode;
    reduce_rows(k, s, n, [&](int64_t i, int64_t len) {
      if (mode == MODE_SUM && len < 16) {  // seg_sum's order for len < 16
        double a = 0.0;
        for (int64_t j = 0; j < len; ++j) a += double(v[i + j]);
        return a;
      }
      return seg_reduce(mode, v + i, len);
    });
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

  // Whether instruction i computes straight into a store written with
  // streaming stores (dst_for redirected it this block).
  bool streams(size_t i) const {
    if (fp.stream.empty() || fp.redirect[i] < 0) return false;
    const int k = fp.redirect[i];
    return fp.stream[k] && done[k];
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
      if (fp.enabled && fp.skip[ii]) continue;  // read where it is (plan_direct_reads)
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
          } else if (S.mode != MODE_ASSIGN && fp.enabled && fp.dot[I.a] >= 0) {
            const Instr& M = r.instrs[fp.dot[I.a]];
            const T *x = regp[M.a], *y = regp[M.b];
            reduce_rows(I.a, s, n, [&](int64_t i, int64_t len) { return seg_dot(x + i, y + i, len); });
          } else if (S.mode != MODE_ASSIGN) {
            reduce_store(I.a, v, s, n);
          } else if (!(fp.enabled && done[I.a]) && !fp.stream.empty() && fp.stream[I.a] &&
                     contiguous(fp.store_ck[I.a], fp.store_span[I.a], s, n)) {
            stream_run(reinterpret_cast<T*>(S.ptr) + dot(c0, S.stride, nd), v, n);
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
          // The math ops: one vectorizable loop each, generated from ops.def
          // (and its streaming-store twin, see streams()).
#define FG_CASE_0(E)
#define FG_LOOP(EXPR)                                            \
  if (streams(ii))                                               \
    stream_apply<T>(d, n, [&](int64_t i) { return EXPR; });      \
  else                                                           \
    for (int64_t i = 0; i < n; ++i) d[i] = EXPR;
#define FG_CASE_1(E)                     \
  case OP_##E: {                         \
    const T* x = regp[I.a];              \
    T* d = dst_for(ii, I.dst, c0, s, n); \
    FG_LOOP(fg_##E<T>(x[i]))             \
    break;                               \
  }
#define FG_CASE_2(E)                                                                     \
  case OP_##E: {                                                                         \
    const T* x = regp[I.a];                                                              \
    const T* y = regp[I.b];                                                              \
    T* d = dst_for(ii, I.dst, c0, s, n);                                                 \
    if (fp.enabled && fp.bcast[ii]) {                                                    \
      const bool vf = fp.bcast[ii] == 1;                                                 \
      bcast_binary<T>(r, r.loads[fp.bcast_load[ii]], c0, n, vf ? y : x, d, vf, streams(ii), \
                      [](T a, T b) { return fg_##E<T>(a, b); });                         \
      break;                                                                             \
    }                                                                                    \
    if (fp.enabled && fp.cst[ii]) {                                                      \
      const T v = T(fp.cst_val[ii]);                                                     \
      if (fp.cst[ii] == 1) {                                                             \
        FG_LOOP(fg_##E<T>(v, y[i]))                                                      \
      } else {                                                                           \
        FG_LOOP(fg_##E<T>(x[i], v))                                                      \
      }                                                                                  \
      break;                                                                             \
    }                                                                                    \
    FG_LOOP(fg_##E<T>(x[i], y[i]))                                                       \
    break;                                                                               \
  }
#define FG_CASE_3(E)                        \
  case OP_##E: {                            \
    const T* x = regp[I.a];                 \
    const T* y = regp[I.b];                 \
    const T* z = regp[I.c];                 \
    T* d = dst_for(ii, I.dst, c0, s, n);    \
    FG_LOOP(fg_##E<T>(x[i], y[i], z[i]))    \
    break;                                  \
  }
#define FG_OP(E, N, A) FG_CASE_##A(E)
#include "ops.def"
#undef FG_OP
#undef FG_CASE_0
#undef FG_CASE_1
#undef FG_CASE_2
#undef FG_CASE_3
#undef FG_LOOP
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

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};


template <class T>
void run_typed(const Region& r, int nthreads) {
  const int64_t nregs = std::max<int64_t>(r.nregs, 1);
  const bool heavy = region_heavy(r), streaming = region_streaming(r);
  const int64_t block = block_length(r, sizeof(T), heavy, streaming);
  int nt = 1;
  if (r.numel >= kParallelMin)
    nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, r.numel / (kParallelMin / 2)));

  const size_t ns = r.stores.size();
  const size_t reg_bytes = (size_t)nt * nregs * block * sizeof(T);
  std::unique_ptr<T, FreeDeleter> regs((T*)std::aligned_alloc(64, (reg_bytes + 63) & ~size_t(63)));
  if (!regs) throw std::bad_alloc();
  FastPlan fp = make_fast_plan(r, std::is_same<T, float>::value ? DT_F32 : DT_F64);
  fp.prefetch = heavy && streaming;
  // A large output goes out with streaming stores, as in a row group and a compiled loop: it
  // would not stay in the caches, and a plain store first reads each line it writes. Not in a
  // program with transcendental ops: its short blocks, streamed piece by piece, measured slower.
  for (size_t k = 0; k < r.stores.size() && !heavy; ++k)
    if (large_output(r, r.stores[k])) stream_store(fp, (int)k);
  const bool streamed = !fp.stream.empty();
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
  const bool fixed = fixed_ranges(region_bytes(r));
  auto body = [&](int tid, int tcount) {
    used[tid] = 1;
    StreamFence fence{streamed};
    Worker<T> w{r, fp, block, regs.get() + (size_t)tid * nregs * block, &regp[(size_t)tid * nregs],
                &done[tid * ns], &state[tid * ns],
                &partials[tid * ns * 2], &npartials[tid * ns],
                r.red_outer ? &oacc[(size_t)tid * ns * r.nout] : nullptr};
    if (tcount > 1 && !r.has_reduce && !fixed) {
      // Elementwise from memory: threads take chunks from a shared counter, so
      // a thread that gets less CPU (a busy machine) does less of the work.
      // (Which thread computes an element does not change its value.)
      const int64_t chunk = std::max<int64_t>(block, (r.numel / (tcount * kChunksPerThread)) / block * block);
      for (;;) {
        const int64_t a = next.fetch_add(chunk, std::memory_order_relaxed);
        if (a >= r.numel) break;
        w.run_range(a, std::min(r.numel, a + chunk));
      }
      return;
    }
    // With reductions a thread's range is fixed (deterministic results), and
    // from the caches too (fixed_ranges: each thread keeps its part in its L2).
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

// Row groups string Worker's runs of several regions together chunk by chunk,
// so they come after everything above (see the note at the other includes).
#include "vm_cpu_group.h"

namespace fg {

int64_t run_group_cpu(std::vector<Region>& rs, const std::vector<int>& computes, uint32_t chunk_mask,
                      int nthreads) {
  if (computes.size() != rs.size()) throw DescriptorError("fastgrad row group: one compute type per region");
  return run_group(rs, computes.data(), chunk_mask, std::max(1, nthreads));
}

}  // namespace fg
