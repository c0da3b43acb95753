// The memory a parsed region's records may touch, for the checks that decide how a region or
// a row group may run: whether its stores are disjoint from its loads and from each other (a
// fused loop or a register fast path is exact only then), and whether a row group member's
// output is read by a later member (then it must not go out with streaming stores), and
// whether an output is large enough to stream at all. The interpreter (vm_cpu.cpp,
// vm_cpu_plan.h, vm_cpu_group.h) and the compiled loops (program.cpp) ask the same questions
// here.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "stream_policy.h"  // stream_min_bytes
#include "vm.h"

namespace fg {

// Byte range [lo, hi) a record may touch (conservative); empty if it touches nothing.
struct Extent {
  uintptr_t lo = 0, hi = 0;
};

// ptr, dtype, offset, st[r.ndim]: a record's; preds: a load's predicates (nullptr: none).
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
inline Extent extent_of(const Region& r, const LoadRec& L) {
  return extent_of(r, L.ptr, L.dtype, L.offset, L.stride, &L.preds);
}
inline Extent extent_of(const Region& r, const StoreRec& S) {
  return extent_of(r, S.ptr, S.dtype, 0, S.stride, nullptr);
}

inline bool overlap(const Extent& a, const Extent& b) {
  return a.lo < a.hi && b.lo < b.hi && a.lo < b.hi && b.lo < a.hi;
}

// True when no store of r may overlap a load or another store.
inline bool stores_disjoint(const Region& r) {
  std::vector<Extent> loads, stores;
  for (const LoadRec& L : r.loads) loads.push_back(extent_of(r, L));
  for (const StoreRec& S : r.stores) {
    const Extent e = extent_of(r, S);
    for (const Extent& o : loads)
      if (overlap(e, o)) return false;
    for (const Extent& o : stores)
      if (overlap(e, o)) return false;
    stores.push_back(e);
  }
  return true;
}

// Bytes r reads and writes per element of its iteration space (a broadcast load counted in
// full), and in one pass over its elements.
inline int64_t item_bytes(const Region& r) {
  int64_t item = 0;
  for (const LoadRec& L : r.loads) item += dtype_itemsize(L.dtype);
  for (const StoreRec& S : r.stores) item += dtype_itemsize(S.dtype);
  return item;
}
inline double region_bytes(const Region& r) { return double(r.numel) * double(item_bytes(r)); }

// Whether the threads of a pass over `bytes` each keep one fixed, contiguous part of it, the
// same in every run, rather than take chunks in turn. Below stream_min_bytes() the data can
// stay in the caches from one region and one call to the next, and a thread that computes the
// same part each time finds it in its own core's L2 (on 2 vCPUs of a Xeon, VJPs of 1e5-4e5
// floats took 5-35% less time so: docs/performance-history-nov27.md, "Threads keep their part
// of the data").
// Above it the data come from memory either way, and chunks taken in turn let a thread that
// gets less CPU (a busy machine) do less of the work.
inline bool fixed_ranges(double bytes) { return bytes < double(stream_min_bytes()); }

// Whether store S of r is an elementwise output of stream_min_bytes() or more: one that would not
// stay in the caches for whatever reads it next, so streaming stores write it.
inline bool large_output(const Region& r, const StoreRec& S) {
  return S.mode == MODE_ASSIGN && double(r.numel) * dtype_itemsize(S.dtype) >= double(stream_min_bytes());
}

// Whether a member after rs[m] of a row group may read what store S of rs[m] writes.
inline bool read_later(const std::vector<Region>& rs, size_t m, const StoreRec& S) {
  const Extent out = extent_of(rs[m], S);
  for (size_t m2 = m + 1; m2 < rs.size(); ++m2)
    for (const LoadRec& L : rs[m2].loads)
      if (overlap(out, extent_of(rs[m2], L))) return true;
  return false;
}

}  // namespace fg
