// CUDA evaluator of fused regions (the descriptors of vm.h) — the GPU twin of
// vm_cpu.cpp, with the same op math (op_math.h) and the same storage
// conversions (dtype_convert.h / float16.h, FG_HD, so the roundings are the
// CPU's bit for bit).
//
// Design
// ------
// * Host: the binding parses the descriptor (parse_region); here the region is
//   normalized (normalize_region, as on the CPU) and packed into a POD
//   program: a fixed header (KHeader: shape, dim lists, launch geometry) and
//   a flat array of int64 words (load records with their predicates, store
//   records, instructions, and the constants the instructions use). Both
//   travel by value as ONE kernel parameter (KParams, < 4 KB, the classic
//   parameter limit, so no driver/arch requirement beyond sm_70 for
//   __grid_constant__). __grid_constant__ lets the kernel index the words
//   dynamically straight from the constant bank, without a local copy; all
//   threads of a warp read the same word (broadcast). A program too large
//   for the parameter (rare: hundreds of loads/instructions) is copied to a
//   device buffer with cudaMemcpyAsync from pageable memory (the runtime
//   stages pageable sources before returning, so the host vector may die).
//   Temporary device memory (that buffer, reduction partials, spilled
//   register files) is stream-ordered: cudaMallocAsync / cudaFreeAsync on the
//   caller's stream, so nothing synchronizes. (Devices without memory pools:
//   cudaMalloc + a stream synchronize before cudaFree; a fallback only.)
// * Interpreter: one thread evaluates the whole instruction list for one
//   element at a time (a warp-uniform switch generated from ops.def), with
//   registers in a per-thread local array of kLocalRegs values of the
//   compute type; a program with more registers (nregs > kLocalRegs) keeps
//   its register file in a global scratch buffer laid out [reg][thread]
//   (coalesced), with the grid capped so that buffer stays bounded.
//   Indexing is 64-bit throughout. A thread walks its elements with an
//   odometer (coordinates advanced by a precomputed digit vector of its
//   step), so the hot loop has no integer division; predicates with div != 1
//   divide.
// * Elementwise regions (no reducing store): grid-stride loop, one element
//   per thread per step.
// * Reducing regions: the iteration space is (output o in [0, nout)) x
//   (reduced index j in [0, nj)): o ravels the non-reduced dims, j the
//   reduced dims (red_mask), so the same kernel serves both CPU strategies:
//     rows  (reduced dims innermost, j contiguous in memory): a group of tpr
//           threads (power of two up to 256) per output, lanes striding j;
//     outer (innermost dim not reduced, e.g. a column sum): tpr = 1 (adjacent
//           threads own adjacent outputs, so loads coalesce along the inner
//           dim), or a few lanes when there are fewer than 32 outputs.
//   Each output's j range may be cut into nsplit chunks (when there are too
//   few outputs to fill the GPU): segment = (chunk, o). A group accumulates
//   its segment per lane (sums in double, as on the CPU; max/min NaN-
//   propagating via fg_MAX/fg_MIN), then a fixed shared-memory tree combines
//   the lanes. With nsplit == 1 lane 0 writes the output; otherwise it writes
//   a partial and a second kernel combines each output's chunks in a fixed
//   tree. No atomics: results are deterministic (they depend on the shape
//   and the device's SM count only). Assigning stores of a reducing region
//   are written as each element is evaluated. A region with more reducing
//   stores than kMaxAcc runs in several passes of kMaxAcc stores each (the
//   assigning stores only in the first).
// * Empty regions (numel 0): assigning stores write nothing, reducing stores
//   get the identity (0, -inf, +inf) on every output element, as on the CPU.
// * Requires sm_70+ (__grid_constant__); CMake builds 80;90 by default.
// FG_CUDA_EMULATE: compiled as plain C++ against a CPU emulation of the few
// CUDA runtime calls and kernel built-ins used here (a test harness, not part
// of the build), so the kernels' logic can be checked on machines without a GPU.
#ifndef FG_CUDA_EMULATE
#include <cuda_runtime.h>
#define FG_LAUNCH(kernel, blocks, stream, arg) kernel<<<(unsigned)(blocks), kBlock, 0, (stream)>>>(arg)
#endif

#include <algorithm>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

#include "dtype_convert.h"
#include "op_math.h"
#include "vm.h"
#include "vm_cuda.h"

