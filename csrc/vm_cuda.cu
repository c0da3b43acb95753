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

// ---- device helpers -----------------------------------------------------------

__device__ __forceinline__ double d_inf() { return __longlong_as_double(0x7ff0000000000000LL); }

__device__ __forceinline__ double red_identity(int mode) {
  return mode == MODE_SUM ? 0.0 : (mode == MODE_MAX ? -d_inf() : d_inf());
}

__device__ __forceinline__ double red_combine(int mode, double a, double b) {
  if (mode == MODE_SUM) return __dadd_rn(a, b);
  if (mode == MODE_MAX) return fg_MAX(a, b);
  return fg_MIN(a, b);
}

// x / s and x % s for x >= 0, s >= 1, with a 32-bit fast path.
__device__ __forceinline__ int64_t divmod(int64_t x, int64_t s, int64_t* rem) {
  if (((uint64_t)x | (uint64_t)s) >> 32 == 0) {
    const uint32_t q = (uint32_t)x / (uint32_t)s;
    *rem = (int64_t)((uint32_t)x - q * (uint32_t)s);
    return q;
  }
  const int64_t q = x / s;
  *rem = x - q * s;
  return q;
}

// Coordinates of x over the dims in `list` (innermost last); the first dim
// of the list takes the quotient unbounded.
__device__ __forceinline__ void unravel(int64_t x, const int8_t* list, int n, const int64_t* shape, int64_t* c) {
  for (int i = n - 1; i > 0; --i) {
    const int d = list[i];
    int64_t rem;
    x = divmod(x, shape[d], &rem);
    c[d] = rem;
  }
  if (n > 0) c[list[0]] = x;
}

// c += step (both as mixed-radix digits over `list`, step's digits in sd).
// The first (outermost) digit is not wrapped: the caller stops before it
// leaves the iteration space.
__device__ __forceinline__ void odo_add(int64_t* c, const int64_t* sd, const int8_t* list, int n,
                                        const int64_t* shape) {
  int64_t carry = 0;
  for (int i = n - 1; i > 0; --i) {
    const int d = list[i];
    int64_t v = c[d] + sd[d] + carry;
    carry = v >= shape[d];
    c[d] = carry ? v - shape[d] : v;
  }
  if (n > 0) c[list[0]] += sd[list[0]] + carry;
}

template <class T>
__device__ __forceinline__ T load_val(const char* p, int dt, int64_t off) {
  switch (dt) {
#define FG_DTYPE(E, N, C, S) \
  case C:                    \
    return from_storage<T>(reinterpret_cast<const S*>(p)[off]);
#include "dtypes.def"
#undef FG_DTYPE
  }
  return T(0);
}

template <class V>
__device__ __forceinline__ void store_val(char* p, int dt, int64_t off, V v) {
  switch (dt) {
#define FG_DTYPE(E, N, C, S)                                  \
  case C:                                                     \
    reinterpret_cast<S*>(p)[off] = to_storage<S>(v);          \
    break;
#include "dtypes.def"
#undef FG_DTYPE
  }
}

__device__ __forceinline__ double w_double(const int64_t* W, int64_t i) { return __longlong_as_double(W[i]); }

