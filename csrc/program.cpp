#include "program.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>

#include "region_extents.h"
#include "stream_store.h"

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

// part(i) for each i < n on nt threads: part i on thread i % nt when `fixed` (the same thread
// in every run: fixed_ranges), otherwise taken in turn as threads free up.
template <class Part>
void run_parts(int nt, int64_t n, bool fixed, const Part& part) {
  if (fixed) {
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int64_t i = 0; i < n; ++i) part(i);
  } else {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) part(i);
  }
}

// Below this many elements a compiled loop runs on the calling thread (as the interpreter's
// kParallelMin).
constexpr int64_t kJitParallelMin = 32768;
// Bytes of the largest member's rows in one chunk of a row group run through loops: about
// one softmax row of 256 floats with its gradient and result, so the next member reads it from
// L1 (measured at 4e6 floats: 4-16 KB chunks 0.9-1.05x torch, 64 KB 0.8-0.9x, 256 KB 0.8x).
constexpr int64_t kJitGroupChunkBytes = 4 * 1024;
// Column sums through a loop (Program::run_columns): at most this many chunks of rows, each of
// at least this many elements and, so that the chunks' rows of doubles stay a quarter of the
// data's bytes or less, at least 8 rows.
constexpr int64_t kColumnChunks = 16, kColumnChunkElems = 16384;

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

bool Program::load_kinds(int k, std::string& kinds) const {
  const Region& r = region;
  const int dt = compute == 0 ? DT_F32 : DT_F64;
  const int n = r.ndim;
  kinds.clear();
  if (k < 0 || k >= std::max(n, 1)) return false;
  for (const LoadRec& L : r.loads) {
    if (!L.preds.empty()) return false;
    if (zero(r, L.stride, 0, n)) {
      // One value, of any dtype: the loop converts it once (a Python number PyTorch saved as
      // a 0-d int64 or float64 tensor, as in `x * 3`, would otherwise keep a float32 region
      // in the interpreter).
      kinds += 's';
      continue;
    }
    if (L.dtype != dt) return false;
    if (row_major(r, L.stride, 0, n))
      kinds += 'c';
    else if (k > 0 && row_major(r, L.stride, 0, k) && zero(r, L.stride, k, n))
      kinds += 'r';  // one value per row (0 along the columns)
    else if (k > 0 && zero(r, L.stride, 0, k) && row_major(r, L.stride, k, n))
      kinds += 'k';  // one row for all rows
    else
      return false;
  }
  return true;
}

bool Program::column_sums(int k) const {
  const Region& r = region;
  if (k <= 0 || k >= r.ndim) return false;
  bool any = false;
  for (const StoreRec& S : r.stores) {
    if (S.mode == MODE_ASSIGN) continue;
    if (S.mode != MODE_SUM || !zero(r, S.stride, 0, k) || !row_major(r, S.stride, k, r.ndim)) return false;
    any = true;
  }
  return any;
}

bool Program::kernel_fits(int k) const {
  const Region& r = region;
  const int dt = compute == 0 ? DT_F32 : DT_F64;
  const int n = r.ndim;
  std::string kinds;
  if (!load_kinds(k, kinds)) return false;
  int64_t rows = 1;
  for (int d = 0; d < k; ++d) rows *= r.shape[d];
  const bool columns = column_sums(k);
  for (const StoreRec& S : r.stores) {
    if (S.dtype != dt) return false;
    if (S.mode == MODE_ASSIGN) {
      if (!row_major(r, S.stride, 0, n)) return false;
    } else if (columns) {
      if (r.numel == 0) return false;  // (column_sums checked the strides)
    } else if (S.mode == MODE_SUM && k > 0) {
      // one sum per row, over a row of at most kJitMaxRowSum elements
      if (!row_major(r, S.stride, 0, k) || !zero(r, S.stride, k, n) || r.numel == 0 ||
          r.numel / rows > kJitMaxRowSum)
        return false;
    } else {
      return false;  // max/min (their NaN and tie rules stay the interpreter's), or k == 0
    }
  }
  for (const Instr& I : r.instrs)
    if (I.op == OP_IOTA) return false;
  return true;
}

bool Program::loop_pointers(const Region& r, std::vector<char*>& ptrs) const {
  // The loop reads every load at its element (row, column) and writes every store at its
  // element (or row): exact only when no store shares memory with a load or another store.
  // The runtime's outputs are fresh tensors; for a caller that passes overlapping buffers the
  // interpreter runs, with its own rules (it is not exact for every overlap either).
  if (!stores_disjoint(r)) return false;
  ptrs.clear();
  for (const LoadRec& L : r.loads) ptrs.push_back(L.ptr + L.offset * dtype_itemsize(L.dtype));
  for (const StoreRec& S : r.stores) ptrs.push_back(S.ptr);
  return true;
}