namespace fg {
namespace {

constexpr int kBlock = 256;       // threads per block, all kernels
constexpr int kLocalRegs = 32;    // register file kept in a per-thread local array
constexpr int kMaxAcc = 8;        // reducing stores per pass
constexpr int64_t kScratchBytes = int64_t(512) << 20;  // cap of a spilled register file
static_assert(kMaxRegs <= 65536, "register indices are packed in 16 bits");
static_assert(kMaxNdim <= 127, "dim lists are int8");

struct KHeader {
  int32_t ndim, nloads, nstores, ninstr;
  int32_t nod, nrd;            // number of outer / reduced dims (elementwise: nod = ndim)
  int32_t tpr;                 // threads per group (reductions; power of two)
  int32_t nacc;                // reducing stores of this pass
  int32_t assign_on;           // evaluate assigning stores (first pass only)
  int32_t ftpr;                // threads per group of the combine kernel
  int32_t acc_lo;              // reducing-store ordinal of slot 0
  int32_t sw;                  // words per store record (4 + ndim)
  int64_t numel, nout, nj, nsplit, clen, nseg;
  int64_t w_loadtab, w_stores, w_instr, w_consts;  // word offsets
  int64_t rstride;             // register stride when regs live in scratch
  int64_t shape[kMaxNdim];
  int8_t od[kMaxNdim], rd[kMaxNdim];  // outer / reduced dims, outermost first
  int32_t acc_store[kMaxAcc];  // store index of each accumulator slot
  int32_t acc_mode[kMaxAcc];
  const int64_t* prog;         // program words in device memory, or null: inline words
  void* rscratch;              // register scratch [nregs][rstride] of T, or null
  double* partial;             // [nseg][nacc] when nsplit > 1
};

constexpr int kParamWords = int((4000 - sizeof(KHeader)) / 8);
struct KParams {
  KHeader h;
  int64_t w[kParamWords];
};
static_assert(sizeof(KParams) <= 4096, "kernel parameters must fit the classic 4 KB limit");

struct FillParams {
  char* ptr;
  int32_t dtype, n;
  double value;
  int64_t count;
  int64_t shape[kMaxNdim], stride[kMaxNdim];
};

#include "vm_cuda_kernels.cuh"  // device helpers and kernels

// ---- host ---------------------------------------------------------------------------

[[noreturn]] void cuda_fail(const std::string& what, cudaError_t err) {
  throw std::runtime_error("fastgrad run_cuda: " + what + ": " + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err));
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so later calls start clean
    cuda_fail(what, err);
  }
}

