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

// Byte range [lo, hi) a record touches when it is contiguous over n elements (step 1) or reads
// one element (step 0).
struct Span {
  uintptr_t lo, hi;
};
Span span_of(const char* p, int dtype, int64_t offset, bool single, int64_t n) {
  const int64_t isz = dtype_itemsize(dtype);
  const uintptr_t lo = (uintptr_t)p + uintptr_t(offset * isz);
  return Span{lo, lo + uintptr_t((single ? 1 : n) * isz)};
}
bool overlap(const Span& a, const Span& b) { return a.lo < b.hi && b.lo < a.hi; }

}  // namespace

bool Program::kernel_fits() const {
  const Region& r = region;
  const int dt = compute == 0 ? DT_F32 : DT_F64;
  if (r.has_reduce) return false;
  // Row-major strides of the iteration space (dims of size 1 take any stride).
  auto contiguous = [&](const int64_t* st) {
    int64_t expect = 1;
    for (int d = r.ndim - 1; d >= 0; --d) {
      if (r.shape[d] != 1 && st[d] != expect) return false;
      expect *= r.shape[d];
    }
    return true;
  };
  for (const LoadRec& L : r.loads) {
    bool zero = true;
    for (int d = 0; d < r.ndim; ++d) zero = zero && L.stride[d] == 0;
    if (L.dtype != dt || !L.preds.empty() || !(zero || contiguous(L.stride))) return false;
  }
  for (const StoreRec& S : r.stores)
    if (S.dtype != dt || S.mode != MODE_ASSIGN || !contiguous(S.stride)) return false;
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
  // The kernel reads every load at element i (or its single value) and writes every store at
  // element i: exact only when no store shares memory with a load or another store (the
  // runtime's outputs are fresh tensors; the interpreter handles the general case).
  std::vector<char*> ptrs;
  std::vector<Span> loads, stores;
  for (const LoadRec& L : r.loads) {
    bool single = true;
    for (int d = 0; d < r.ndim; ++d) single = single && L.stride[d] == 0;
    loads.push_back(span_of(L.ptr, L.dtype, L.offset, single, r.numel));
    ptrs.push_back(L.ptr + L.offset * dtype_itemsize(L.dtype));
  }
  for (const StoreRec& S : r.stores) {
    const Span sp = span_of(S.ptr, S.dtype, 0, false, r.numel);
    for (const Span& o : loads)
      if (overlap(sp, o)) return interpret();
    for (const Span& o : stores)
      if (overlap(sp, o)) return interpret();
    stores.push_back(sp);
    ptrs.push_back(S.ptr);
  }
  const int64_t n = r.numel;
  int nt = 1;
  if (n >= kJitParallelMin) nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, n / (kJitParallelMin / 2)));
  char* const* pp = ptrs.data();
  if (nt == 1) {
    k(pp, 0, n);
    return true;
  }
  // Chunks of whole cache lines (16 floats / 8 doubles), the same for any thread count.
  const int64_t chunk = ((n + 4 * nt - 1) / (4 * nt) + 63) & ~int64_t(63);
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