bool Program::streams(const Region& r) const {
  if (stream_kernel.load(std::memory_order_acquire) == nullptr) return false;
  // The loop stores whole lines (kStreamLine bytes) from the start of each row (split > 0) or
  // of each chunk of elements (run() cuts them at multiples of 64 elements), so each output
  // must start on a line and (rows) its rows be whole lines.
  const int sk = split.load(std::memory_order_acquire);
  int64_t per = 1;
  for (int d = sk; d < r.ndim; ++d) per *= r.shape[d];
  bool any = false;
  for (const StoreRec& S : r.stores) {
    if (S.mode != MODE_ASSIGN) continue;
    if (!large_output(r, S) || reinterpret_cast<uintptr_t>(S.ptr) % kStreamLine != 0 ||
        (sk > 0 && per * dtype_itemsize(S.dtype) % kStreamLine != 0))
      return false;
    any = true;
  }
  return any;
}

bool Program::run(Region& r, int nthreads) const {
  Kernel k = kernel.load(std::memory_order_acquire);
  std::vector<char*> ptrs;
  if (k == nullptr || r.numel == 0 || !loop_pointers(r, ptrs)) {
    run_region_cpu(r, compute, nthreads);
    return false;
  }
  const int sk = split.load(std::memory_order_acquire);
  int64_t n = r.numel, per = 1;  // n items (elements or rows) of `per` elements
  if (sk > 0) {
    n = 1;
    for (int d = 0; d < sk; ++d) n *= r.shape[d];
    per = r.numel / n;
  }
  if (sk > 0 && column_sums(sk)) {
    run_columns(k, ptrs, n, per, nthreads);
    return true;
  }
  bool stream = streams(r);
  int trial = -1;  // the kind this run times (Program::stream_pick), or -1
  if (stream) {
    const int pick = stream_pick.load(std::memory_order_acquire);
    if (pick == 0) trial = next_trial();
    stream = pick > 0 || trial == 1;
  }
  if (stream) k = stream_kernel.load(std::memory_order_acquire);
  int nt = 1;
  if (r.numel >= kJitParallelMin)
    nt = (int)std::max<int64_t>(1, std::min<int64_t>({(int64_t)nthreads, r.numel / (kJitParallelMin / 2), n}));
  char* const* pp = ptrs.data();
  // (the clock is read only for a timed run: every other run of a region skips it)
  const auto t0 = trial >= 0 ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  if (nt == 1) {
    k(pp, 0, n);
    if (stream) stream_fence();
  } else {
    // One contiguous range per thread, the same in every run (fixed_ranges), or about four
    // chunks per thread, the same for any thread count, taken in turn; elements in multiples of
    // 64 (whole cache lines of floats or doubles).
    const bool fixed = fixed_ranges(region_bytes(r));
    int64_t chunk = fixed ? (n + nt - 1) / nt : (n + 4 * nt - 1) / (4 * nt);
    if (per == 1) chunk = (chunk + 63) & ~int64_t(63);
    const int64_t nchunks = (n + chunk - 1) / chunk;
    auto part = [&](int64_t c) {
      k(pp, c * chunk, std::min(n, (c + 1) * chunk));
      if (stream) stream_fence();  // (streamed lines are seen by other threads after it)
    };
    run_parts(nt, nchunks, fixed, part);
  }
  if (trial >= 0)
    record_trial(trial, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() /
                            double(r.numel));
  return true;
}

int Program::next_trial() const {
  std::lock_guard<std::mutex> lock(trial_mu_);
  return trials_[1] <= trials_[0] ? 1 : 0;  // streaming first, then alternately
}

void Program::record_trial(int kind, double seconds_per_element) const {
  std::lock_guard<std::mutex> lock(trial_mu_);
  if (stream_pick.load(std::memory_order_relaxed) != 0) return;  // (decided meanwhile)
  double& best = best_[kind];
  best = trials_[kind]++ == 0 ? seconds_per_element : std::min(best, seconds_per_element);
  if (trials_[0] >= kStreamTrials && trials_[1] >= kStreamTrials)
    stream_pick.store(best_[1] <= best_[0] ? 1 : -1, std::memory_order_release);
}

void Program::reset_stream_pick() {
  std::lock_guard<std::mutex> lock(trial_mu_);
  trials_[0] = trials_[1] = 0;
  stream_pick.store(0, std::memory_order_release);
}