// Sets the current device for the scope; restores the caller's.
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int dev) {
    check(cudaGetDevice(&prev), "cudaGetDevice");
    if (prev != dev) check(cudaSetDevice(dev), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int cur = -1;
    if (prev >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
};

// Temporary device memory, stream-ordered where the device allows it.
struct TempAlloc {
  cudaStream_t stream;
  bool pools;
  std::vector<void*> ptrs;
  TempAlloc(cudaStream_t s, bool p) : stream(s), pools(p) {}
  void* get(size_t bytes, const char* what) {
    void* p = nullptr;
    const cudaError_t err = pools ? cudaMallocAsync(&p, bytes, stream) : cudaMalloc(&p, bytes);
    if (err != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error(std::string("fastgrad run_cuda: cannot allocate ") + std::to_string(bytes) +
                               " bytes of device memory for " + what + ": " + cudaGetErrorString(err));
    }
    ptrs.push_back(p);
    return p;
  }
  ~TempAlloc() {
    if (ptrs.empty()) return;
    if (pools) {
      for (void* p : ptrs) cudaFreeAsync(p, stream);
    } else {
      cudaStreamSynchronize(stream);  // fallback only: the kernels must be done with it
      for (void* p : ptrs) cudaFree(p);
    }
    cudaGetLastError();
  }
  TempAlloc(const TempAlloc&) = delete;
  TempAlloc& operator=(const TempAlloc&) = delete;
};

struct DeviceInfo {
  int nsm = 1;
  bool pools = false;
};

DeviceInfo device_info(int dev) {
  DeviceInfo info;
  int v = 0;
  check(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  info.nsm = std::max(1, v);
  v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMemoryPoolsSupported, dev) != cudaSuccess) {
    cudaGetLastError();
    v = 0;
  }
  info.pools = v != 0;
  return info;
}

const char* memory_type_name(cudaMemoryType t) {
  switch (t) {
    case cudaMemoryTypeUnregistered: return "unregistered host memory";
    case cudaMemoryTypeHost: return "page-locked host memory";
    case cudaMemoryTypeDevice: return "device memory";
    case cudaMemoryTypeManaged: return "managed memory";
  }
  return "unknown memory";
}

void check_pointer(const void* ptr, int dev, const std::string& what) {
  if (ptr == nullptr) return;
  cudaPointerAttributes attr;
  std::memset(&attr, 0, sizeof(attr));
  const cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw CudaPointerError("fastgrad run_cuda: " + what + ": cannot query its data pointer (" +
                           cudaGetErrorString(err) + ")");
  }
  if (attr.type == cudaMemoryTypeManaged) return;
  if (attr.type == cudaMemoryTypeDevice && attr.device == dev) return;
  std::string where = memory_type_name(attr.type);
  if (attr.type == cudaMemoryTypeDevice) where += " of cuda:" + std::to_string(attr.device);
  throw CudaPointerError("fastgrad run_cuda: " + what + ": data pointer is " + where + ", not memory of cuda:" +
                         std::to_string(dev));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int pow2_ceil(int64_t x, int cap) {
  int p = 1;
  while (p < cap && p < x) p <<= 1;
  return p;
}
int pow2_floor(int64_t x, int cap) {
  int p = 1;
  while (p * 2 <= cap && p * 2 <= x) p <<= 1;
  return p;
}

void check_i32(int64_t v, const char* what) {
  if (v < 0 || v > INT32_MAX) throw DescriptorError(std::string("fastgrad run_cuda: too many ") + what);
}

// Packs the normalized region into words; fills the layout fields of h.
std::vector<int64_t> pack_program(const Region& r, KHeader& h) {
  const int nd = r.ndim;
  check_i32((int64_t)r.loads.size(), "loads");
  check_i32((int64_t)r.stores.size(), "stores");
  check_i32((int64_t)r.instrs.size(), "instructions");
  std::vector<int64_t> w;
  // Load table and records.
  h.w_loadtab = 0;
  w.resize(r.loads.size());
  for (size_t i = 0; i < r.loads.size(); ++i) {
    const LoadRec& L = r.loads[i];
    w[i] = (int64_t)w.size();
    w.push_back((int64_t) reinterpret_cast<uintptr_t>(L.ptr));
    w.push_back((int64_t)L.dtype | ((int64_t)L.preds.size() << 8));
    w.push_back(L.offset);
    for (int d = 0; d < nd; ++d) w.push_back(L.stride[d]);
    for (const Pred& P : L.preds) {
      w.push_back(P.dim);
      w.push_back(P.mul);
      w.push_back(P.add);
      w.push_back(P.div);
      w.push_back(P.len);
      w.push_back(P.stride);
    }
  }
  // Store records: ptr, dtype, mode, reducing ordinal (-1: assign), strides.
  h.w_stores = (int64_t)w.size();
  h.sw = 4 + nd;
  int64_t nred = 0;
  for (const StoreRec& S : r.stores) {
    w.push_back((int64_t) reinterpret_cast<uintptr_t>(S.ptr));
    w.push_back(S.dtype);
    w.push_back(S.mode);
    w.push_back(S.mode == MODE_ASSIGN ? -1 : nred++);
    for (int d = 0; d < nd; ++d) w.push_back(S.stride[d]);
  }
  // Constants actually used, compacted.
  std::unordered_map<int64_t, int64_t> cidx;
  std::vector<double> cvals;
  auto cref = [&](int64_t i) -> int64_t {
    auto it = cidx.find(i);
    if (it != cidx.end()) return it->second;
    const int64_t k = (int64_t)cvals.size();
    cvals.push_back(r.consts[i]);
    cidx.emplace(i, k);
    return k;
  };
  // Instructions: w0 = op | dst << 16 | a << 32, w1 = b | c << 32.
  h.w_instr = (int64_t)w.size();
  for (const Instr& I : r.instrs) {
    int64_t a = I.a, b = I.b, c = I.c, dst = I.op == OP_STORE ? 0 : I.dst;
    if (I.op == OP_CONST) a = cref(I.a);
    if (I.op == OP_IOTA) b = cref(I.b), c = cref(I.c);
    const int ar = I.op >= 0 && I.op < OP_COUNT ? kOpArity[I.op] : 0;
    if (I.op != OP_IOTA && I.op != OP_STORE && ar < 2) b = 0;  // unused operands may hold anything
    if (I.op != OP_IOTA && ar < 3) c = 0;
    if (I.op == OP_LOAD || I.op == OP_CONST) b = c = 0;
    check_i32(a, "operands");
    check_i32(b, "operands");
    check_i32(c, "operands");
    w.push_back((int64_t)((uint64_t)I.op | ((uint64_t)dst << 16) | ((uint64_t)(uint32_t)a << 32)));
    w.push_back((int64_t)((uint64_t)(uint32_t)b | ((uint64_t)(uint32_t)c << 32)));
  }
  h.w_consts = (int64_t)w.size();
  for (double v : cvals) {
    int64_t bits;
    std::memcpy(&bits, &v, 8);
    w.push_back(bits);
  }
  return w;
}

void launch_check(const char* name) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) cuda_fail(std::string("launching ") + name, err);
}

