"""The IR: immutable, hash-consed nodes in a DAG.

Every node is interned: building the same op on the same arguments twice returns the same
object. That gives common-subexpression elimination for free and lets a plan be cached under the
identity of the nodes it computes (same graph structure -> same nodes -> same plan).

A node whose value is bound at run time carries ``known=k``: it is read from the k-th tensor of
the call instead of being computed. ``leaf`` nodes are always known; an op node may be known too
(e.g. ``exp(x)`` whose result PyTorch saved), so it is loaded when its value is needed but its
rule can still differentiate through it. A known op node is ``detached`` when its tensor carries
no autograd graph of its own (layer_norm's saved mean and rstd, non-differentiable outputs): a
create_graph block then differentiates through its operands (blocks.PlanBlock) instead of
leaving its derivative to the tensor's graph.

Constructors apply only exact simplifications (x*1, x/1, identity views, casts to the same dtype,
a matrix product with an inner size of 1 as a broadcast multiply); nothing that could change an
inf or NaN.
"""
import math

import torch

from . import _C

_TABLE = {}


class Node:
    # For the sweep (sweep._lower_vjp), which puts a node's saved values in place of its slots
    # and then looks for slots nobody saved: ``based``, the node is or has below it a slot with
    # a saved value (what the substitution replaces: it walks nothing else, such as the
    # cotangent built so far); ``bare``, a slot without one is reached from the node other
    # than through a known node (whose value is loaded).
    __slots__ = ("op", "args", "attrs", "shape", "dtype", "known", "detached", "based", "bare",
                 "__weakref__")

    def __repr__(self):
        a = ",".join(f"%{id(x) % 10000}" for x in self.args)
        k = f" known={self.known}" if self.known is not None else ""
        return f"%{id(self) % 10000}={self.op}({a}){list(self.attrs)}{list(self.shape)}{k}"

    @property
    def ndim(self):
        return len(self.shape)


def node(op, args, attrs, shape, dtype, known=None, detached=False):
    key = (op, tuple(map(id, args)), attrs, shape, dtype, known, detached)
    n = _TABLE.get(key)
    if n is None:
        n = Node()
        n.op, n.args, n.attrs, n.shape, n.dtype, n.known = op, tuple(args), attrs, shape, dtype, known
        n.detached = detached
        slot = op == "slot"
        n.based = slot and bool(n.args) or any(a.based for a in n.args)
        n.bare = slot and not n.args or known is None and any(a.bare for a in n.args)
        _TABLE[key] = n
    return n


def clear_tables():
    _TABLE.clear()


def table_size():
    return len(_TABLE)


def with_known(n, k, detached=False):
    return node(n.op, n.args, n.attrs, n.shape, n.dtype, k, detached and k is not None)


# ---- dtypes -------------------------------------------------------------------------------
_RANK = {torch.bool: 0, torch.int32: 1, torch.int64: 2, torch.bfloat16: 3, torch.float16: 3,
         torch.float32: 4, torch.float64: 5}


def promote(*dts):
    out = None
    for d in dts:
        if d is None:
            continue
        if out is None or _RANK.get(d, 9) > _RANK.get(out, 9):
            out = d
        elif d != out and _RANK.get(d) == _RANK.get(out):  # float16 with bfloat16
            out = torch.float32
    return out


_CATEGORY = {torch.bool: 0, torch.int32: 1, torch.int64: 1}  # (the rest: floating, 2)


def result_dtype(args):
    """The dtype of an elementwise op on nodes ``args``, by PyTorch's rule (result_type): a
    0-d operand (a Python number PyTorch saved as a 0-d float64 or int64 tensor: the 0.5 of
    ``0.5 * x``) does not widen the dtype of operands with dimensions unless it is of a higher
    category (integer, then floating). ``0.5 * x`` of a float32 x is computed in float32 with
    0.5 rounded to float, as PyTorch computes it: promoting it to float64 had made regions
    compute in float64 and not run as compiled loops."""
    dims = promote(*(a.dtype for a in args if a.shape != ()))
    zero = promote(*(a.dtype for a in args if a.shape == ()))
    if dims is None or (zero is not None and _CATEGORY.get(zero, 2) > _CATEGORY.get(dims, 2)):
        return zero
    return dims


def float_dtype(*dts):
    d = promote(*dts)
    return d if d is not None and d.is_floating_point else torch.get_default_dtype()