// Evaluate the program for the element at coordinates c. Registers: R[k*rs].
// Reducing stores of this pass combine into acc[slot]; others are skipped.
template <class T>
__device__ __noinline__ void exec(const KHeader& h, const int64_t* W, const int64_t* c, T* R, int64_t rs,
                                  double* acc) {
  const int nd = h.ndim;
  const int64_t* ins = W + h.w_instr;
  for (int i = 0; i < h.ninstr; ++i, ins += 2) {
    const int64_t w0 = ins[0], w1 = ins[1];
    const int op = (int)(w0 & 0xffff);
    const int64_t dst = (w0 >> 16) & 0xffff;
    const int a = (int)(int32_t)(w0 >> 32);
    const int b = (int)(int32_t)(w1 & 0xffffffff);
    const int cc = (int)(int32_t)(w1 >> 32);
    switch (op) {
      case OP_LOAD: {
        const int64_t* L = W + W[h.w_loadtab + a];
        const char* ptr = reinterpret_cast<const char*>(L[0]);
        const int dt = (int)(L[1] & 0xff);
        const int np = (int)(L[1] >> 8);
        int64_t off = L[2];
        for (int d = 0; d < nd; ++d) off += c[d] * L[3 + d];
        bool ok = true;
        const int64_t* P = L + 3 + nd;
        for (int q = 0; q < np; ++q, P += 6) {
          const int64_t t = P[1] * c[P[0]] + P[2];
          int64_t qv = t;
          if (t < 0) {
            ok = false;
            break;
          }
          if (P[3] != 1) {
            int64_t rem;
            qv = divmod(t, P[3], &rem);
            if (rem != 0) {
              ok = false;
              break;
            }
          }
          if (qv >= P[4]) {
            ok = false;
            break;
          }
          off += qv * P[5];
        }
        // Only a valid element's address is formed and read.
        R[dst * rs] = ok ? load_val<T>(ptr, dt, off) : T(0);
        break;
      }
      case OP_CONST:
        R[dst * rs] = T(w_double(W, h.w_consts + a));
        break;
      case OP_IOTA: {
        // Separate multiply and add (no FMA contraction), like two torch ops.
        const double v = __dadd_rn(__dmul_rn(w_double(W, h.w_consts + b), double(c[a])), w_double(W, h.w_consts + cc));
        R[dst * rs] = T(v);
        break;
      }
      case OP_STORE: {
        const int64_t* S = W + h.w_stores + (int64_t)a * h.sw;
        const int mode = (int)S[2];
        const T v = R[(int64_t)b * rs];
        if (mode == MODE_ASSIGN) {
          if (h.assign_on) {
            int64_t off = 0;
            for (int d = 0; d < nd; ++d) off += c[d] * S[4 + d];
            store_val<T>(reinterpret_cast<char*>(S[0]), (int)S[1], off, v);
          }
        } else {
          const int slot = (int)S[3] - h.acc_lo;
          if (slot >= 0 && slot < h.nacc) acc[slot] = red_combine(mode, acc[slot], double(v));
        }
        break;
      }
        // The math ops, generated from ops.def.
#define FG_CASE_0(E)
#define FG_CASE_1(E)                               \
  case OP_##E:                                     \
    R[dst * rs] = fg_##E<T>(R[(int64_t)a * rs]);   \
    break;
#define FG_CASE_2(E)                                                       \
  case OP_##E:                                                             \
    R[dst * rs] = fg_##E<T>(R[(int64_t)a * rs], R[(int64_t)b * rs]);       \
    break;
#define FG_CASE_3(E)                                                                           \
  case OP_##E:                                                                                 \
    R[dst * rs] = fg_##E<T>(R[(int64_t)a * rs], R[(int64_t)b * rs], R[(int64_t)cc * rs]);      \
    break;
#define FG_OP(E, N, A) FG_CASE_##A(E)
#include "ops.def"
#undef FG_OP
#undef FG_CASE_0
#undef FG_CASE_1
#undef FG_CASE_2
#undef FG_CASE_3
      default:
        break;
    }
  }
}

template <class T>
__device__ __forceinline__ void reg_file(const KHeader& h, T* local, int64_t tid, T** R, int64_t* rs) {
  if (h.rscratch) {
    *R = static_cast<T*>(h.rscratch) + tid;
    *rs = h.rstride;
  } else {
    *R = local;
    *rs = 1;
  }
}

// ---- kernels ----------------------------------------------------------------------

template <class T>
__global__ void __launch_bounds__(kBlock) k_elem(const __grid_constant__ KParams p) {
  const KHeader& h = p.h;
  const int64_t* W = h.prog ? h.prog : p.w;
  const int64_t tid = (int64_t)blockIdx.x * kBlock + threadIdx.x;
  const int64_t nthr = (int64_t)gridDim.x * kBlock;
  if (tid >= h.numel) return;
  T local[kLocalRegs];
  T* R;
  int64_t rs;
  reg_file<T>(h, local, tid, &R, &rs);
  int64_t c[kMaxNdim], sd[kMaxNdim];
  unravel(tid, h.od, h.nod, h.shape, c);
  unravel(nthr, h.od, h.nod, h.shape, sd);
  for (int64_t i = tid;;) {
    exec<T>(h, W, c, R, rs, nullptr);
    if (h.numel - i <= nthr) break;
    i += nthr;
    odo_add(c, sd, h.od, h.nod, h.shape);
  }
}

