#include "program.h"

#include <algorithm>
#include <cstdint>
#include <string>

namespace fg {

Program::Program(const int64_t* desc, int64_t len, const double* c, int64_t nconsts, int compute_,
                 std::vector<int64_t> load_src_, std::vector<int64_t> store_dst_, int64_t nins,
                 int64_t nouts)
    : consts(c, c + nconsts), load_src(std::move(load_src_)), store_dst(std::move(store_dst_)),
      compute(compute_) {
  if (compute != 0 && compute != 1)
    throw DescriptorError("fastgrad program: compute must be 0 (float32) or 1 (float64)");
  region = parse_region(desc, len, consts.data(), nconsts);
  if (load_src.size() != region.loads.size() || store_dst.size() != region.stores.size())
    throw DescriptorError("fastgrad program: one source per load and one destination per store");
  for (int64_t s : load_src)
    if (s < 0 || s >= nins) throw DescriptorError("fastgrad program: load source " + std::to_string(s) + " out of range");
  for (int64_t s : store_dst)
    if (s < 0 || s >= nouts) throw DescriptorError("fastgrad program: store destination " + std::to_string(s) + " out of range");
}

namespace {

// Below this many elements a compiled loop runs on the calling thread (as the interpreter's
// kParallelMin).
constexpr int64_t kJitParallelMin = 32768;

// Byte range [lo, hi) a record with these strides can touch.
struct Span {
  uintptr_t lo, hi;
};
Span span_of(const Region& r, const char* p, int dtype, int64_t offset, const int64_t* st) {
  const int64_t isz = dtype_itemsize(dtype);
  int64_t lo = offset, hi = offset;
  for (int d = 0; d < r.ndim; ++d) {
    const int64_t reach = st[d] * (r.shape[d] - 1);
    (reach < 0 ? lo : hi) += reach;
  }
  return Span{(uintptr_t)p + uintptr_t(lo * isz), (uintptr_t)p + uintptr_t((hi + 1) * isz)};
}
bool overlap(const Span& a, const Span& b) { return a.lo < b.hi && b.lo < a.hi; }

// Whether strides st over dims [d0, d1) of r are row-major contiguous (size-1 dims take any
// stride) or, with zero, all 0.
bool row_major(const Region& r, const int64_t* st, int d0, int d1) {
  int64_t expect = 1;
  for (int d = d1 - 1; d >= d0; --d) {
    if (r.shape[d] != 1 && st[d] != expect) return false;
    expect *= r.shape[d];
  }
  return true;
}
bool zero(const Region& r, const int64_t* st, int d0, int d1) {
  for (int d = d0; d < d1; ++d)
    if (st[d] != 0 && r.shape[d] != 1) return false;
  return true;
}

}  // namespace

bool Program::kernel_fits(int k) const {
  const Region& r = region;
  const int dt = compute == 0 ? DT_F32 : DT_F64;
  if (r.has_reduce || k < 0 || k >= std::max(r.ndim, 1)) return false;
  const int n = r.ndim;
  for (const LoadRec& L : r.loads) {
    if (L.dtype != dt || !L.preds.empty()) return false;
    const bool whole = row_major(r, L.stride, 0, n) || zero(r, L.stride, 0, n);
    // k > 0: also one value per row (0 along the columns), or one row for all rows
    const bool per_row = k > 0 && row_major(r, L.stride, 0, k) && zero(r, L.stride, k, n);
    const bool per_col = k > 0 && zero(r, L.stride, 0, k) && row_major(r, L.stride, k, n);
    if (!whole && !per_row && !per_col) return false;
  }
  for (const StoreRec& S : r.stores)
    if (S.dtype != dt || S.mode != MODE_ASSIGN || !row_major(r, S.stride, 0, n)) return false;
  for (const Instr& I : r.instrs)
    if (I.op == OP_IOTA) return false;
  return true;
}

bool Program::run(Region& r, int nthreads) const {
  auto interpret = [&] {
    run_region_cpu(r, compute, nthreads);
    return false;
  };
  const Kernel k = kernel.load(std::memory_order_acquire);
  if (k == nullptr || r.numel == 0) return interpret();
  // The loop reads every load at its element (row, column) and writes every store at its
  // element: exact only when no store shares memory with a load or another store. The runtime's
  // outputs are fresh tensors; for a caller that passes overlapping buffers the interpreter
  // runs, with its own rules (it is not exact for every overlap either).
  std::vector<char*> ptrs;
  std::vector<Span> loads, stores;
  for (const LoadRec& L : r.loads) {
    loads.push_back(span_of(r, L.ptr, L.dtype, L.offset, L.stride));
    ptrs.push_back(L.ptr + L.offset * dtype_itemsize(L.dtype));
  }
  for (const StoreRec& S : r.stores) {
    const Span sp = span_of(r, S.ptr, S.dtype, 0, S.stride);
    for (const Span& o : loads)
      if (overlap(sp, o)) return interpret();
    for (const Span& o : stores)
      if (overlap(sp, o)) return interpret();
    stores.push_back(sp);
    ptrs.push_back(S.ptr);
  }
  const int sk = split.load(std::memory_order_acquire);
  int64_t n = r.numel, per = 1;  // n items (elements or rows) of `per` elements
  if (sk > 0) {
    n = 1;
    for (int d = 0; d < sk; ++d) n *= r.shape[d];
    per = r.numel / n;
  }
  int nt = 1;
  if (r.numel >= kJitParallelMin)
    nt = (int)std::max<int64_t>(1, std::min<int64_t>({(int64_t)nthreads, r.numel / (kJitParallelMin / 2), n}));
  char* const* pp = ptrs.data();
  if (nt == 1) {
    k(pp, 0, n);
    return true;
  }
  // About four chunks per thread, the same for any thread count; elements in multiples of 64
  // (whole cache lines of floats or doubles).
  int64_t chunk = (n + 4 * nt - 1) / (4 * nt);
  if (per == 1) chunk = (chunk + 63) & ~int64_t(63);
  const int64_t nchunks = (n + chunk - 1) / chunk;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t c = 0; c < nchunks; ++c) k(pp, c * chunk, std::min(n, (c + 1) * chunk));
  return true;
}

Region Program::bind(char* const* ins, char* const* outs) const {
  Region r = region;
  for (size_t i = 0; i < r.loads.size(); ++i) r.loads[i].ptr = ins[load_src[i]];
  for (size_t k = 0; k < r.stores.size(); ++k) r.stores[k].ptr = outs[store_dst[k]];
  return r;
}

}  // namespace fg