# ---- shapes -------------------------------------------------------------------------------
def broadcast(*shapes):
    nd = max((len(s) for s in shapes), default=0)
    out = [1] * nd
    for s in shapes:
        for i, d in enumerate(s):
            j = nd - len(s) + i
            if d != 1:
                if out[j] != 1 and out[j] != d:
                    raise ValueError(f"shapes {shapes} do not broadcast")
                out[j] = d
    return tuple(out)


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


# ---- constructors -------------------------------------------------------------------------
def leaf(k, shape, dtype):
    return node("leaf", (), (), tuple(shape), dtype, k)


def slot(i, base, shape, dtype):
    """The i-th input of a lowered PyTorch node; ``base`` is its saved value or None."""
    return node("slot", () if base is None else (base,), (i,), tuple(shape), dtype)


def const(v):
    v = float(v)
    # -0.0 == 0.0 as a key: -0.0 is its own node, marked by a second attribute, or
    # `x * -0.0` would be the same node as `x * 0.0` and lose the sign of its zeros
    return node("const", (), (v, "-0") if v == 0.0 and math.copysign(1.0, v) < 0 else (v,),
                (), None)


# A value PyTorch does not save and no rule reads (layer_norm's eps, masked_fill's scalar): NaN,
# which would show if it were read; one object, as hash-consed const nodes compare by identity.
UNREAD = float("nan")


def zeros(shape, dtype):
    """An explicit zero (PyTorch returns zeros, not an absent gradient, for e.g. x**0)."""
    return node("zeros", (), (), tuple(shape), dtype)


def tie(value, dep, absent=False):
    """``value``, recorded as depending on ``dep`` with zero derivative (``absent``: with no
    derivative at all, None where PyTorch's gives None).

    PyTorch's formulas pass some tensors into ops that are differentiable with a zero
    derivative (relu's result into threshold_backward); a result then requires grad. Tying
    keeps that requires_grad behaviour without changing the value.
    """
    return node("tie", (value, dep), ("absent",) if absent else (), value.shape, value.dtype)


def tie_grad(value, dep, absent=False):
    """``value``, whose cotangent is tied to ``dep`` (rules.py): for a piecewise linear
    activation (leaky_relu, hardtanh, ...) whose derivative PyTorch computes from its input,
    so that the gradient requires grad under create_graph, and its own derivative with
    respect to that input is zeros, not absent (``absent``: None, as for the results of a
    fused backward op that do not depend on that input, such as layer_norm's bias gradient)."""
    return node("tie_grad", (value, dep), ("absent",) if absent else (), value.shape,
                value.dtype)


def is_const(n, v=None):
    return n.op == "const" and (v is None or n.attrs[0] == v)


def _as_node(x):
    return x if isinstance(x, Node) else const(x)


def ew(op, *args, dtype=None):
    """Elementwise op (a VM opcode) with numpy broadcasting."""
    args = [_as_node(a) for a in args]
    shape = broadcast(*(a.shape for a in args))
    if dtype is None:
        # Predicates (gt, eq, ...) yield 0/1 in the compute type, so one dtype rule serves all.
        dtype = result_dtype(args)
    return node(op, args, (), shape, dtype)


def add(a, b):
    a, b = _as_node(a), _as_node(b)
    if a.op == "where" and b.op == "where" and a.args[0] is b.args[0]:
        # where(c, x, 0) + where(c, 0, y) = where(c, x, y) (up to the sign of a zero): the
        # cotangent of a `where` whose two branches come from one tensor (softplus, clamp, ...)
        fused = None
        if is_const(a.args[2], 0.0) and is_const(b.args[1], 0.0):
            fused = where(a.args[0], a.args[1], b.args[2])
        elif is_const(a.args[1], 0.0) and is_const(b.args[2], 0.0):
            fused = where(a.args[0], b.args[1], a.args[2])
        if fused is not None and fused.shape == broadcast(a.shape, b.shape) and \
                fused.dtype == result_dtype((a, b)):
            return fused
    return ew("add", a, b)


def sub(a, b):
    return ew("sub", a, b)


def mul(a, b):
    a, b = _as_node(a), _as_node(b)
    if is_const(b, 1.0) and b.shape == () and a.dtype is not None:
        return a
    if is_const(a, 1.0) and a.shape == () and b.dtype is not None:
        return b
    return ew("mul", a, b)


def div(a, b):
    b = _as_node(b)
    if is_const(b, 1.0):
        return _as_node(a)
    return ew("div", a, b)


def neg(a):
    if a.op == "neg" and not views_bound(a.args[0]):
        return a.args[0]
    return ew("neg", a)


