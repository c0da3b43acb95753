"""The C++ source of a region's compiled loop (jit.py compiles and loads it; cuda_codegen.py
writes a CUDA kernel from the same ``statements``).

One element's evaluation is the region's register program written out as C++ statements over
the interpreter's op math (op_math.h), one ``const`` per instruction, so that the compiler keeps
each value in a register. ``source`` wraps it in a loop over elements, or over rows then columns
(row sums added in double in the interpreter's fixed lane order; column sums into a row of
doubles), plus a variant writing whole cache lines with streaming stores.
"""
import math

from . import _C
from .runtime_table import ARITY, OPCODES

_NAMES = {code: name for name, code in OPCODES.items()}
_CTYPE = {0: "float", 1: "double"}
_STORAGE = _C.dtype_storage()  # storage dtype code -> its C++ type (dtype_convert.h)
LOOP = "  for (int64_t i = begin; i < end; ++i) {"  # (the loop that must vectorise)
_LOOP2 = "    for (int64_t j = 0; j < {}; ++j) {{"
_LANES = 16  # double lanes of a row sum (seg_sum's, csrc/vm_cpu_reduce.h)
_LINE = 64  # bytes a streaming loop computes, then stores (fg::kStreamLine, stream_store.h)
STREAM_LOOP = "for (int64_t l = 0; l < "  # (fg_kernel_stream's loops: must vectorise)


def _halve(a, ind):
    """Lines adding lanes ``a`` pairwise, halving to one: seg_sum's tree. One loop of constant
    length per step, which the compiler turns into a vector add in registers; a loop over the
    step (``w /= 2``) it compiled into scalar adds through the stack, stalled on store
    forwarding (log_softmax's row sums over 3906 rows of 256 floats: 235 us a call, 165 now)."""
    out, w = [], _LANES // 2
    while w >= 1:
        out.append(f"{ind}for (int l = 0; l < {w}; ++l) {a}[l] += {a}[l + {w}];")
        w //= 2
    return out


def _fold(a, t, dst, tail):
    """Lines ending a row sum over lanes ``a``: halve pairwise, add the tail, store."""
    return [*_halve(a, "      "), f"      {tail}", f"      {dst} = static_cast<{t}>({a}[0]); }}"]


def _literal(v, ctype):
    if math.isnan(v):
        text = "__builtin_nan(\"\")"
    elif math.isinf(v):
        text = "__builtin_inf()" if v > 0 else "-__builtin_inf()"
    else:
        text = float(v).hex()
    return f"static_cast<{ctype}>({text})"


def statements(region, t, load, store, literal=_literal):
    """One element's evaluation of ``region``'s register program, as C++ statements in compute
    type ``t``: ``const t vJ = ...;`` per instruction J (the interpreter's op math, op_math.h).
    ``load(a)`` is the expression of load a, ``store(k, value)`` the statement of store k (None
    leaves it out); ``literal(v, t)`` writes a constant."""
    lines, cur = [], {}
    for j, (op, dst, a, b, c) in enumerate(region.instrs):
        name = _NAMES[op]
        if name == "store":
            line = store(a, cur[b])
            if line is not None:
                lines.append(line)
            continue
        if name == "load":
            expr = load(a)
        elif name == "const":
            expr = literal(region.consts[a], t)
        elif name == "iota":
            raise ValueError("iota is not compiled")
        else:
            args = ", ".join(cur[r] for r in (a, b, c)[:ARITY[name]])
            expr = f"fg::fg_{name.upper()}<{t}>({args})"
        lines.append(f"const {t} v{j} = {expr};")
        cur[dst] = f"v{j}"
    return lines


