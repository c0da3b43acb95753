"""CUDA source of a region's kernel (compiled by fastgrad.cuda_jit).

``layout(desc)`` reads a packed region (runtime._Packer.desc, the descriptor csrc/vm.h
documents) and says how its kernel indexes memory, or None when no kernel here fits it;
``source(region, layout, compute)`` writes the kernel from the region's own register program
(``jit.statements``: the interpreter's op math, op_math.h, and its storage conversions,
dtype_convert.h). The region's shape, strides and offsets are constants of the source, so the
compiler turns the index arithmetic into a few multiplies (no division by a variable).

Two kernels:

* elementwise (no reducing store): each thread evaluates _PER_THREAD elements _BLOCK apart
  (coalesced), at flat index i over the region's shape;
* rows (every reducing store reduces the same trailing dims; rows of at most _MAX_SHORT_ROW
  elements, or at least _MANY_ROWS rows):
  one warp per row; each lane evaluates the row's elements lane, lane + 32, ...; reductions
  accumulate per lane in double (as the interpreter does) and combine across the warp in a
  fixed butterfly, so the result depends only on the shape. Reductions over leading dims
  (column sums) and fewer rows stay with the interpreter, which splits them.

A load is read as "s" (one value, read once per thread), "c" (contiguous like the region: the
element at i) or "g" (anything else: the element's coordinates times the strides, plus the
load's predicates, as vm_cpu.cpp evaluates them: an embed reads zero outside its window).
Assigning stores are "c" or "g"; a store that writes one address from several elements does
not fit.
"""
import math
import struct

from . import _C, jit

_CTYPE = {0: "float", 1: "double"}
_STORAGE = {code: ("fg::" + c if c in ("half_t", "bf16_t") else c)
            for code, c in _C.dtype_storage().items()}
BLOCK, PER_THREAD = 256, 8  # threads per block; elements per thread (elementwise kernel)
PREFETCH = True  # full blocks read all their contiguous loads first (see source)
ROWS_PER_BLOCK = BLOCK // 32
# Rows longer than _MAX_SHORT_ROW, fewer than _MANY_ROWS of them: the interpreter, which splits
# a row over blocks (a warp per row would leave most of the GPU idle: an H100/H200 holds 8448
# warps at once).
_MAX_SHORT_ROW, _MANY_ROWS = 4096, 8192
_MAX_GRID = (1 << 31) - 1
_MODES = {1: "sum", 2: "max", 3: "min"}  # reducing store modes (vm.h MODE_*)