def views_bound(n):
    """Whether n is a bound tensor, or views of one: a result that is one of those is returned
    as the tensor itself (or a view of it). neg keeps two negations of one: PyTorch's make a
    new tensor, and they need not come from two nodes that sweep._fresh sees (sub's gradient
    for its second operand is a negation inside a node that otherwise passes the gradient on:
    c - (c - x))."""
    while n.op in ("expand", "reshape", "permute", "slice"):
        n = n.args[0]
    return n.known is not None


def pow(a, b):
    """a ** b; a constant exponent of 2 is built as a * a (how ATen computes it), so it is the
    same node as any other a * a, and 1 as a itself."""
    a, b = _as_node(a), _as_node(b)
    if is_const(b) and b.shape == () and a.dtype is not None and a.dtype.is_floating_point:
        if b.attrs[0] == 2.0:
            return mul(a, a)
        if b.attrs[0] == 1.0:
            return a
    return ew("pow", a, b)


def where(c, a, b):
    return ew("where", c, a, b)


def iota(shape, dim, dtype):
    return node("iota", (), (dim,), tuple(shape), dtype)


def cast(x, dtype):
    if x.dtype == dtype or dtype is None:
        return x
    return node("cast", (x,), (dtype,), x.shape, dtype)


def expand(x, shape):
    shape = tuple(shape)
    if x.ndim < len(shape):
        x = reshape(x, (1,) * (len(shape) - x.ndim) + x.shape)
    if x.shape == shape:
        return x
    return node("expand", (x,), (shape,), shape, x.dtype)


def reshape(x, shape):
    shape = tuple(shape)
    if x.shape == shape:
        return x
    if numel(shape) != numel(x.shape):
        raise ValueError(f"reshape {x.shape} -> {shape}")
    if x.op == "reshape":
        return reshape(x.args[0], shape)
    return node("reshape", (x,), (shape,), shape, x.dtype)


def permute(x, perm):
    perm = tuple(perm)
    if x.op == "permute":  # one permute of the node below (a transpose of a transpose: none)
        x, perm = x.args[0], tuple(x.attrs[0][p] for p in perm)
    if x.op == "mm" and x.known is None and perm == (1, 0):
        # (a @ b).T = b.T @ a.T: the product written transposed, not a copy of it (a weight's
        # gradient through a Linear's saved W.T)
        return mm(permute(x.args[1], (1, 0)), permute(x.args[0], (1, 0)))
    if perm == tuple(range(len(perm))):
        return x
    return node("permute", (x,), (perm,), tuple(x.shape[p] for p in perm), x.dtype)


def slice_(x, dim, start, step, length):
    if start == 0 and step == 1 and length == x.shape[dim]:
        return x
    shape = x.shape[:dim] + (length,) + x.shape[dim + 1:]
    return node("slice", (x,), (dim, start, step, length), shape, x.dtype)


def embed(x, dim, start, step, size):
    """Inverse of slice: place x into zeros of extent ``size`` along ``dim``."""
    if start == 0 and step == 1 and size == x.shape[dim]:
        return x
    shape = x.shape[:dim] + (size,) + x.shape[dim + 1:]
    return node("embed", (x,), (dim, start, step, size), shape, x.dtype)


def _norm_dims(dims, nd):
    return tuple(sorted({d % nd for d in dims})) if nd else ()


def reduce(op, x, dims):
    """rsum / rmax / rmin over ``dims`` with keepdim layout (reduced dims become 1)."""
    dims = _norm_dims(dims, x.ndim)
    dims = tuple(d for d in dims if x.shape[d] != 1) if op != "rsum" else dims
    if not dims:
        return x
    shape = tuple(1 if i in dims else s for i, s in enumerate(x.shape))
    return node(op, (x,), (dims,), shape, x.dtype)


def rsum(x, dims):
    dims = _norm_dims(dims, x.ndim)
    if all(x.shape[d] == 1 for d in dims):
        return x
    return reduce("rsum", x, dims)


def sum_to(x, shape):
    """Undo broadcasting: sum x down to ``shape`` (numpy broadcasting rules)."""
    shape = tuple(shape)
    if x.shape == shape:
        return x
    lead = x.ndim - len(shape)
    dims = list(range(lead))
    for i, s in enumerate(shape):
        if s == 1 and x.shape[lead + i] != 1:
            dims.append(lead + i)
    r = rsum(x, dims) if dims else x
    return reshape(r, shape)