// check_device >= 0: check the pointers written against that device.
void run_empty(const Region& r, cudaStream_t stream, int nsm, int check_device) {
  for (size_t k = 0; k < r.stores.size(); ++k) {
    const StoreRec& S = r.stores[k];
    if (S.mode == MODE_ASSIGN) continue;
    FillParams f;
    std::memset(&f, 0, sizeof(f));
    f.ptr = S.ptr;
    f.dtype = S.dtype;
    f.count = 1;
    bool empty = false;
    for (int d = 0; d < r.ndim; ++d) {
      if (S.stride[d] == 0) continue;  // reduced or broadcast: one output element
      if (r.shape[d] == 0) empty = true;
      f.shape[f.n] = r.shape[d];
      f.stride[f.n] = S.stride[d];
      f.count *= std::max<int64_t>(r.shape[d], 1);
      f.n++;
    }
    if (empty) continue;
    if (check_device >= 0) check_pointer(S.ptr, check_device, "store " + std::to_string(k));
    f.value = S.mode == MODE_SUM ? 0.0 : (S.mode == MODE_MAX ? -HUGE_VAL : HUGE_VAL);
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(f.count, kBlock), (int64_t)nsm * 8));
    FG_LAUNCH(k_fill, blocks, stream, f);
    launch_check("k_fill");
  }
}

template <class T>
void run_typed(Region& r, cudaStream_t stream, const DeviceInfo& dev) {
  KParams p;
  std::memset(&p, 0, sizeof(p));
  KHeader& h = p.h;
  const int nd = r.ndim;
  h.ndim = nd;
  h.nloads = (int32_t)r.loads.size();
  h.nstores = (int32_t)r.stores.size();
  h.ninstr = (int32_t)r.instrs.size();
  h.numel = r.numel;
  for (int d = 0; d < nd; ++d) h.shape[d] = r.shape[d];
  std::vector<int64_t> words = pack_program(r, h);

  TempAlloc tmp(stream, dev.pools);
  if ((int64_t)words.size() <= kParamWords) {
    std::copy(words.begin(), words.end(), p.w);
  } else {
    void* buf = tmp.get(words.size() * sizeof(int64_t), "the program");
    check(cudaMemcpyAsync(buf, words.data(), words.size() * sizeof(int64_t), cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync of the program");
    h.prog = static_cast<const int64_t*>(buf);
  }

  const int64_t resident = (int64_t)dev.nsm * 2048;  // threads a full wave holds
  const int64_t max_blocks = (int64_t)dev.nsm * 32;
  // A register file that does not fit the local array lives in scratch.
  auto reg_scratch = [&](int64_t blocks) -> int64_t {
    if (r.nregs <= kLocalRegs) return blocks;
    const int64_t per_block = (int64_t)kBlock * r.nregs * (int64_t)sizeof(T);
    blocks = std::max<int64_t>(1, std::min<int64_t>(blocks, kScratchBytes / per_block));
    h.rstride = blocks * kBlock;
    h.rscratch = tmp.get((size_t)(blocks * per_block), "the register file");
    return blocks;
  };

  if (!r.has_reduce) {
    h.nod = nd;
    for (int d = 0; d < nd; ++d) h.od[d] = (int8_t)d;
    h.assign_on = 1;
    int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(r.numel, kBlock), max_blocks));
    blocks = reg_scratch(blocks);
    FG_LAUNCH(k_elem<T>, blocks, stream, p);
    launch_check("k_elem");
    return;
  }

  // Reductions: outputs o over the non-reduced dims, j over the reduced ones.
  h.nod = h.nrd = 0;
  for (int d = 0; d < nd; ++d) {
    if (r.red_mask >> d & 1)
      h.rd[h.nrd++] = (int8_t)d;
    else
      h.od[h.nod++] = (int8_t)d;
  }
  h.nout = r.nout;
  h.nj = r.numel / r.nout;
  int tpr;
  if (!r.red_outer)
    tpr = pow2_ceil(h.nj, kBlock);                       // rows: j contiguous
  else
    tpr = h.nout >= 32 ? 1 : pow2_floor(32 / h.nout, 32);  // outer: o contiguous
  h.tpr = tpr;
  int64_t nsplit = 1;
  const int64_t want_groups = resident / tpr;
  if (h.nout < want_groups) {
    nsplit = ceil_div(want_groups, h.nout);
    nsplit = std::min<int64_t>(nsplit, std::max<int64_t>(1, h.nj / ((int64_t)tpr * 32)));
  }
  h.clen = ceil_div(h.nj, nsplit);
  nsplit = ceil_div(h.nj, h.clen);
  h.nsplit = nsplit;
  h.nseg = h.nout * nsplit;
  h.ftpr = pow2_ceil(nsplit, kBlock);
  int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(h.nseg, kBlock / tpr), max_blocks));
  blocks = reg_scratch(blocks);

  std::vector<int> red_stores;
  for (size_t k = 0; k < r.stores.size(); ++k)
    if (r.stores[k].mode != MODE_ASSIGN) red_stores.push_back((int)k);
  const int64_t nred = (int64_t)red_stores.size();
  if (nsplit > 1)
    h.partial = static_cast<double*>(
        tmp.get((size_t)(h.nseg * std::min<int64_t>(nred, kMaxAcc)) * sizeof(double), "reduction partials"));
  for (int64_t lo = 0; lo < nred; lo += kMaxAcc) {
    h.acc_lo = (int32_t)lo;
    h.nacc = (int32_t)std::min<int64_t>(kMaxAcc, nred - lo);
    h.assign_on = lo == 0;
    for (int k = 0; k < h.nacc; ++k) {
      h.acc_store[k] = red_stores[lo + k];
      h.acc_mode[k] = r.stores[red_stores[lo + k]].mode;
    }
    FG_LAUNCH(k_seg<T>, blocks, stream, p);
    launch_check("k_seg");
    if (nsplit > 1) {
      const int64_t cblocks =
          std::max<int64_t>(1, std::min<int64_t>(ceil_div(h.nout * h.nacc, kBlock / h.ftpr), max_blocks));
      FG_LAUNCH(k_combine, cblocks, stream, p);
      launch_check("k_combine");
    }
  }
}

}  // namespace

