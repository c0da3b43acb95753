// The CUDA evaluator's device code: helpers and kernels (k_elem, k_seg, k_combine, k_fill).
// Included once, by vm_cuda.cu, inside its anonymous namespace after the parameter structs
// (KHeader, KParams, FillParams) and constants it uses: one translation unit, split only to
// keep each file short. The design is in vm_cuda.cu's opening comment.
#pragma once

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