def mm(a, b):
    """The matrix product of two 2-d nodes of one dtype. Not a VM op: a plan runs it as a step
    of its own through PyTorch's ``mm`` (plan_steps.MatmulStep), between fused regions."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"mm of {a.shape} and {b.shape}")
    if a.dtype != b.dtype:
        raise ValueError(f"mm of {a.dtype} and {b.dtype}")
    if a.shape[1] == 1:
        # An inner size of 1 is an outer product: one multiply per element and no sum, as in
        # BLAS, so the same values. As an elementwise node it fuses with its neighbours instead
        # of running as a product step and writing its result (a scalar network's last layer:
        # the cotangent [N, 1] times the weights' row [1, H]).
        return mul(a, b)
    return node("mm", (a, b), (), (a.shape[0], b.shape[1]), a.dtype)


def gather(x, index, kind):
    """Rows ``index`` of ``x``: ``index`` a bound 1-d int64 node. ``kind`` names the pair of
    PyTorch kernels this op and its transpose (scatter) stand for, whose values, errors and
    half-type sums they keep: "index" (``x[index]`` and ``index_put_`` accumulating: negative
    indices wrap, sums in the tensor's dtype) or "select" (``index_select`` and
    ``index_add_``: sums of half types in float). Like mm, not a VM op: a plan runs it as a
    step through PyTorch (plan_steps.IndexStep), between fused regions."""
    if index.ndim != 1 or index.dtype != torch.int64 or x.ndim < 1 or \
            kind not in ("index", "select"):
        raise ValueError(f"gather of {x.shape} by {index.shape} {index.dtype} ({kind})")
    return node("gather", (x, index), (kind,), (index.shape[0],) + x.shape[1:], x.dtype)


def scatter(g, index, n, kind):
    """The rows of ``g`` added into ``n`` rows of zeros at rows ``index``: gather's
    transpose (``kind`` as there). A plan step, as gather."""
    if index.ndim != 1 or index.dtype != torch.int64 or g.ndim < 1 or \
            g.shape[0] != index.shape[0] or kind not in ("index", "select"):
        raise ValueError(f"scatter of {g.shape} by {index.shape} {index.dtype} ({kind})")
    return node("scatter", (g, index), (kind, n), (n,) + g.shape[1:], g.dtype)


def transpose(x):
    """The transpose of a 2-d node."""
    return permute(x, (1, 0))


# composites over the dims attrs[0] (keepdim layout)
_REDUCING = ("lse", "norm2", "var", "max_all", "min_all")


def composite(op, x, attrs, known=None):
    """Ops with their own rule but no VM opcode (evaluated by decomposition when not known)."""
    return node(op, (x,), attrs, x.shape if op not in _REDUCING else
                tuple(1 if i in attrs[0] else s for i, s in enumerate(x.shape)), x.dtype, known)


# ---- traversal ----------------------------------------------------------------------------
def is_known(m):
    """Whether node m is bound at run time (the usual ``stop`` of a walk: topo walks
    nothing below such nodes without calling back into Python)."""
    return m.known is not None


def topo(roots, stop=None, stop_ids=None):
    """Nodes reachable from roots (a sequence; None entries skipped) in post-order (args
    before users), each once; nothing below a node for which ``stop`` is true, or whose id is
    in ``stop_ids`` (a set or dict), is walked (the node itself is listed). Walked in C++
    (csrc/ir_topo.h): planning a graph walks small DAGs tens of times; ``stop=is_known`` and
    ``stop_ids`` are tested there without calling back into Python."""
    if stop is is_known:
        return _C.ir_topo(roots, None, True, stop_ids)
    return _C.ir_topo(roots, stop, False, stop_ids)


def substitute(roots, mapping, known=None, keep=None):
    """Rebuild roots with nodes replaced per ``mapping`` (id(node) -> node); with ``known``,
    each rebuilt node is bound to ``known(node)`` (its tensor number, or None). Nodes for which
    ``keep`` is true are kept as they are, without a walk below them."""
    memo = dict(mapping)
    for n in topo(roots, stop=keep, stop_ids=mapping):
        if id(n) in memo:
            continue
        if keep is not None and keep(n):
            memo[id(n)] = n
            continue
        args = tuple(memo[id(a)] for a in n.args)
        k = n.known if known is None else known(n)
        memo[id(n)] = n if k == n.known and all(a is b for a, b in zip(args, n.args)) else \
            node(n.op, args, n.attrs, n.shape, n.dtype, k, n.detached and k is not None)
    return [None if r is None else memo[id(r)] for r in roots]