def source(region, kinds, compute, inner=None, modes=None, columns=False, dtypes=None):
    """C++ source of the loop computing ``region`` (a plan_steps.Region, or anything with its loads,
    stores, instrs and consts). ``kinds[i]``: how load i is read (its Program's load_kinds:
    "s" one value, "c" contiguous, "r" one value per row, "k" one row for all rows);
    ``dtypes[i]``: its storage dtype code (its Program's load_dtypes; default: the compute
    type's), which only a single value may differ in (converted once). With ``inner``
    (the column count; split > 0) the loop runs over rows, then over the ``inner`` columns.
    ``modes[k]``: 0 store k is elementwise, 1 it is one sum per row (inner > 0), added in double
    in seg_sum's fixed order as the column loop computes the values (or from a loaded row);
    with ``columns`` (its Program's column_sums) a sum store is a row of doubles over the
    columns, each element added into its column (csrc/program.h, run_columns)."""
    if columns:
        return _column_source(region, kinds, compute, inner, modes, dtypes)
    t = _CTYPE[compute]
    nl = len(region.loads)
    modes = modes or [0] * len(region.stores)
    after = []
    ix = "j" if inner else "i"
    # which value each sum store adds (register names as the body below gives them)
    # and which values are a contiguous load's, read from a row pointer (with rows)
    sum_of, names, direct = {}, {}, {}
    for j, (op, dst, a, b, c) in enumerate(region.instrs):
        if _NAMES[op] == "store":
            if modes[a]:
                sum_of[a] = names[b]
        else:
            names[dst] = f"v{j}"
            if _NAMES[op] == "load" and inner and kinds[a] == "c":
                direct[f"v{j}"] = f"R{a}"
    head, row = _load_lines(kinds, t, inner, compute, dtypes)
    lanes = []  # (store k, value added): sums of values the column loop computes
    for k, mode in enumerate(modes):
        head.append(f"  {t}* __restrict S{k} = reinterpret_cast<{t}*>(p[{nl + k}]);")
        if mode:
            if not inner:
                raise ValueError("a sum store needs rows (split > 0)")
            src = direct.get(sum_of[k]) if k in sum_of else None
            if src is None:  # added as the column loop computes it
                lanes.append((k, sum_of[k]))
                continue
            # a loaded row: added from the row itself
            after += [f"    {{ double a[{_LANES}] = {{}}; int64_t j = 0;",
                      f"      for (; j + {_LANES} <= {inner}; j += {_LANES})",
                      f"        for (int l = 0; l < {_LANES}; ++l) a[l] += {src}[j + l];",
                      *_fold("a", t, f"S{k}[r]", f"for (; j < {inner}; ++j) a[0] += {src}[j];")]
        elif inner:
            row.append(f"    {t}* __restrict T{k} = S{k} + r * {inner};")
    read = {"s": "s{0}", "r": "s{0}", "k": "L{0}[j]", "c": ("R{0}[j]" if inner else "L{0}[i]")}

    def store(k, value):
        if modes[k]:
            return None  # a row sum: added by the loops below
        return f"{'T' if inner else 'S'}{k}[{ix}] = {value};"

    body = statements(region, t, lambda a: read[kinds[a]].format(a), store)
    # The loop also comes as fg_kernel_stream, which writes its elementwise outputs a cache line
    # at a time with streaming stores (stream_store.h): each line's values are computed into a
    # local array the compiler keeps in registers, then stored from there. For outputs larger
    # than the caches that nothing reads soon (csrc/program.cpp decides, and checks the lines
    # are aligned). Not for loops adding row sums as they go, nor over rows whose length is not
    # a whole number of lines.
    streamed = [k for k, mode in enumerate(modes) if not mode]
    stream = None
    w = _LINE // (4 if compute == 0 else 8)  # elements per line
    if streamed and not lanes:
        body_s = statements(region, t, lambda a: read[kinds[a]].format(a),
                            lambda k, v: None if modes[k] else f"B{k}[l] = {v};")
        bufs = [f"alignas(64) {t} B{k}[{w}];" for k in streamed]

        def lines(ix, out, ind):
            # (unroll 1: unrolled first, GCC vectorises the line's statements without the
            # transcendentals' vector variants; as a loop, with them)
            return ["#pragma GCC unroll 1", f"{ind}{STREAM_LOOP}{w}; ++l) {{",
                    f"{ind}  const int64_t {ix} = {ix}0 + l;", *[f"{ind}  {x}" for x in body_s],
                    f"{ind}}}", *[f"{ind}fg::stream_line({out}{k} + {ix}0, B{k});" for k in streamed]]
        if inner and inner % w == 0 and any("] = " in x for x in body_s):
            stream = ["  for (int64_t r = begin; r < end; ++r) {", *row,
                      f"    for (int64_t j0 = 0; j0 < {inner}; j0 += {w}) {{",
                      *["      " + x for x in bufs], *lines("j", "T", "      "), "    }",
                      *after, "  }"]
        elif not inner:
            stream = ["  int64_t i0 = begin;", f"  for (; i0 + {w} <= end; i0 += {w}) {{",
                      *["    " + x for x in bufs], *lines("i", "S", "    "), "  }",
                      "  for (int64_t i = i0; i < end; ++i) {", *["    " + x for x in body], "  }"]
    if inner and lanes:
        # Sums in 16 double lanes, halved pairwise, then the row's last columns: the
        # interpreter's seg_sum order (csrc/vm_cpu_reduce.h). The values are added as they are
        # computed (a row buffer written then read back stalled on store forwarding), and four
        # vector accumulators keep adds in flight: about 1.7x faster on rows in cache.
        acc = [f"    double a{k}[{_LANES}] = {{}};" for k, _ in lanes]
        add = lambda lane: [f"a{k}[{lane}] += {v};" for k, v in lanes]  # noqa: E731
        cols = [*acc, "    int64_t j0 = 0;",
                f"    for (; j0 + {_LANES} <= {inner}; j0 += {_LANES})",
                f"      for (int l = 0; l < {_LANES}; ++l) {{",
                "        const int64_t j = j0 + l;",
                *["        " + line for line in body + add("l")], "      }"]
        for k, _ in lanes:
            cols += _halve(f"a{k}", "    ")
        cols += [f"    for (int64_t j = j0; j < {inner}; ++j) {{",
                 *["      " + line for line in body + add("0")], "    }"]
        cols += [f"    S{k}[r] = static_cast<{t}>(a{k}[0]);" for k, _ in lanes]
        loop = ["  for (int64_t r = begin; r < end; ++r) {", *row, *cols, *after, "  }"]
    elif inner:
        # (no store left in the column loop: it computes nothing, and is left out)
        body = ["      " + line for line in body]
        cols = [_LOOP2.format(inner), *body, "    }"] \
            if any("] = " in line for line in body) else []
        loop = ["  for (int64_t r = begin; r < end; ++r) {", *row, *cols, *after, "  }"]
    else:
        loop = [LOOP, *["    " + line for line in body], "  }"]
    return _kernel(head, loop, stream=stream)


