// The evaluator of fused regions: the descriptor a region is packed into by
// Python, its decoded form, and the CPU entry point.
//
// Descriptor (all int64; see docs and tests/test_vm.py for examples):
//   [0] ndim  [1] nloads  [2] nstores  [3] ninstr  [4] nregs
//   shape[ndim]
//   nloads  x { ptr, dtype, offset, strides[ndim], npred,
//               npred x { dim, mul, add, div, len, stride } }
//   nstores x { ptr, dtype, mode, strides[ndim] }
//   ninstr  x { op, dst, a, b, c }
// A load element is valid iff for every predicate t = mul*coord[dim] + add
// satisfies t >= 0, t % div == 0, t / div < len; it then reads
//   ptr + itemsize * (offset + sum_d coord[d]*strides[d] + sum_p (t_p/div_p)*stride_p)
// and an invalid element is 0 without touching memory.
// Instructions: load  dst <- load record a;   const dst <- consts[a];
//               iota  dst <- consts[b]*coord[a] + consts[c];
//               store store record a <- register b;   math: dst <- op(a[, b[, c]]).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace fg {

enum OpCode : int64_t {
#define FG_OP(E, N, A) OP_##E,
#include "ops.def"
#undef FG_OP
  OP_COUNT
};

constexpr int kOpArity[] = {
#define FG_OP(E, N, A) A,
#include "ops.def"
#undef FG_OP
};

enum DTypeCode : int64_t {
#define FG_DTYPE(E, N, C, S) DT_##E = C,
#include "dtypes.def"
#undef FG_DTYPE
};
bool dtype_valid(int64_t code);
int64_t dtype_itemsize(int64_t code);

enum StoreMode : int { MODE_ASSIGN = 0, MODE_SUM = 1, MODE_MAX = 2, MODE_MIN = 3 };

constexpr int kMaxNdim = 16;        // iteration dims a descriptor may have
constexpr int64_t kMaxRegs = 1 << 16;
constexpr int64_t kMaxPreds = 64;   // predicates per load

// Malformed descriptors raise this (bindings turn it into ValueError).
struct DescriptorError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

struct Pred {
  int dim;
  int64_t mul, add, div, len, stride;
};

struct LoadRec {
  char* ptr;
  int dtype;
  int64_t offset;
  int64_t stride[kMaxNdim];  // in elements, per iteration dim
  std::vector<Pred> preds;
};

struct StoreRec {
  char* ptr;
  int dtype;
  int mode;                  // StoreMode
  int64_t stride[kMaxNdim];  // in elements; 0 on the dims a reducing store reduces
};

struct Instr {
  int64_t op, dst, a, b, c;
};

struct Region {
  int ndim = 0;
  int64_t shape[kMaxNdim];
  int64_t numel = 1;
  bool has_reduce = false;   // some store has a reducing mode
  // Set by normalize_region() when has_reduce. Two strategies:
  //  - rows (red_outer false): the last `nred` dims are the reduced dims, so
  //    each output element ("row") of every reducing store is a contiguous
  //    range of `row_len` linear iteration indices;
  //  - outer (red_outer true): the dims keep their order (the innermost is
  //    not reduced, e.g. a column sum), and every thread accumulates into its
  //    own array of `nout` outputs, indexed by dot(coord, ostride).
  int nred = 0;
  int64_t row_len = 1;
  bool red_outer = false;
  uint32_t red_mask = 0;     // bit d: dim d is reduced
  int64_t nout = 1;
  int64_t ostride[kMaxNdim]; // row-major strides over the outer dims, 0 on reduced dims
  std::vector<LoadRec> loads;
  std::vector<StoreRec> stores;
  std::vector<Instr> instrs;
  int64_t nregs = 0;
  const double* consts = nullptr;
  int64_t nconsts = 0;
};

// Decode and bounds-check a descriptor; throws DescriptorError. Never reads
// through the data pointers.
Region parse_region(const int64_t* desc, int64_t len, const double* consts, int64_t nconsts);

// Pick the reduction strategy; reorder dims so reduced dims are innermost
// (row strategy), drop size-1 dims, merge dims
// whose strides allow it (dims used by iota or predicates are kept as they
// are, with their indices remapped). Requires numel > 0.
void normalize_region(Region& r);

// Run a parsed region on the CPU. compute: 0 = float32, 1 = float64.
// Call without the GIL; does not throw for a region parse_region accepted.
void run_region_cpu(Region& r, int compute, int nthreads);

// Run parsed regions rs (rs[i] in compute type computes[i]) in order, as a
// "row group": with the results of run_region_cpu on each in turn, but chunk
// by chunk -- a chunk being some consecutive "rows", the coordinates of the
// leading dims 0..k-1 in chunk_mask (bit d = dim d), whole along the other
// dims -- each chunk through every region before the next, so what an
// earlier region read or wrote is still in cache when a later one reads it.
// The caller guarantees that a region reads what an earlier region of the
// group writes only at its own row (dim d of that output indexed by
// iteration dim d, d < k) and writes nothing an earlier region reads. The
// leading dims stop at the first one some region lacks, has of another size,
// or reduces; with none left, data that fit in cache, rows too large for it,
// or a reduction with the innermost dim kept, the regions run one after
// another. A reduction's rows are each reduced by one thread. Returns the
// number of chunks run (0: one region after another).
// Call without the GIL; throws only DescriptorError (sizes) and bad_alloc.
int64_t run_group_cpu(std::vector<Region>& rs, const std::vector<int>& computes, uint32_t chunk_mask,
                      int nthreads);

}  // namespace fg
