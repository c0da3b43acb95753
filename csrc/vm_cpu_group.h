// Row groups for the CPU interpreter (vm_cpu.cpp): several regions run chunk
// by chunk -- one chunk of rows through every region of the group before the
// next chunk -- so that what an earlier region read, and the small results it
// wrote, are still in cache when a later region reads them (softmax's
// backward: a row sum of g*y, then an elementwise pass over the same rows of
// y and g). vm.h (run_group_cpu) states what the caller guarantees.
//
// The chunk dims are the leading dims 0..k-1 of every region ("rows" are
// their coordinates, row-major). normalize_region keeps them outermost and in
// order (they are not reduced; the row strategy only moves reduced dims
// inwards), so row q of region m is the linear range [q*inner_m,
// (q+1)*inner_m) of its normalised iteration space, however its dims merged:
// a chunk is a range of linear indices per region, run by the same Worker
// code as a whole region. Threads take spans of consecutive rows and walk
// each chunk by chunk, so their reads stay sequential streams (what the
// hardware prefetcher follows), and each row of a reduction is reduced by
// one thread in one order: results do not depend on the thread count.
//
// On top of the interleaving: a large output (stream_policy.h, stream_min_bytes)
// that no later member reads is written with streaming stores
// (plan_streaming_stores), and later members
// get the block lengths of data in cache.
//
// Internal to the CPU VM: included only by vm_cpu.cpp, after Worker and
// run_typed (one translation unit, its compile flags; hence the anonymous
// namespace).
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "region_extents.h"
#include "vm.h"
#include "vm_cpu_plan.h"
#include "vm_cpu_reduce.h"
#include "vm_cpu_tuning.h"

