// The register-pointer fast paths' plan for the CPU interpreter (vm_cpu.cpp):
// which loads can be read in place and which instruction results can be
// computed straight into an output, decided once per region, and off when
// a store may overlap a load or another store (byte extents of records).
//
// Internal to the CPU VM: included only by vm_cpu.cpp (one translation unit,
// its compile flags; hence the anonymous namespace).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>
#include "vm.h"

namespace fg {
namespace {

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

}  // namespace
}  // namespace fg