class Layout:
    """How a region's kernel indexes memory: ``shape``; ``split`` (None: elementwise, else the
    number of leading row dims; the rest are reduced); ``loads``: (kind, offset, dtype,
    strides, predicates) each; ``stores``: (mode, dtype, strides, kind) each."""

    def __init__(self, shape, split, loads, stores):
        self.shape, self.split, self.loads, self.stores = shape, split, loads, stores

    @property
    def numel(self):
        return math.prod(self.shape)

    @property
    def rows(self):
        return math.prod(self.shape[:self.split]) if self.split is not None else None

    def grid(self):
        if self.split is None:
            return -(-self.numel // (BLOCK * PER_THREAD))
        return -(-self.rows // ROWS_PER_BLOCK)


def _contiguous(shape):
    out, acc = [0] * len(shape), 1
    for d in reversed(range(len(shape))):
        out[d] = acc
        acc *= shape[d]
    return out


def _same(strides, want, shape):
    return all(s == w or n == 1 for s, w, n in zip(strides, want, shape))


def layout(desc):
    """The Layout of packed region ``desc``, or None when no kernel here fits it."""
    nd, nl, ns = desc[0], desc[1], desc[2]
    shape = list(desc[5:5 + nd])
    if math.prod(shape) == 0:
        return None
    cont = _contiguous(shape)
    pos, loads, stores = 5 + nd, [], []
    for _ in range(nl):
        dtype, offset = desc[pos + 1], desc[pos + 2]
        strides, npreds = list(desc[pos + 3:pos + 3 + nd]), desc[pos + 3 + nd]
        preds = [tuple(desc[pos + 4 + nd + 6 * q:pos + 10 + nd + 6 * q]) for q in range(npreds)]
        pos += 4 + nd + 6 * npreds
        if not preds and _same(strides, [0] * nd, shape):
            kind = "s"
        elif not preds and _same(strides, cont, shape):
            kind = "c"
        else:
            kind = "g"
        loads.append((kind, offset, dtype, strides, preds))
    reduced = None
    for _ in range(ns):
        dtype, mode, strides = desc[pos + 1], desc[pos + 2], list(desc[pos + 3:pos + 3 + nd])
        pos += 3 + nd
        zero = {d for d in range(nd) if shape[d] > 1 and strides[d] == 0}
        if mode:
            if reduced is not None and zero != reduced:
                return None  # (reductions over different dims)
            reduced = zero
            stores.append((mode, dtype, strides, "r"))
        elif zero:
            return None  # several elements would write one address
        else:
            stores.append((mode, dtype, strides, "c" if _same(strides, cont, shape) else "g"))
    split = None
    if reduced is not None:
        # the reduced dims must be the trailing ones (of those longer than 1)
        split = min(reduced, default=nd)
        if any(shape[d] > 1 and d not in reduced for d in range(split, nd)):
            return None
        if not reduced:  # (only dims of size 1 reduced: one element per warp; rare)
            return None
        if math.prod(shape[:split]) < _MANY_ROWS and math.prod(shape[split:]) > _MAX_SHORT_ROW:
            return None
    lay = Layout(shape, split, loads, stores)
    return lay if lay.grid() <= _MAX_GRID else None


def _combine(mode, a, b):
    """The reducing store's combination of two doubles (vm.h MODE_*: NaN-propagating max/min)."""
    op = _MODES[mode]
    return f"{a} + {b}" if op == "sum" else f"fg::fg_{op.upper()}<double>({a}, {b})"


def _literal(v, t):
    # Bits, not text: exact for every double, NaN and inf included (no C library in NVRTC).
    bits = struct.unpack("<Q", struct.pack("<d", float(v)))[0]
    return f"static_cast<{t}>(__longlong_as_double((long long){bits:#x}ULL))"


def _unravel(var, dims, shape, prefix):
    """Statements giving coordinates ``{prefix}d`` of flat index ``var`` over ``dims``."""
    dims = [d for d in dims if shape[d] > 1]
    if not dims:
        return []
    out = [f"long {prefix}q = {var};"]
    for d in reversed(dims[1:]):
        out.append(f"const long c{d} = {prefix}q % {shape[d]}L; {prefix}q /= {shape[d]}L;")
    out.append(f"const long c{dims[0]} = {prefix}q;")
    return out


def _offset(base, strides, shape, dims=None):
    terms = [str(base)] + [f"c{d} * {s}L" for d, s in enumerate(strides)
                           if s and shape[d] > 1 and (dims is None or d in dims)]
    return " + ".join(terms)


def source(region, lay, compute):
    """CUDA source of ``region``'s kernel (``fg_kernel(L0.., S0..)``) for Layout ``lay``."""
    t = _CTYPE[compute]
    shape, nd, split = lay.shape, len(lay.shape), lay.split
    params, head, pre = [], [], {}  # pre: load -> its predicates' window coordinates
    for a, (kind, off, dt, strides, preds) in enumerate(lay.loads):
        params.append(f"const {_STORAGE[dt]}* __restrict__ L{a}")
        if kind == "s":
            head.append(f"const {t} s{a} = fg::from_storage<{t}>(L{a}[{off}]);")
    for k, (mode, dt, strides, kind) in enumerate(lay.stores):
        params.append(f"{_STORAGE[dt]}* __restrict__ S{k}")

    def load(a, fetched=False):
        kind, off, dt, strides, preds = lay.loads[a]
        if kind == "s":
            return f"s{a}"
        if kind == "c":
            at = f"P{a}[u]" if fetched and PREFETCH else f"L{a}[{off} + i]"
            return f"fg::from_storage<{t}>({at})"
        ok, window = [], []
        at = _offset(off, strides, shape)
        for q, (dim, mul, add, div, length, st) in enumerate(preds):
            v = f"p{a}_{q}"
            window.append(f"const long {v} = {mul}L * c{dim} + {add}L;" if shape[dim] > 1
                          else f"const long {v} = {add}L;")
            ok.append(f"{v} >= 0" + (f" && {v} % {div}L == 0" if div != 1 else "") +
                      f" && {v} / {div}L < {length}L")
            at += f" + ({v} / {div}L) * {st}L"
        pre[a] = window  # (once per load record, however many instructions read it)
        value = f"fg::from_storage<{t}>(L{a}[{at}])"
        return f"(({' && '.join(ok)}) ? {value} : {t}(0))" if ok else value

    def store(k, v):
        mode, dt, strides, kind = lay.stores[k]
        if mode:
            return f"a{k} = {_combine(mode, f'a{k}', f'double({v})')};"
        at = "i" if kind == "c" else _offset(0, strides, shape)
        return f"S{k}[{at}] = fg::to_storage<{_STORAGE[dt]}>({v});"

    body = jit.statements(region, t, load, store, _literal)
    # the predicates' window coordinates, ahead of the statements that read them
    body = [line for lines in pre.values() for line in lines] + body
    need = any(k == "g" for k, *_ in lay.loads) or any(k == "g" for *_, k in lay.stores)
    if split is None:
        coords = _unravel("i", range(nd), shape, "e") if need else []
        each = ["  " + line for line in coords + body]
        # A block whose elements all exist first reads every element's contiguous loads, then
        # computes and stores: all its loads are in flight at once (with a bounds check per
        # element, each load waits behind the previous element's store). The last block checks.
        fetch = []
        for a, (kind, off, dt, *_) in enumerate(lay.loads):
            if kind == "c" and PREFETCH:
                fetch += [f"{_STORAGE[dt]} P{a}[{PER_THREAD}];",
                          "#pragma unroll",
                          f"for (int u = 0; u < {PER_THREAD}; ++u) "
                          f"P{a}[u] = L{a}[{off} + first + u * {BLOCK}];"]
        full = [line for lines in pre.values() for line in lines] + \
            jit.statements(region, t, lambda a: load(a, True), store, _literal)
        loop = [f"const long first = (long)blockIdx.x * {BLOCK * PER_THREAD} + threadIdx.x;",
                f"if ((long)blockIdx.x * {BLOCK * PER_THREAD} + {BLOCK * PER_THREAD} <= "
                f"{lay.numel}L) {{",
                *["  " + line for line in fetch],
                "  #pragma unroll",
                f"  for (int u = 0; u < {PER_THREAD}; ++u) {{",
                f"    const long i = first + u * {BLOCK};",
                *["    " + line for line in coords + full],
                "  }",
                "  return;",
                "}",
                "#pragma unroll",
                f"for (int u = 0; u < {PER_THREAD}; ++u) {{",
                f"  const long i = first + u * {BLOCK};",
                f"  if (i >= {lay.numel}L) break;",
                *each,
                "}"]
    else:
        inner = math.prod(shape[split:])
        red = [k for k, s in enumerate(lay.stores) if s[0]]
        ident = {1: "0.0", 2: "-__longlong_as_double(0x7ff0000000000000LL)",
                 3: "__longlong_as_double(0x7ff0000000000000LL)"}
        loop = [f"const long r = (long)blockIdx.x * {ROWS_PER_BLOCK} + (threadIdx.x >> 5);",
                f"if (r >= {lay.rows}L) return;",
                "const int lane = threadIdx.x & 31;",
                *_unravel("r", range(split), shape, "r"),
                *[f"double a{k} = {ident[lay.stores[k][0]]};" for k in red],
                f"for (long j = lane; j < {inner}L; j += 32) {{",
                f"  const long i = r * {inner}L + j;",
                *["  " + line for line in (_unravel("j", range(split, nd), shape, "j")
                                           if need else []) + body],
                "}",
                "for (int o = 16; o > 0; o >>= 1) {"]
        for k in red:
            other = f"__shfl_xor_sync(0xffffffffu, a{k}, o)"
            loop.append(f"  a{k} = {_combine(lay.stores[k][0], f'a{k}', other)};")
        loop.append("}")
        loop.append("if (lane == 0) {")
        for k in red:
            mode, dt, strides, _ = lay.stores[k]
            loop.append(f"  S{k}[{_offset(0, strides, shape, range(split))}] = "
                        f"fg::to_storage<{_STORAGE[dt]}>(a{k});")
        loop.append("}")
    return "\n".join([
        "// generated by fastgrad.cuda_codegen from a region's register program",
        '#include "op_math.h"',
        '#include "dtype_convert.h"',
        f'extern "C" __global__ void __launch_bounds__({BLOCK}) '
        f'fg_kernel({", ".join(params)}) {{',
        *["  " + line for line in head + loop],
        "}", ""])