void Program::run_columns(Kernel k, const std::vector<char*>& ptrs, int64_t rows, int64_t cols,
                          int nthreads) const {
  // Chunks of rows fixed by the shape alone (so the sums do not depend on the thread count);
  // each adds into its own rows of doubles, which are then added in chunk order and rounded
  // once into the stores.
  const Region& r = region;
  const int64_t nchunks =
      std::max<int64_t>(1, std::min<int64_t>({kColumnChunks, rows / 8, r.numel / kColumnChunkElems}));
  std::vector<size_t> sums;
  for (size_t s = 0; s < r.stores.size(); ++s)
    if (r.stores[s].mode == MODE_SUM) sums.push_back(s);
  const size_t nl = r.loads.size(), ns = sums.size();
  std::vector<double> part(size_t(nchunks) * ns * size_t(cols), 0.0);
  std::vector<std::vector<char*>> cp(size_t(nchunks), ptrs);
  for (int64_t c = 0; c < nchunks; ++c)
    for (size_t i = 0; i < ns; ++i)
      cp[c][nl + sums[i]] = reinterpret_cast<char*>(part.data() + (size_t(c) * ns + i) * size_t(cols));
  const int nt = r.numel >= kJitParallelMin ? (int)std::min<int64_t>(nthreads, nchunks) : 1;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1)
  for (int64_t c = 0; c < nchunks; ++c) k(cp[c].data(), rows * c / nchunks, rows * (c + 1) / nchunks);
  for (size_t i = 0; i < ns; ++i) {
    char* out = ptrs[nl + sums[i]];
    for (int64_t j = 0; j < cols; ++j) {
      double a = 0;
      for (int64_t c = 0; c < nchunks; ++c) a += part[(size_t(c) * ns + i) * size_t(cols) + size_t(j)];
      if (compute == 0)
        reinterpret_cast<float*>(out)[j] = static_cast<float>(a);
      else
        reinterpret_cast<double*>(out)[j] = a;
    }
  }
}

int64_t run_group_loops(const std::vector<const Program*>& ps, std::vector<Region>& rs, uint32_t mask,
                        int nthreads) {
  // mask must be dims 0..k-1, every member compiled with split k over the same rows
  int k = 0;
  while (k < kMaxNdim && (mask >> k) & 1u) ++k;
  if (k == 0 || mask != (uint32_t(1) << k) - 1 || ps.empty()) return -1;
  const size_t nm = ps.size();
  std::vector<Program::Kernel> ks(nm);
  std::vector<std::vector<char*>> ptrs(nm);
  bool stream = false;
  int64_t rows = -1, numel = 0;
  double row_bytes = 0;
  for (size_t m = 0; m < nm; ++m) {
    const Region& r = rs[m];
    ks[m] = ps[m]->kernel.load(std::memory_order_acquire);
    if (ks[m] == nullptr || ps[m]->split.load(std::memory_order_acquire) != k || r.ndim < k ||
        r.numel == 0 || ps[m]->column_sums(k) || !ps[m]->loop_pointers(r, ptrs[m]))
      return -1;
    int64_t rm = 1;
    for (int d = 0; d < k; ++d) rm *= r.shape[d];
    if (rows >= 0 && rm != rows) return -1;
    rows = rm;
    numel = std::max(numel, r.numel);
    row_bytes = std::max(row_bytes, double(r.numel / rows) * double(item_bytes(r)));
  }
  // A member whose large outputs no later member reads streams them (softmax's result: its
  // rows are still in cache for nothing, and plain stores would first read each line).
  for (size_t m = 0; m < nm; ++m) {
    if (!ps[m]->streams(rs[m])) continue;
    bool later = false;
    for (const StoreRec& S : rs[m].stores)
      later = later || (S.mode == MODE_ASSIGN && read_later(rs, m, S));
    if (!later) {
      ks[m] = ps[m]->stream_kernel.load(std::memory_order_acquire);
      stream = true;
    }
  }
  // Chunks of rows whose data stay in L2 from one member to the next (as the interpreter's
  // row groups, vm_cpu_tuning.h), the same for any thread count.
  const int64_t unit = std::max<int64_t>(1, int64_t(double(kJitGroupChunkBytes) / std::max(row_bytes, 1.0)));
  const int64_t nchunks = (rows + unit - 1) / unit;
  int nt = numel >= kJitParallelMin ? (int)std::min<int64_t>(nthreads, nchunks) : 1;
  auto chunk = [&](int64_t c) {
    const int64_t r0 = c * unit, r1 = std::min(rows, r0 + unit);
    for (size_t m = 0; m < nm; ++m) ks[m](ptrs[m].data(), r0, r1);
  };
  if (nt <= 1) {
    for (int64_t c = 0; c < nchunks; ++c) chunk(c);
    if (stream) stream_fence();
  } else {
    // Each thread walks consecutive chunks (one sequential stream per input, which the
    // hardware prefetcher follows): one fixed span per thread (fixed_ranges), or 8 spans per
    // thread taken in order as threads free up.
    const bool fixed = fixed_ranges(double(rows) * row_bytes);
    const int64_t nspan = fixed ? nt : std::min<int64_t>(int64_t(nt) * 8, nchunks);
    auto span = [&](int64_t sp) {
      for (int64_t c = nchunks * sp / nspan, c1 = nchunks * (sp + 1) / nspan; c < c1; ++c) chunk(c);
      if (stream) stream_fence();
    };
    run_parts(nt, nspan, fixed, span);
  }
  return nchunks;
}

Region Program::bind(char* const* ins, char* const* outs) const {
  Region r = region;
  for (size_t i = 0; i < r.loads.size(); ++i) r.loads[i].ptr = ins[load_src[i]];
  for (size_t k = 0; k < r.stores.size(); ++k) r.stores[k].ptr = outs[store_dst[k]];
  return r;
}

}  // namespace fg
