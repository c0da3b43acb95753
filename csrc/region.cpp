// Decoding, validation and dim normalisation of region descriptors (vm.h).
// Everything a malformed descriptor could get wrong is checked here, so the
// evaluators can trust the Region they get.
#include <algorithm>
#include <cstring>
#include "dtype_convert.h"
#include "vm.h"

namespace fg {

bool dtype_valid(int64_t code) {
  switch (code) {
#define FG_DTYPE(E, N, C, S) case C:
#include "dtypes.def"
#undef FG_DTYPE
      return true;
    default:
      return false;
  }
}

int64_t dtype_itemsize(int64_t code) {
  switch (code) {
#define FG_DTYPE(E, N, C, S) \
  case C:                    \
    return (int64_t)sizeof(S);
#include "dtypes.def"
#undef FG_DTYPE
    default:
      return 0;
  }
}

namespace {

[[noreturn]] void fail(const std::string& msg) { throw DescriptorError("fastgrad region descriptor: " + msg); }

struct Reader {
  const int64_t* d;
  int64_t len, pos = 0;
  void need(int64_t k, const char* what) {
    if (k < 0 || len - pos < k)
      fail(std::string("too short while reading ") + what + " (length " + std::to_string(len) + ")");
  }
  int64_t next() { return d[pos++]; }
};

void check_range(int64_t v, int64_t lo, int64_t hi, const std::string& what) {
  if (v < lo || v >= hi)
    fail(what + " = " + std::to_string(v) + " is out of range [" + std::to_string(lo) + ", " +
         std::to_string(hi) + ")");
}

}  // namespace

Region parse_region(const int64_t* desc, int64_t len, const double* consts, int64_t nconsts) {
  Region r;
  Reader rd{desc, len};
  rd.need(5, "header");
  const int64_t ndim = rd.next(), nloads = rd.next(), nstores = rd.next(), ninstr = rd.next(),
                nregs = rd.next();
  check_range(ndim, 0, kMaxNdim + 1, "ndim");
  // Each record/instruction takes at least 3 values, which bounds the counts
  // by the descriptor length before anything is allocated.
  check_range(nloads, 0, len / 3 + 1, "nloads");
  check_range(nstores, 0, len / 3 + 1, "nstores");
  check_range(ninstr, 0, len / 5 + 1, "ninstr");
  check_range(nregs, 0, kMaxRegs + 1, "nregs");
  r.ndim = (int)ndim;
  r.nregs = nregs;
  r.consts = consts;
  r.nconsts = nconsts;

  rd.need(ndim, "shape");
  r.numel = 1;
  for (int d = 0; d < r.ndim; ++d) {
    r.shape[d] = rd.next();
    if (r.shape[d] < 0) fail("shape[" + std::to_string(d) + "] is negative");
    if (__builtin_mul_overflow(r.numel, r.shape[d], &r.numel)) fail("iteration space overflows int64");
  }

  r.loads.resize(nloads);
  for (int64_t i = 0; i < nloads; ++i) {
    LoadRec& L = r.loads[i];
    const std::string what = "load " + std::to_string(i);
    rd.need(3 + ndim + 1, what.c_str());
    L.ptr = reinterpret_cast<char*>(rd.next());
    const int64_t dt = rd.next();
    if (!dtype_valid(dt)) fail(what + ": unknown dtype " + std::to_string(dt));
    L.dtype = (int)dt;
    L.offset = rd.next();
    for (int d = 0; d < r.ndim; ++d) L.stride[d] = rd.next();
    const int64_t npred = rd.next();
    check_range(npred, 0, kMaxPreds + 1, what + " npred");
    rd.need(6 * npred, what.c_str());
    L.preds.resize(npred);
    for (int64_t p = 0; p < npred; ++p) {
      Pred& P = L.preds[p];
      const int64_t dim = rd.next();
      check_range(dim, 0, ndim, what + " predicate dim");
      P.dim = (int)dim;
      P.mul = rd.next();
      P.add = rd.next();
      P.div = rd.next();
      P.len = rd.next();
      P.stride = rd.next();
      if (P.div < 1) fail(what + ": predicate div must be >= 1");
      if (P.len < 0) fail(what + ": predicate len must be >= 0");
    }
    // A predicated load may never touch memory (empty slice), so only an
    // unpredicated one needs a real pointer.
    if (L.ptr == nullptr && npred == 0 && r.numel > 0) fail(what + ": null data pointer");
  }

  r.stores.resize(nstores);
  for (int64_t i = 0; i < nstores; ++i) {
    StoreRec& S = r.stores[i];
    const std::string what = "store " + std::to_string(i);
    rd.need(3 + ndim, what.c_str());
    S.ptr = reinterpret_cast<char*>(rd.next());
    const int64_t dt = rd.next();
    if (!dtype_valid(dt)) fail(what + ": unknown dtype " + std::to_string(dt));
    S.dtype = (int)dt;
    const int64_t mode = rd.next();
    check_range(mode, 0, 4, what + " mode");
    S.mode = (int)mode;
    for (int d = 0; d < r.ndim; ++d) S.stride[d] = rd.next();
    if (S.mode != MODE_ASSIGN) r.has_reduce = true;
    if (S.ptr == nullptr && (r.numel > 0 || S.mode != MODE_ASSIGN)) fail(what + ": null data pointer");
  }

  rd.need(5 * ninstr, "instructions");
  r.instrs.resize(ninstr);
  std::vector<char> written(nregs, 0);
  std::vector<int> stored(nstores, 0);
  auto read_reg = [&](int64_t reg, const std::string& what) {
    check_range(reg, 0, nregs, what);
    if (!written[reg]) fail(what + " = " + std::to_string(reg) + " is read before it is written");
  };
  for (int64_t i = 0; i < ninstr; ++i) {
    Instr& I = r.instrs[i];
    I.op = rd.next();
    I.dst = rd.next();
    I.a = rd.next();
    I.b = rd.next();
    I.c = rd.next();
    const std::string what = "instruction " + std::to_string(i);
    check_range(I.op, 0, OP_COUNT, what + " opcode");
    switch (I.op) {
      case OP_LOAD:
        check_range(I.a, 0, nloads, what + " (load) record");
        break;
      case OP_CONST:
        check_range(I.a, 0, nconsts, what + " (const) index");
        break;
      case OP_IOTA:
        check_range(I.a, 0, ndim, what + " (iota) dim");
        check_range(I.b, 0, nconsts, what + " (iota) scale const");
        check_range(I.c, 0, nconsts, what + " (iota) offset const");
        break;
      case OP_STORE:
        check_range(I.a, 0, nstores, what + " (store) record");
        read_reg(I.b, what + " (store) register");
        stored[I.a]++;
        break;
      default: {
        const int ar = kOpArity[I.op];
        read_reg(I.a, what + " operand a");
        if (ar >= 2) read_reg(I.b, what + " operand b");
        if (ar >= 3) read_reg(I.c, what + " operand c");
      }
    }
    if (I.op != OP_STORE) {
      check_range(I.dst, 0, nregs, what + " dst");
      written[I.dst] = 1;
    }
  }
  if (rd.pos != len) fail(std::to_string(len - rd.pos) + " values left over after the instructions");
  for (int64_t i = 0; i < nstores; ++i)
    if (stored[i] != 1)
      fail("store record " + std::to_string(i) + " is the target of " + std::to_string(stored[i]) +
           " store instructions (must be exactly 1)");

  // All reducing stores must reduce the same dims: those of size > 1 where
  // their stride is 0. (A size-0 dim with stride 0 is also reduced.)
  bool first = true;
  uint32_t red_mask = 0;
  for (const StoreRec& S : r.stores) {
    if (S.mode == MODE_ASSIGN) continue;
    uint32_t m = 0;
    for (int d = 0; d < r.ndim; ++d)
      if (r.shape[d] != 1 && S.stride[d] == 0) m |= 1u << d;
    if (!first && m != red_mask) fail("reducing stores reduce different sets of dims");
    red_mask = m;
    first = false;
  }
  return r;
}

void normalize_region(Region& r) {
  const int nd = r.ndim;
  bool pinned[kMaxNdim] = {}, reduced[kMaxNdim] = {};
  for (const Instr& I : r.instrs)
    if (I.op == OP_IOTA) pinned[I.a] = true;
  for (const LoadRec& L : r.loads)
    for (const Pred& P : L.preds) pinned[P.dim] = true;
  for (const StoreRec& S : r.stores)
    if (S.mode != MODE_ASSIGN)
      for (int d = 0; d < nd; ++d)
        if (r.shape[d] > 1 && S.stride[d] == 0) reduced[d] = true;

  // Strategy: when the innermost dim that matters is not reduced (a column
  // sum, the VJP of broadcasting over leading dims), walking the input in
  // memory order and accumulating into per-thread output arrays beats
  // gathering each output's inputs with a large stride. Bounded by memory.
  int innermost = -1;
  int64_t nout = 1, nred_stores = 0;
  for (int d = 0; d < nd; ++d) {
    if (r.shape[d] != 1) innermost = d;
    if (!reduced[d]) nout *= r.shape[d];
  }
  for (const StoreRec& S : r.stores) nred_stores += S.mode != MODE_ASSIGN;
  r.red_outer = r.has_reduce && innermost >= 0 && !reduced[innermost] &&
                nout * nred_stores <= (int64_t(1) << 22);

  // New order (rows): outer dims, then reduced dims, each in their original
  // order; (outer): the original order. Size-1 dims vanish unless pinned
  // (their coordinate is always 0).
  int order[kMaxNdim], n = 0;
  for (int pass = 0; pass < 2; ++pass)
    for (int d = 0; d < nd; ++d)
      if ((r.red_outer ? pass == 0 : reduced[d] == (pass == 1)) && (r.shape[d] != 1 || pinned[d]))
        order[n++] = d;

  // Greedy merge of each dim into the group before it.
  int64_t shape[kMaxNdim];
  int old_to_new[kMaxNdim];
  bool gpinned[kMaxNdim], gred[kMaxNdim];
  std::vector<int64_t> lstr(r.loads.size() * kMaxNdim), sstr(r.stores.size() * kMaxNdim);
  int g = -1;
  for (int k = 0; k < n; ++k) {
    const int d = order[k];
    bool merge = g >= 0 && !pinned[d] && !gpinned[g] && gred[g] == reduced[d];
    for (size_t i = 0; merge && i < r.loads.size(); ++i)
      merge = lstr[i * kMaxNdim + g] == r.loads[i].stride[d] * r.shape[d];
    for (size_t i = 0; merge && i < r.stores.size(); ++i)
      merge = sstr[i * kMaxNdim + g] == r.stores[i].stride[d] * r.shape[d];
    if (merge) {
      shape[g] *= r.shape[d];
    } else {
      ++g;
      shape[g] = r.shape[d];
      gpinned[g] = pinned[d];
      gred[g] = reduced[d];
    }
    for (size_t i = 0; i < r.loads.size(); ++i) lstr[i * kMaxNdim + g] = r.loads[i].stride[d];
    for (size_t i = 0; i < r.stores.size(); ++i) sstr[i * kMaxNdim + g] = r.stores[i].stride[d];
    old_to_new[d] = g;
  }
  int ng = g + 1;
  if (ng == 0) {  // a single element
    ng = 1;
    shape[0] = 1;
    gred[0] = false;
    for (size_t i = 0; i < r.loads.size(); ++i) lstr[i * kMaxNdim] = 0;
    for (size_t i = 0; i < r.stores.size(); ++i) sstr[i * kMaxNdim] = 0;
  }

  r.ndim = ng;
  std::copy(shape, shape + ng, r.shape);
  for (size_t i = 0; i < r.loads.size(); ++i) {
    std::copy(&lstr[i * kMaxNdim], &lstr[i * kMaxNdim] + ng, r.loads[i].stride);
    for (Pred& P : r.loads[i].preds) P.dim = old_to_new[P.dim];
  }
  for (size_t i = 0; i < r.stores.size(); ++i)
    std::copy(&sstr[i * kMaxNdim], &sstr[i * kMaxNdim] + ng, r.stores[i].stride);
  for (Instr& I : r.instrs)
    if (I.op == OP_IOTA) I.a = old_to_new[I.a];

  r.nred = 0;
  r.row_len = 1;
  r.red_mask = 0;
  r.nout = 1;
  for (int d = ng - 1; d >= 0; --d) {
    if (gred[d]) {
      r.red_mask |= 1u << d;
      r.ostride[d] = 0;
    } else {
      r.ostride[d] = r.nout;
      r.nout *= r.shape[d];
    }
  }
  if (!r.red_outer)
    for (int d = ng - 1; d >= 0 && gred[d]; --d) {
      r.nred++;
      r.row_len *= r.shape[d];
    }
  // Nothing to reduce (only size-1 dims): a reducing store is a plain copy.
  if (r.red_mask == 0) {
    r.red_outer = false;
    for (StoreRec& S : r.stores) S.mode = MODE_ASSIGN;
    r.has_reduce = false;
  }
}

}  // namespace fg
