// A region parsed once and run many times: the CPU fast path of a cache hit.
//
// A plan's region keeps one descriptor per layout of its inputs (runtime._Packer); only the data
// pointers change from call to call. Parsing that descriptor on every call (and packing it in
// Python) cost more than running a small region, so the packer parses it once into a Program and
// each call only patches the pointers of a copy of the parsed region.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "stream_store.h"
#include "vm.h"

namespace fg {

// Longest row a compiled loop sums (a longer one stays with the interpreter, which can also
// split a row between threads).
constexpr int64_t kJitMaxRowSum = 4096;

struct Program {
  Region region;                   // parsed, not normalised; region.consts points into consts
  std::vector<double> consts;      // [nconsts]
  std::vector<int64_t> load_src;   // [nloads]: the input (of the caller's list) each load reads
  std::vector<int64_t> store_dst;  // [nstores]: the output each store writes
  int compute = 0;                 // 0 = float32, 1 = float64
  // A loop compiled for this program (python/fastgrad/jit.py), or null. With split == 0 it
  // computes elements [begin, end) of a region whose loads and stores are all row-major
  // contiguous over the iteration space or (loads) a single value; with split = k > 0 it
  // computes rows [begin, end) of the iteration space seen as rows (dims 0..k-1) by columns
  // (dims k..), where a load may also be broadcast along the columns (one value per row) or
  // along the rows (one row read by every row). ptrs[nloads + nstores]: the load (offset
  // applied) then store data pointers.
  using Kernel = void (*)(char* const* ptrs, int64_t begin, int64_t end);
  std::atomic<Kernel> kernel{nullptr};  // set under the GIL, read by runs without it
  // The same loop writing its elementwise outputs with streaming stores (stream_store.h), or
  // null; a run takes it where streams() says, a row group only for a member whose outputs no
  // later member reads (run_group_loops).
  std::atomic<Kernel> stream_kernel{nullptr};
  std::atomic<int> split{0};
  // Whether a loop with this split can compute the region: no iota, no predicate, every record
  // in the compute dtype, loads as said above, stores row-major contiguous or (split > 0) one
  // sum per row of at most kJitMaxRowSum elements (the loop adds a row's values in double, in
  // seg_sum's fixed order: python/fastgrad/jit.py), or (split > 0) column sums.
  bool kernel_fits(int split) const;
  // Whether the region's sums are column sums for this split: every sum store adds over the
  // rows (dims 0..split-1, zero strides there) into one row-major row over the columns, and
  // there is one. A loop over rows then adds each element into that store's row of doubles;
  // run() gives each chunk of rows its own rows (the same chunks for any thread count) and
  // adds the chunks' rows in order.
  bool column_sums(int split) const;
  // How a loop with this split reads each load (kinds[i]): 's' a single value, 'c' contiguous,
  // and with split > 0 'r' one value per row or 'k' one row for all rows; false when some load
  // fits none of them. The one place the loop's indexing is decided (jit.py generates it).
  bool load_kinds(int split, std::string& kinds) const;
  // The loop's data pointers for bound region r, or false when a store overlaps a load or
  // another store (then only the interpreter is exact).
  bool loop_pointers(const Region& r, std::vector<char*>& ptrs) const;
  // Whether a run of bound region r may write through stream_kernel: there is one, and each
  // of r's elementwise stores is at least stream_min_bytes() (then it would not stay in the caches
  // for whatever reads it next) and starts on a cache line (with rows: of whole lines).
  bool streams(const Region& r) const;
  // Whether runs that may stream do: timed on this machine, as the same kind of loop gained
  // from streaming stores on one CPU and lost on another (a loop calling vector exp between
  // divisions ran 1.5x slower with them: docs/performance-history-nov27.md). The first
  // kStreamTrials runs of each kind are timed, alternately, and the faster (least seconds per
  // element) is kept.
  // 0 while timing, 1 streaming stores, -1 plain stores.
  static constexpr int kStreamTrials = 3;
  mutable std::atomic<int> stream_pick{0};
  // Forget the timings (a new loop was set).
  void reset_stream_pick();
  Program(const int64_t* desc, int64_t len, const double* consts, int64_t nconsts, int compute,
          std::vector<int64_t> load_src, std::vector<int64_t> store_dst, int64_t nins,
          int64_t nouts);
  Program(const Program&) = delete;
  Program& operator=(const Program&) = delete;

  // A copy of the region reading ins[load_src[i]] and writing outs[store_dst[k]]
  // (ins[nins], outs[nouts]: data pointers of tensors laid out as the descriptor said).
  Region bind(char* const* ins, char* const* outs) const;

  // Run the bound region r (from bind) on the CPU: through the compiled kernel when there is one
  // and no store overlaps a load or another store, else through the interpreter. Returns
  // whether the kernel ran. Call without the GIL.
  bool run(Region& r, int nthreads) const;

 private:
  // Which kind the next timed run takes (1 streaming, 0 plain), and its time per element.
  int next_trial() const;
  void record_trial(int kind, double seconds_per_element) const;
  mutable std::mutex trial_mu_;
  mutable int trials_[2] = {0, 0};
  mutable double best_[2] = {0, 0};
  void run_columns(Kernel k, const std::vector<char*>& ptrs, int64_t rows, int64_t cols, int nthreads) const;
};

// Run bound regions rs (of programs ps, a row group over dims 0..k-1 of mask) through their
// compiled loops, chunk of rows by chunk of rows, each chunk through every member before the
// next; returns the number of chunks, or -1 (nothing run) when a member has no loop, a loop
// over another split, other rows or overlapping buffers. Call without the GIL.
int64_t run_group_loops(const std::vector<const Program*>& ps, std::vector<Region>& rs, uint32_t mask,
                        int nthreads);

}  // namespace fg