def _load_lines(kinds, t, inner, compute, dtypes=None):
    """(head, row): a loop's lines for its loads, before the loop and (with rows) at the start
    of each row."""
    head, row = [], []
    for i, kind in enumerate(kinds):
        if dtypes is not None and dtypes[i] != compute:  # (dtype codes 0, 1 are float, double)
            if kind != "s":
                raise ValueError("only a single value may be loaded from another dtype")
            st = _STORAGE[dtypes[i]]
            head += [f"  const {st}* __restrict L{i} = reinterpret_cast<const {st}*>(p[{i}]);",
                     f"  const {t} s{i} = fg::from_storage<{t}>(L{i}[0]);"]
            continue
        head.append(f"  const {t}* __restrict L{i} = reinterpret_cast<const {t}*>(p[{i}]);")
        if kind == "s":
            head.append(f"  const {t} s{i} = L{i}[0];")
        elif kind == "r":
            row.append(f"    const {t} s{i} = L{i}[r];")
        elif kind == "c" and inner:
            row.append(f"    const {t}* __restrict R{i} = L{i} + r * {inner};")
    return head, row


def _kernel(head, loop, what="", stream=None):
    """The library's source: fg_kernel, and with ``stream`` (its loop lines) fg_kernel_stream,
    the same loop writing its contiguous outputs with streaming stores."""
    second = [] if stream is None else [
        'extern "C" void fg_kernel_stream(char* const* p, int64_t begin, int64_t end) {',
        *head, *stream, "}"]
    return "\n".join([
        f"// generated by fastgrad.jit from a region's register program{what}",
        "#include <stdint.h>",
        '#include "op_math.h"',
        '#include "dtype_convert.h"',
        '#include "stream_store.h"',
        'extern "C" void fg_kernel(char* const* p, int64_t begin, int64_t end) {',
        *head, *loop, "}", *second, ""])


def _column_source(region, kinds, compute, inner, modes, dtypes):
    """source() for column sums: rows, then the ``inner`` columns, each sum store's value added
    into its column of a row of doubles (one per chunk of rows, given by run_columns)."""
    t = _CTYPE[compute]
    nl = len(region.loads)
    head, row = _load_lines(kinds, t, inner, compute, dtypes)
    for k, mode in enumerate(modes):
        if mode:
            head.append(f"  double* __restrict A{k} = reinterpret_cast<double*>(p[{nl + k}]);")
        else:
            head.append(f"  {t}* __restrict S{k} = reinterpret_cast<{t}*>(p[{nl + k}]);")
            row.append(f"    {t}* __restrict T{k} = S{k} + r * {inner};")
    read = {"s": "s{0}", "r": "s{0}", "k": "L{0}[j]", "c": "R{0}[j]"}

    def store(k, value):
        return f"A{k}[j] += static_cast<double>({value});" if modes[k] else f"T{k}[j] = {value};"

    body = statements(region, t, lambda a: read[kinds[a]].format(a), store)
    loop = ["  for (int64_t r = begin; r < end; ++r) {", *row, _LOOP2.format(inner),
            *["      " + line for line in body], "    }", "  }"]
    return _kernel(head, loop, " (column sums)")