namespace fg {
namespace {

// A normalised region of a group and what its Workers share.
struct GroupMember {
  Region* r = nullptr;
  int compute = 0;        // 0 float32, 1 float64
  FastPlan fp;
  int64_t block = 0;
  int64_t inner = 0;      // linear elements per row
};

// One thread's state for one member: registers and reduction state.
struct MemberScratch {
  std::unique_ptr<char, FreeDeleter> regs;  // [nregs * block] values of the compute type
  std::vector<const float*> regp_f;         // [nregs] (float32 members)
  std::vector<const double*> regp_d;        // [nregs] (float64 members)
  std::vector<char> done;                   // [nstores]
  std::vector<RowState> state;              // [nstores]
  std::vector<RowPartial> partials;         // [nstores][2]
  std::vector<int> npartials;               // [nstores]
};

// Runs linear indices [a, b) of member m (whole rows, so no row is cut).
template <class T>
void run_rows(const GroupMember& m, MemberScratch& s, int64_t a, int64_t b) {
  const T** regp;
  if constexpr (std::is_same<T, float>::value)
    regp = s.regp_f.data();
  else
    regp = s.regp_d.data();
  Worker<T> w{*m.r, m.fp, m.block, reinterpret_cast<T*>(s.regs.get()), regp, s.done.data(), s.state.data(),
              s.partials.data(), s.npartials.data(), nullptr};
  w.run_range(a, b);
}

// The number k of leading dims that can be chunk dims of every region: in
// `mask`, present in every region with the same size, and reduced by no store.
int leading_chunk_dims(const std::vector<Region>& rs, uint32_t mask) {
  int k = 0;
  for (; k < kMaxNdim && (mask >> k & 1); ++k) {
    bool ok = true;
    for (const Region& r : rs) {
      ok = ok && k < r.ndim && r.shape[k] == rs[0].shape[k];
      for (size_t i = 0; ok && i < r.stores.size(); ++i)
        ok = r.stores[i].mode == MODE_ASSIGN || r.stores[i].stride[k] != 0 || r.shape[k] == 1;
    }
    if (!ok) break;
  }
  return k;
}

// A large output that no later member reads goes out with streaming stores:
// it would not stay in cache anyway, and plain stores would first read each
// line and evict the rows that the next member is about to read.
void plan_streaming_stores(const std::vector<Region>& rs, std::vector<GroupMember>& ms) {
  for (size_t m = 0; m < rs.size(); ++m) {
    const Region& r = rs[m];
    for (size_t k = 0; k < r.stores.size(); ++k) {
      const StoreRec& S = r.stores[k];
      if (large_output(r, S) && !read_later(rs, m, S)) stream_store(ms[m].fp, (int)k);
    }
  }
}

// Returns the number of chunks it ran, 0 when the regions ran one after another.
int64_t run_group(std::vector<Region>& rs, const int* computes, uint32_t mask, int nthreads) {
  const size_t nm = rs.size();
  const int k = nm ? leading_chunk_dims(rs, mask) : 0;
  int64_t rows = 1, max_numel = 0;
  for (int d = 0; d < k; ++d) rows *= rs[0].shape[d];
  double bytes = 0, max_bytes = 0;  // all members', the largest member's
  bool chunked = k > 0 && rows > 1;
  for (size_t m = 0; m < nm; ++m) {
    max_numel = std::max(max_numel, rs[m].numel);
    bytes += region_bytes(rs[m]);
    max_bytes = std::max(max_bytes, region_bytes(rs[m]));
    chunked = chunked && rs[m].numel > 0;
  }
  // Data that fit in one chunk stay in cache from one pass to the next anyway.
  if (!chunked || bytes <= double(kGroupChunkBytes)) {
    for (size_t m = 0; m < nm; ++m) run_region_cpu(rs[m], computes[m], nthreads);
    return 0;
  }
  std::vector<GroupMember> ms(nm);
  double row_bytes = 0;  // of the largest member: sets how many rows a chunk holds
  for (size_t m = 0; m < nm; ++m) {
    GroupMember& G = ms[m];
    G.r = &rs[m];
    G.compute = computes[m];
    G.inner = rs[m].numel / rows;
    row_bytes = std::max(row_bytes, double(G.inner) * double(item_bytes(rs[m])));
    // Later members find most of their inputs in cache, read there by an
    // earlier member: they get the blocks of cached data (see block_length).
    const bool heavy = region_heavy(rs[m]), streaming = m == 0 && region_streaming(rs[m]);
    normalize_region(rs[m]);
    G.fp = make_fast_plan(rs[m], G.compute ? DT_F64 : DT_F32);
    G.fp.prefetch = heavy && streaming;
    G.block = block_length(rs[m], G.compute ? 8 : 4, heavy, streaming);
    // The outer strategy writes its results only when the whole region is done.
    chunked = chunked && !rs[m].red_outer;
  }
  if (!chunked || row_bytes > double(kGroupMaxSliceBytes)) {  // normalised already: run_typed
    for (size_t m = 0; m < nm; ++m) {
      if (computes[m] == 0)
        run_typed<float>(rs[m], nthreads);
      else
        run_typed<double>(rs[m], nthreads);
    }
    return 0;
  }
  plan_streaming_stores(rs, ms);
  const int64_t unit = std::max<int64_t>(1, int64_t(double(kGroupChunkBytes) / std::max(row_bytes, 1.0)));
  int nt = max_numel >= kParallelMin ? nthreads : 1;
  nt = (int)std::min<int64_t>(nt, rows);

  // Everything is allocated here, so nothing throws inside the parallel region.
  std::vector<MemberScratch> scratch(nt * nm);
  for (int t = 0; t < nt; ++t)
    for (size_t m = 0; m < nm; ++m) {
      MemberScratch& s = scratch[t * nm + m];
      const Region& r = rs[m];
      const int64_t nregs = std::max<int64_t>(r.nregs, 1), ns = (int64_t)r.stores.size() + 1;
      const size_t bytes = size_t(nregs * ms[m].block * (ms[m].compute ? 8 : 4));
      s.regs.reset((char*)std::aligned_alloc(64, (bytes + 63) & ~size_t(63)));
      if (!s.regs) throw std::bad_alloc();
      s.regp_f.assign(nregs, nullptr);
      s.regp_d.assign(nregs, nullptr);
      s.done.assign(ns, 0);
      s.state.assign(ns, RowState{-1, 0.0});
      s.partials.assign(2 * ns, RowPartial{-1, 0.0});
      s.npartials.assign(ns, 0);
    }

  // Chunk c is rows [c*unit, (c+1)*unit), whatever the thread count, so every
  // block (and every row a block cuts) is the same. Each thread walks spans of
  // consecutive chunks, one sequential stream per input (what the hardware
  // prefetcher follows): from the caches one fixed span per thread
  // (fixed_ranges), from memory spans taken in order from a shared counter,
  // so a thread that gets less CPU (a busy machine) takes fewer.
  const int64_t nchunks = (rows + unit - 1) / unit;
  const bool fixed = nt > 1 && fixed_ranges(max_bytes);
  const int64_t nspan = fixed ? nt : std::min<int64_t>(int64_t(nt) * kGroupSpansPerThread, nchunks);
  std::atomic<int64_t> next{0};
  // tcount: the threads OpenMP gave (fewer than nt inside another parallel region)
  auto body = [&](int tid, int tcount) {
    StreamFence fence;
    for (int64_t sp = fixed ? tid : next.fetch_add(1, std::memory_order_relaxed); sp < nspan;
         sp = fixed ? sp + tcount : next.fetch_add(1, std::memory_order_relaxed)) {
      for (int64_t c = nchunks * sp / nspan, c1 = nchunks * (sp + 1) / nspan; c < c1; ++c) {
        const int64_t q = c * unit, q1 = std::min(rows, q + unit);
        for (size_t m = 0; m < nm; ++m) {
          const GroupMember& G = ms[m];
          MemberScratch& s = scratch[tid * nm + m];
          if (G.compute)
            run_rows<double>(G, s, q * G.inner, q1 * G.inner);
          else
            run_rows<float>(G, s, q * G.inner, q1 * G.inner);
        }
      }
    }
  };
#ifdef _OPENMP
  if (nt > 1) {
#pragma omp parallel num_threads(nt)
    body(omp_get_thread_num(), omp_get_num_threads());
    return nchunks;
  }
#endif
  body(0, 1);
  return nchunks;
}

}  // namespace
}  // namespace fg
