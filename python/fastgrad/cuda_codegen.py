"""CUDA source of a region's kernel (compiled by fastgrad.cuda_jit).

``layout(desc)`` reads a packed region (runtime._Packer.desc, the descriptor csrc/vm.h
documents) and says how its kernel indexes memory, or None when no kernel here fits it;
``source(region, layout, compute)`` writes the kernel from the region's own register program
(``loop_source.statements``: the interpreter's op math, op_math.h, and its storage conversions,
dtype_convert.h). The region's shape, strides and offsets are constants of the source, so the
compiler turns the index arithmetic into a few multiplies (no division by a variable).

Two kernels:

* elementwise (no reducing store): each thread evaluates PER_THREAD elements BLOCK apart
  (coalesced), at flat index i over the region's shape; a full block reads all its
  contiguous loads before it computes;
* rows (every reducing store reduces the same trailing dims; rows of at most _MAX_SHORT_ROW
  elements, or at least _MANY_ROWS rows):
  one warp per row; each lane evaluates the row's elements lane, lane + 32, ...; reductions
  accumulate per lane in double (as the interpreter does) and combine across the warp in a
  fixed butterfly, so the result depends only on the shape. Reductions over leading dims
  (column sums) and fewer rows stay with the interpreter, which splits them;

and, for a row group (plan_steps.RowGroup: regions over the same leading row dims, each reading what
an earlier one wrote only in its own row), one kernel of the second kind whose warps take their
row through every region in turn (``group_source``), so the row is still in cache when the next
region reads it (softmax's VJP: the row sum, then the elementwise part).

A load is read as "s" (one value, read once per thread), "c" (contiguous like the region: the
element at i) or "g" (anything else: the element's coordinates times the strides, plus the
load's predicates, as vm_cpu.cpp evaluates them: an embed reads zero outside its window).
Assigning stores are "c" or "g"; a store that writes one address from several elements does
not fit.
"""
import math
import struct

from . import _C, loop_source

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
# A row group's kernel with fewer rows than _MANY_ROWS only up to this many elements per region:
# its elementwise regions would otherwise run on a warp per row, far fewer threads than their
# own kernels' (where a call is that small, one launch instead of several is the gain).
_SMALL_GROUP = 1 << 20
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


def _emit(region, lay, t, tag="", shared=()):
    """A region's part of a kernel: (params, head, load, store, pre). Its pointers are named
    L{tag}{a} / S{tag}{k} (``tag`` keeps a group's regions apart); ``shared`` names the loads and
    stores (("L", a), ("S", k)) through which regions of one kernel pass values: they are not
    __restrict__, so that no load of them goes through the read-only cache."""
    shape = lay.shape
    params, head, pre = [], [], {}  # pre: load -> its predicates' window coordinates

    def restrict(key):
        return "" if key in shared else " __restrict__"
    for a, (kind, off, dt, strides, preds) in enumerate(lay.loads):
        params.append(f"const {_STORAGE[dt]}*{restrict(('L', a))} L{tag}{a}")
        if kind == "s":
            head.append(f"const {t} s{a} = fg::from_storage<{t}>(L{tag}{a}[{off}]);")
    for k, (mode, dt, strides, kind) in enumerate(lay.stores):
        params.append(f"{_STORAGE[dt]}*{restrict(('S', k))} S{tag}{k}")

    def load(a, fetched=False):
        kind, off, dt, strides, preds = lay.loads[a]
        if kind == "s":
            return f"s{a}"
        if kind == "c":
            at = f"P{a}[u]" if fetched and PREFETCH else f"L{tag}{a}[{off} + i]"
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
        value = f"fg::from_storage<{t}>(L{tag}{a}[{at}])"
        return f"(({' && '.join(ok)}) ? {value} : {t}(0))" if ok else value

    def store(k, v):
        mode, dt, strides, kind = lay.stores[k]
        if mode:
            return f"a{k} = {_combine(mode, f'a{k}', f'double({v})')};"
        at = "i" if kind == "c" else _offset(0, strides, shape)
        return f"S{tag}{k}[{at}] = fg::to_storage<{_STORAGE[dt]}>({v});"

    return params, head, load, store, pre


def _body(region, t, load, store, pre):
    body = loop_source.statements(region, t, load, store, _literal)
    # the predicates' window coordinates, ahead of the statements that read them
    return [line for lines in pre.values() for line in lines] + body


def _general(lay):
    """Whether some load or store needs the element's coordinates."""
    return any(k == "g" for k, *_ in lay.loads) or any(k == "g" for *_, k in lay.stores)


def _elementwise(region, lay, t, load, store, pre):
    nd = len(lay.shape)
    coords = _unravel("i", range(nd), lay.shape, "e") if _general(lay) else []
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
    body = _body(region, t, load, store, pre)
    full = _body(region, t, lambda a: load(a, True), store, pre)
    return [f"const long first = (long)blockIdx.x * {BLOCK * PER_THREAD} + threadIdx.x;",
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
            *["  " + line for line in coords + body],
            "}"]