void run_region_cuda(Region& r, int compute, int device, std::uintptr_t stream_handle, bool check_pointers) {
  if (compute != 0 && compute != 1)
    throw std::invalid_argument("compute_dtype must be 0 (float32) or 1 (float64), got " + std::to_string(compute));
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("fastgrad run_cuda: CUDA is not available: ") + cudaGetErrorName(err) +
                             ": " + cudaGetErrorString(err));
  }
  if (count == 0) throw std::runtime_error("fastgrad run_cuda: CUDA is not available: no CUDA device visible");
  if (device < 0 || device >= count)
    throw std::runtime_error("fastgrad run_cuda: device index " + std::to_string(device) + " is out of range (" +
                             std::to_string(count) + " CUDA device(s) visible)");
  DeviceGuard guard(device);
  cudaGetLastError();  // start clean: report only errors of our own launches
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (check_pointers) {
    // Only pointers that can be dereferenced: an empty region reads nothing and writes
    // only reducing stores with a non-empty output (run_empty checks those); a load
    // no instruction uses, or with a predicate that is never true (an empty slice,
    // whose pointer may lie just past its allocation), reads nothing.
    if (r.numel > 0) {
      std::vector<char> used(r.loads.size(), 0);
      for (const Instr& I : r.instrs)
        if (I.op == OP_LOAD) used[I.a] = 1;
      for (size_t i = 0; i < r.loads.size(); ++i) {
        bool live = used[i] != 0;
        for (const Pred& P : r.loads[i].preds) live = live && P.len > 0;
        if (live) check_pointer(r.loads[i].ptr, device, "load " + std::to_string(i));
      }
      for (size_t i = 0; i < r.stores.size(); ++i)
        check_pointer(r.stores[i].ptr, device, "store " + std::to_string(i));
    }
  }
  const DeviceInfo info = device_info(device);
  if (r.numel == 0) {
    run_empty(r, stream, info.nsm, check_pointers ? device : -1);
    return;
  }
  normalize_region(r);
  if (compute == 0)
    run_typed<float>(r, stream, info);
  else
    run_typed<double>(r, stream, info);
}

}  // namespace fg
