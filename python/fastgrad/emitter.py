"""A region's register program: plan.build decides what each region computes (its targets, over
its iteration space); the Emitter turns that into the VM's instructions.

It walks each target's expression with an index map per dimension, so that view ops cost no
pass: expand, permute, trivial reshape and slice rewrite the map pushed down to the loads, and
``embed`` (the VJP of a slice) becomes a predicated load or a constant 0. Values are emitted once
(common subexpressions by register, loads by the tensor they read), rounded after every op to a
narrower dtype as PyTorch computes them, and given physical registers by a linear scan that keeps
a block's working set small.
"""
import torch

from . import ir
from .runtime_table import ARITY as _ARITY, OPCODES

REDUCE_MODE = {"rsum": 1, "rmax": 2, "rmin": 3}  # a target's reduction, as a store's mode
_COMMUTATIVE = {"add", "mul"}
_POW_SPECIAL = (0.0, 1.0, 0.5, -0.5, -1.0, 2.0, 3.0, -2.0)
_ROUND = {torch.float32: "to_f32", torch.float16: "to_f16", torch.bfloat16: "to_bf16"}


class Emitter:
    def __init__(self, region, loadable):
        self.r, self.loadable = region, loadable
        self.memo, self.input_ix, self.loaded = {}, {}, {}
        self.cse, self.const_ix = {}, {}
        self.code = []  # (op name, dst, a, b, c) with virtual registers
        self.nvirt = 0
        self.dtypes = set()

    def reg(self):
        self.nvirt += 1
        return self.nvirt - 1

    def instr(self, op, a=0, b=0, c=0):
        # Registers are virtual (each written once) until _allocate, so the same op on the same
        # registers is the same value: different IR nodes computing one thing (t*t from tanh's
        # derivative and from t**2, nodes bound to one load) emit it once.
        if op in _COMMUTATIVE and a > b:
            a, b = b, a
        key = (op, a, b, c)
        d = self.cse.get(key) if op not in ("load", "store") else None
        if d is None:
            d = self.cse[key] = self.reg()
            self.code.append((op, d, a, b, c))
        return d

    def const(self, v):
        key = repr(float(v))  # tells -0.0 from 0.0
        ix = self.const_ix.get(key)
        if ix is None:
            ix = self.const_ix[key] = len(self.r.consts)
            self.r.consts.append(float(v))
        return self.instr("const", ix)

    def load(self, n, imap):
        # Different nodes bound to the same tensor (a saved value that is both a leaf and, say,
        # tanh's known result) are one input and one load.
        ident = (n.known, n.shape) if n.known is not None else id(n)
        ix = self.input_ix.get(ident)
        if ix is None:
            ix = self.input_ix[ident] = len(self.r.inputs)
            self.r.inputs.append(n)
        reg = self.loaded.get((ix, imap))
        if reg is None:
            self.r.loads.append((ix, imap))
            reg = self.loaded[(ix, imap)] = self.instr("load", len(self.r.loads) - 1)
        return reg

    def emit(self, n, imap, top=False):
        key = (id(n), imap)
        reg = self.memo.get(key)
        if reg is None:
            reg = self.memo[key] = self._emit(n, imap, top)
        return reg

    def _emit(self, n, imap, top):
        if n.dtype is not None:
            self.dtypes.add(n.dtype)
        if not top and self.loadable(n):
            return self.load(n, imap)
        op = n.op
        if op == "const":
            return self.const(n.attrs[0])
        if op in ("slot", "tie", "tie_grad"):
            return self.emit(n.args[0], imap)
        if op == "zeros":
            return self.const(0.0)
        if op == "iota":
            e = imap[n.attrs[0]]
            if e[0] == "c":
                return self.const(e[1])
            return self.instr("iota", e[1], self._c(e[2]), self._c(e[3]))
        if op == "cast":
            x = self.emit(n.args[0], imap)
            return self._round(x, n.dtype)
        if op == "expand":
            x = n.args[0]
            return self.emit(x, tuple(("c", 0) if xs == 1 and s != 1 else e
                                      for xs, s, e in zip(x.shape, n.shape, imap)))
        if op == "permute":
            sub = [None] * n.ndim
            for i, p in enumerate(n.attrs[0]):
                sub[p] = imap[i]
            return self.emit(n.args[0], tuple(sub))
        if op == "reshape":  # only trivial reshapes reach here
            it = iter([e for s, e in zip(n.shape, imap) if s != 1])
            return self.emit(n.args[0], tuple(next(it) if s != 1 else ("c", 0)
                                              for s in n.args[0].shape))
        if op == "slice":
            dim, start, step, _ = n.attrs
            e = imap[dim]
            e = ("c", start + step * e[1]) if e[0] == "c" else \
                ("d", e[1], e[2] * step, e[3] * step + start)
            return self.emit(n.args[0], imap[:dim] + (e,) + imap[dim + 1:])
        if op == "embed":
            dim, start, step, _ = n.attrs
            x = n.args[0]
            e = imap[dim]
            if e[0] == "c":
                t = e[1] - start
                if t < 0 or t % step or t // step >= x.shape[dim]:
                    return self.const(0.0)
                e = ("c", t // step)
            else:
                e = ("q", e[1], e[2], e[3] - start, step, x.shape[dim])
            xmap = imap[:dim] + (e,) + imap[dim + 1:]
            if self.loadable(x):
                return self.load(x, xmap)
            # A squeeze-like reshape of a loaded tensor (as after select): map the remaining
            # dims; a predicate on a dropped size-1 dim still decides validity (stride 0).
            base = x.args[0]
            kept = [e for s_, e in zip(x.shape, xmap) if s_ != 1]
            extra = tuple(e for s_, e in zip(x.shape, xmap) if s_ == 1 and e[0] == "q")
            if any(e[0] == "c" and e[1] != 0 for s_, e in zip(x.shape, xmap) if s_ == 1):
                return self.const(0.0)
            it = iter(kept)
            bmap = tuple(next(it) if s_ != 1 else ("c", 0) for s_ in base.shape)
            return self.load(base, bmap + extra)
        if op == "pow" and n.args[1].op == "const" and n.args[1].attrs[0] in _POW_SPECIAL:
            return self._round(self._pow_special(n, imap), n.dtype)
        if op in OPCODES:
            regs = []
            for a in n.args:
                lead = n.ndim - a.ndim
                sub = tuple(("c", 0) if a.shape[i] == 1 and n.shape[lead + i] != 1
                            else imap[lead + i] for i in range(a.ndim))
                regs.append(self.emit(a, sub))
            regs += [0] * (3 - len(regs))
            out = self.instr(op, *regs)
            return self._round(out, n.dtype)
        from .plan import Unplannable  # (plan imports this module)
        raise Unplannable(f"cannot emit {op}")

    def _pow_special(self, n, imap):
        # PyTorch computes these exponents as products / sqrt / reciprocal rather than pow()
        # (ATen's pow_tensor_scalar kernels); doing the same gives its roundings and is faster.
        v = n.args[1].attrs[0]
        if v == 0.0:  # ones, even at NaN and inf (ATen fills the result with 1)
            return self.const(1.0)
        lead = n.ndim - n.args[0].ndim
        x = self.emit(n.args[0], tuple(("c", 0) if s == 1 and n.shape[lead + i] != 1
                                       else imap[lead + i]
                                       for i, s in enumerate(n.args[0].shape)))
        if v == 1.0:
            return x
        if v == 0.5:
            return self.instr("sqrt", x)
        if v == -0.5:
            return self.instr("reciprocal", self.instr("sqrt", x))
        if v == -1.0:
            return self.instr("reciprocal", x)
        sq = self.instr("mul", x, x)
        if v == 2.0:
            return sq
        if v == 3.0:
            return self.instr("mul", sq, x)
        return self.instr("reciprocal", sq)  # -2.0

    def _c(self, v):
        self.r.consts.append(float(v))
        return len(self.r.consts) - 1

    def _round(self, reg, dtype):
        # Values of a narrower dtype are rounded after every op, as PyTorch computes them.
        if dtype in _ROUND and (self.r.compute == torch.float64 or dtype != torch.float32):
            return self.instr(_ROUND[dtype], reg)
        return reg

    def run(self):
        r = self.r
        # Decide the compute type first: float64 if anything in the region is float64, but for
        # a single value it loads (a Python number PyTorch saved as a 0-d float64 tensor, which
        # an op on float32 tensors reads as a float: ir.result_dtype).
        # (The walk goes below a target, which is loadable itself: a float32 target that casts
        # a float64 expression, the gradient of x.double()'s uses for a float32 x, is computed
        # in float64, as PyTorch computes it.)
        for t in r.targets:
            body = t.args if t.op in REDUCE_MODE else [t]
            loaded = lambda m: self.loadable(m) and all(m is not b for b in body)  # noqa: E731
            for m in ir.topo(list(body), stop=loaded):
                if m.dtype == torch.float64 and not (m.shape == () and loaded(m)):
                    r.compute = torch.float64
        ident = tuple(("d", i, 1, 0) for i in range(len(r.shape)))
        for ti, t in enumerate(r.targets):
            if t.op in REDUCE_MODE:
                val = self.emit(t.args[0], ident)
                mode = REDUCE_MODE[t.op]
            else:
                val = self.emit(t, ident, top=True)
                mode = 0
            r.stores.append((ti, mode))
            self.code.append(("store", -1, len(r.stores) - 1, val, 0))
        self._allocate()

    def _allocate(self):
        """Linear-scan register reuse so the block working set stays in cache."""
        last = {}
        for i, (op, d, a, b, c) in enumerate(self.code):
            for x in self._reads(op, a, b, c):
                last[x] = i
        free, phys, nregs, out = [], {}, 0, []
        for i, (op, d, a, b, c) in enumerate(self.code):
            reads = self._reads(op, a, b, c)
            ra = [phys[x] for x in reads]
            # dst is taken before the operands are released: no instruction writes its input.
            if d >= 0:
                if free:
                    pd = free.pop()
                else:
                    pd, nregs = nregs, nregs + 1
                phys[d] = pd
            else:
                pd = 0
            for x in set(reads):
                if last.get(x) == i:
                    free.append(phys[x])
            args = [a, b, c]
            if op == "store":
                args = [a, ra[0], 0]
            elif op not in ("load", "const", "iota"):
                args = ra + [0] * (3 - len(ra))
            out.append((OPCODES[op], pd, *args))
        self.r.instrs = out
        self.r.nregs = max(nregs, 1)

    @staticmethod
    def _reads(op, a, b, c):
        if op in ("load", "const", "iota"):
            return []
        if op == "store":
            return [b]
        return [a, b, c][:_ARITY[op]]