// Segments (chunk, o) of a reduction; see the file comment.
template <class T>
__global__ void __launch_bounds__(kBlock) k_seg(const __grid_constant__ KParams p) {
  __shared__ double sm[kBlock];
  const KHeader& h = p.h;
  const int64_t* W = h.prog ? h.prog : p.w;
  const int tpr = h.tpr;
  const int lane = threadIdx.x & (tpr - 1);
  const int gpb = kBlock / tpr;
  const int64_t gib = threadIdx.x / tpr;
  const int64_t tid = (int64_t)blockIdx.x * kBlock + threadIdx.x;
  T local[kLocalRegs];
  T* R;
  int64_t rs;
  reg_file<T>(h, local, tid, &R, &rs);
  int64_t c[kMaxNdim], sd[kMaxNdim];
  for (int d = 0; d < kMaxNdim; ++d) c[d] = 0;
  unravel(tpr, h.rd, h.nrd, h.shape, sd);  // a lane's step through j
  const int nacc = h.nacc;
  for (int64_t base = (int64_t)blockIdx.x * gpb; base < h.nseg; base += (int64_t)gridDim.x * gpb) {
    const int64_t seg = base + gib;
    double acc[kMaxAcc];
    for (int k = 0; k < nacc; ++k) acc[k] = red_identity(h.acc_mode[k]);
    if (seg < h.nseg) {
      int64_t o;
      const int64_t ch = divmod(seg, h.nout, &o);
      const int64_t j0 = ch * h.clen;
      const int64_t j1 = h.nj - j0 < h.clen ? h.nj : j0 + h.clen;
      int64_t j = j0 + lane;
      unravel(o, h.od, h.nod, h.shape, c);
      if (j < j1) {
        unravel(j, h.rd, h.nrd, h.shape, c);
        for (;;) {
          exec<T>(h, W, c, R, rs, acc);
          if (j1 - j <= tpr) break;
          j += tpr;
          odo_add(c, sd, h.rd, h.nrd, h.shape);
        }
      }
    }
    for (int k = 0; k < nacc; ++k) {
      const int mode = h.acc_mode[k];
      double v = acc[k];
      if (tpr > 1) {
        sm[threadIdx.x] = v;
        __syncthreads();
        for (int s = tpr >> 1; s > 0; s >>= 1) {
          if (lane < s) sm[threadIdx.x] = red_combine(mode, sm[threadIdx.x], sm[threadIdx.x + s]);
          __syncthreads();
        }
        v = sm[threadIdx.x];  // lane 0: the group's result
      }
      if (lane == 0 && seg < h.nseg) {
        if (h.nsplit == 1) {
          const int64_t* S = W + h.w_stores + (int64_t)h.acc_store[k] * h.sw;
          int64_t off = 0;
          for (int i = 0; i < h.nod; ++i) off += c[h.od[i]] * S[4 + h.od[i]];
          store_val<double>(reinterpret_cast<char*>(S[0]), (int)S[1], off, v);
        } else {
          h.partial[seg * nacc + k] = v;
        }
      }
      if (tpr > 1) __syncthreads();  // sm is reused for the next slot
    }
  }
}

// Combines the nsplit partials of every (output, slot) in a fixed tree.
__global__ void __launch_bounds__(kBlock) k_combine(const __grid_constant__ KParams p) {
  __shared__ double sm[kBlock];
  const KHeader& h = p.h;
  const int64_t* W = h.prog ? h.prog : p.w;
  const int tpr = h.ftpr;
  const int lane = threadIdx.x & (tpr - 1);
  const int gpb = kBlock / tpr;
  const int64_t gib = threadIdx.x / tpr;
  const int nacc = h.nacc;
  const int64_t ngroups = h.nout * nacc;
  for (int64_t base = (int64_t)blockIdx.x * gpb; base < ngroups; base += (int64_t)gridDim.x * gpb) {
    const int64_t g = base + gib;
    int64_t o = 0, k = 0;
    int mode = MODE_SUM;
    double v = 0.0;
    if (g < ngroups) {
      o = divmod(g, nacc, &k);
      mode = h.acc_mode[k];
      v = red_identity(mode);
      for (int64_t ch = lane; ch < h.nsplit; ch += tpr) v = red_combine(mode, v, h.partial[(ch * h.nout + o) * nacc + k]);
    }
    if (tpr > 1) {
      sm[threadIdx.x] = v;
      __syncthreads();
      for (int s = tpr >> 1; s > 0; s >>= 1) {
        if (lane < s) sm[threadIdx.x] = red_combine(mode, sm[threadIdx.x], sm[threadIdx.x + s]);
        __syncthreads();
      }
      v = sm[threadIdx.x];
    }
    if (lane == 0 && g < ngroups) {
      const int64_t* S = W + h.w_stores + (int64_t)h.acc_store[k] * h.sw;
      int64_t off = 0, q = o;
      for (int i = h.nod - 1; i >= 0; --i) {
        const int d = h.od[i];
        int64_t rem;
        q = divmod(q, h.shape[d], &rem);
        off += rem * S[4 + d];
      }
      store_val<double>(reinterpret_cast<char*>(S[0]), (int)S[1], off, v);
    }
    if (tpr > 1) __syncthreads();
  }
}

// Writes `value` to every element of a strided output (empty regions).
__global__ void __launch_bounds__(kBlock) k_fill(const __grid_constant__ FillParams f) {
  const int64_t nthr = (int64_t)gridDim.x * kBlock;
  for (int64_t i = (int64_t)blockIdx.x * kBlock + threadIdx.x; i < f.count; i += nthr) {
    int64_t off = 0, q = i;
    for (int k = f.n - 1; k >= 0; --k) {
      int64_t rem;
      q = divmod(q, f.shape[k], &rem);
      off += rem * f.stride[k];
    }
    store_val<double>(f.ptr, f.dtype, off, f.value);
  }
}

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