def _row_start(rows):
    """A warp per row: ``r`` (the row) and ``lane``; warps past the last row leave."""
    return [f"const long r = (long)blockIdx.x * {ROWS_PER_BLOCK} + (threadIdx.x >> 5);",
            f"if (r >= {rows}L) return;",
            "const int lane = threadIdx.x & 31;"]


def _row(region, lay, t, tag, load, store, pre):
    """Row ``r`` of a region (split: its reductions, if any, over the trailing dims): the
    lanes evaluate the row's elements lane, lane + 32, ...; the reductions combine across the
    warp, and lane 0 stores them."""
    shape, nd, split = lay.shape, len(lay.shape), lay.split
    inner = math.prod(shape[split:])
    red = [k for k, s in enumerate(lay.stores) if s[0]]
    ident = {1: "0.0", 2: "-__longlong_as_double(0x7ff0000000000000LL)",
             3: "__longlong_as_double(0x7ff0000000000000LL)"}
    cols = _unravel("j", range(split, nd), shape, "j") if _general(lay) else []
    out = [*_unravel("r", range(split), shape, "r"),
           *[f"double a{k} = {ident[lay.stores[k][0]]};" for k in red],
           f"for (long j = lane; j < {inner}L; j += 32) {{",
           f"  const long i = r * {inner}L + j;",
           *["  " + line for line in cols + _body(region, t, load, store, pre)],
           "}"]
    if red:
        out.append("for (int o = 16; o > 0; o >>= 1) {")
        for k in red:
            other = f"__shfl_xor_sync(0xffffffffu, a{k}, o)"
            out.append(f"  a{k} = {_combine(lay.stores[k][0], f'a{k}', other)};")
        out += ["}", "if (lane == 0) {"]
        for k in red:
            mode, dt, strides, _ = lay.stores[k]
            out.append(f"  S{tag}{k}[{_offset(0, strides, shape, range(split))}] = "
                       f"fg::to_storage<{_STORAGE[dt]}>(a{k});")
        out.append("}")
    return out


def _kernel(params, lines):
    return "\n".join([
        "// generated by fastgrad.cuda_codegen from a region's register program",
        '#include "op_math.h"',
        '#include "dtype_convert.h"',
        f'extern "C" __global__ void __launch_bounds__({BLOCK}) '
        f'fg_kernel({", ".join(params)}) {{',
        *["  " + line for line in lines],
        "}", ""])


def source(region, lay, compute):
    """CUDA source of ``region``'s kernel (``fg_kernel(L0.., S0..)``) for Layout ``lay``."""
    t = _CTYPE[compute]
    params, head, load, store, pre = _emit(region, lay, t)
    if lay.split is None:
        return _kernel(params, head + _elementwise(region, lay, t, load, store, pre))
    return _kernel(params, head + _row_start(lay.rows) +
                   _row(region, lay, t, "", load, store, pre))


def group_layouts(lays, dims):
    """The Layouts of a row group's regions (plan_steps.RowGroup) as parts of one kernel, a warp per
    row over the leading ``dims``: an elementwise region's becomes a row layout too. None where
    no such kernel fits (a region without a kernel of its own, a reduction over other dims,
    few rows, unless the regions are small)."""
    k = len(dims)
    if tuple(dims) != tuple(range(k)) or not lays or any(lay is None for lay in lays):
        return None
    lead = lays[0].shape[:k]
    rows, out = math.prod(lead), []
    for lay in lays:
        if lay.shape[:k] != lead or lay.split not in (None, k):
            return None
        if rows < _MANY_ROWS and (math.prod(lay.shape[k:]) > _MAX_SHORT_ROW or
                                  lay.numel > _SMALL_GROUP):
            return None
        out.append(Layout(lay.shape, k, lay.loads, lay.stores))
    return out if -(-rows // ROWS_PER_BLOCK) <= _MAX_GRID else None


def group_source(regions, lays, computes):
    """CUDA source of one kernel running a row group's ``regions`` (Layouts from group_layouts,
    compute dtype codes ``computes``): each warp takes a row through every region in turn, so a
    region reads what the earlier ones wrote for its row (its reductions, its elements) while
    that is still in cache. The parameters are each region's loads, then its stores."""
    made = {id(t) for r in regions for t in r.targets}
    read = {id(r.inputs[ix]) for r in regions for ix, _ in r.loads}
    params, lines = [], _row_start(lays[0].rows)
    for g, (region, lay, compute) in enumerate(zip(regions, lays, computes)):
        t, tag = _CTYPE[compute], f"{g}_"
        shared = {("L", a) for a, (ix, _) in enumerate(region.loads)
                  if id(region.inputs[ix]) in made}
        shared |= {("S", k) for k, (ti, _) in enumerate(region.stores)
                   if id(region.targets[ti]) in read}
        p, head, load, store, pre = _emit(region, lay, t, tag, shared)
        params += p
        if g:  # (every lane sees what the others stored for this row)
            lines.append("__syncwarp();")
        lines += ["{", *["  " + line for line in head + _row(region, lay, t, tag, load, store,
                                                              pre)], "}"]
    return _kernel(params, lines)
