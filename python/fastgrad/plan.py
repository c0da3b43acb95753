"""Plan: partition IR into fused regions and compile each into a VM register program.

A *region* is one pass over an iteration space. Its targets are stored either elementwise or
reduced (sum/max/min over some dims of the iteration space, with the elementwise work in front of
it fused as a prologue). Inside a region, view ops (expand, permute, slice, select, squeeze-like
reshapes) are not materialised: they become index maps pushed down to the loads, and the VJP of a
slice (``embed``: place into zeros) becomes a predicated load.

What gets materialised: the requested outputs, every reduction, the operand of an ``embed`` and
of a reshape that really moves elements between dims (a view of a materialised tensor is then
taken by PyTorch at run time, which costs nothing for contiguous tensors). Regions that share an
iteration space and depend on nothing of each other are merged, so one pass writes several
outputs. Consecutive regions where a later one reads an earlier one's results only along rows
aligned with its own (a row sum, then an elementwise pass over the same rows: softmax's VJP)
form a ``RowGroup``, which the CPU runs chunk of rows by chunk of rows while they are in cache.

Plans are cached by the identity of the interned output nodes: a training loop plans once.
"""
import torch

from . import ir, rules
from .emitter import REDUCE_MODE as _REDUCE_MODE, Emitter
from .plan_steps import (IndexStep, MatmulStep, Region, RowGroup, ViewStep, matmul_operand,
                         trivial_reshape, view_chain)
from .runtime_table import OPCODES

_VIEW_OPS = {"expand", "permute", "reshape", "slice", "embed"}


class Unplannable(Exception):
    pass


_INDEX_OPS = ("gather", "scatter")
_STEP_OPS = ("mm",) + _INDEX_OPS  # ops a plan runs as a step of their own, through PyTorch


class Plan:
    def __init__(self, requested, outputs, steps):
        # requested: the nodes asked for (the cache key); outputs: the same after decomposition
        self.requested, self.outputs, self.steps = requested, outputs, steps
        self.cuda = None  # planned for a GPU (True) or the CPU (False); None: for either
        self.executor = None  # runtime: the last run, repeated in C++ (runtime.execute)
        self.executor_dev = None  # runtime: the device of that run
        self.executor_retry = 0  # runtime: the run from which making an Executor is tried
        self.block = None  # runtime: how it runs under create_graph (blocks.Blocked)
        self.runs = 0  # runtime: how many times it ran (jit.AFTER)
        self.jit_pending = True  # runtime: a run since its regions were last offered to jit

    @property
    def regions(self):
        out = []
        for s in self.steps:
            if isinstance(s, Region):
                out.append(s)
            elif isinstance(s, RowGroup):
                out += s.regions
        return out


_CACHE = {}


def clear_plan_cache():
    _CACHE.clear()


def get_plan(exprs, tensors=()):
    """The plan computing the list of IR nodes ``exprs`` over the bound ``tensors`` (cached by
    the nodes' identities; a plan whose products are planned by device, ``Plan.cuda`` not None,
    also by whether any of ``tensors`` is on a GPU)."""
    if type(exprs) is not list:
        exprs = list(exprs)
    key = tuple(map(id, exprs))
    p = _CACHE.get(key)
    # (Nodes compare by identity: a list comparison checks that the ids are not reused ones.)
    if p is not None and p.cuda is not None and p.requested == exprs:
        cuda = _on_cuda(tensors)
        if cuda != p.cuda:
            key += (cuda,)
            p = _CACHE.get(key)
    if p is None or p.requested != exprs:
        if len(_CACHE) > 4096:
            _CACHE.clear()
        p = _CACHE[key] = build(list(exprs), _on_cuda(tensors))
    return p


def _on_cuda(tensors):
    return any(t.is_cuda for t in tensors)


# see _narrow_product (measured: docs/performance-history.md; inner sizes of 32-256, wider not
# measured)
NARROW_COLUMNS, NARROW_ROWS, NARROW_INNER = 4, 16384, 256


def _narrow_product(n):
    """A product ``a @ b`` with at most NARROW_COLUMNS output columns, NARROW_ROWS rows or more
    and an inner size of at most NARROW_INNER (the input layer's VJP of an MLP over 2-3
    coordinates: [N, H] x [H, 2]), as row sums: column j is the row sum of ``a`` times ``b``'s
    column j. A region fuses them with the elementwise work producing ``a``, whose rows are
    then never written out, where BLAS (MKL, on the CPU) took 3-4x the time of a copy of ``a``
    for such shapes; with fewer rows, each row's sums (folding their lanes) cost more than that
    saves. The sums are a region's (added in double), not BLAS's: equal up to rounding."""
    a, b = n.args
    k, m = b.shape
    # b's columns as rows of one flat tensor: a reshape that moves elements, so it is
    # materialised (by the plan, or for a bound b by PyTorch's reshape: a copy of a few dozen
    # values) and each column is a contiguous row, which the compiled row loops can load
    flat = ir.reshape(ir.permute(b, (1, 0)), (m * k,))
    out = None
    for j in range(m):
        row = ir.reshape(ir.slice_(flat, 0, j * k, 1, k), (1, k))
        col = ir.embed(ir.rsum(ir.mul(a, row), (1,)), 1, j, 1, m)
        out = col if out is None else ir.add(out, col)
    return out


def _is_narrow(n):
    return n.op == "mm" and n.shape[1] <= NARROW_COLUMNS and n.shape[0] >= NARROW_ROWS and \
        n.args[0].shape[1] <= NARROW_INNER


# see _column_product
COLUMN_ROWS = 16384


def _column_product(n):
    """A column sum ``rsum(x * c, 0)`` of ``x`` [N, H] times a column ``c`` [N, 1], with
    COLUMN_ROWS rows or more, as the product ``c^T @ x`` (None where ``n`` is not one): the
    weight gradient of a layer with one output, whose outer product ir.mm made a multiply
    (the WGAN-GP critic's last layer, differentiated again by .backward()). A region's column
    sum has no compiled kernel: on an H200 it took 3.9 ms where cuBLAS, with ``x`` written out
    for it, left the whole step 3.8 ms shorter; on the CPU the two measured the same.
    The sum, and its rounding (BLAS may fuse each multiply into its add), is BLAS's, as
    PyTorch's own for that gradient is."""
    if n.op != "rsum" or n.attrs[0] != (0,) or n.ndim != 2 or n.dtype not in _BLAS_DTYPES:
        return None
    x = n.args[0]
    # (a bound product is read as it is; a broadcast x would be written out whole for BLAS)
    if x.op != "mul" or x.known is not None or x.shape[0] < COLUMN_ROWS:
        return None
    p, q = x.args
    if q.shape != (x.shape[0], 1):
        p, q = q, p
    if q.shape != (x.shape[0], 1) or p.shape != x.shape or p.op == "expand" or \
            not p.dtype == q.dtype == n.dtype:
        return None
    return ir.mm(ir.transpose(q), p)


_BLAS_DTYPES = (torch.float32, torch.float64)


def _decompose(exprs, cuda):
    """Replace composite primitives whose value is not known by their VM-level definition,
    column sums of a product with a column by a matrix product (_column_product), and on the
    CPU narrow products by row sums (_narrow_product; on a GPU cuBLAS is faster, see
    docs/performance-history.md, "GPU: the MLP plans by device"). Also returns whether a
    product was narrow (the plan then depends on the device)."""
    nodes = ir.topo(exprs, stop=ir.is_known)
    # Each node rebuilt over its arguments' replacements once, arguments first (a substitute
    # per replaced node would walk all below it again: quadratic on a chain of softmaxes).
    narrow, rebuilt = False, {}

    def over_new_args(n):
        args = tuple(rebuilt.get(id(a), a) for a in n.args)
        return n if all(a is b for a, b in zip(args, n.args)) else \
            ir.node(n.op, args, n.attrs, n.shape, n.dtype, n.known, n.detached)
    for n in nodes:
        if n.known is not None:
            continue
        m = over_new_args(n)
        if n.op in rules.DECOMPOSE:
            m = rules.DECOMPOSE[n.op](m)
        elif n.op == "rsum" and n.args[0].op == "mul":
            product = _column_product(m)
            if product is not None:
                m = product
        elif _is_narrow(n):
            narrow = True
            if not cuda:
                m = _narrow_product(m)
        if m is not n:
            rebuilt[id(n)] = m
    return (ir.substitute(exprs, rebuilt) if rebuilt else exprs), narrow


# Whether a plan computes again a saved value it could load (_recompute), by device: on the
# CPU loading was measured faster (the loops are as bound by their vector math as by memory:
# docs/performance.md, "Why the speedup targets are out of reach here"); on a GPU a first-order
# chain is bound by the bytes it moves, and computing sin or exp costs next to nothing (measured
# on an H200: docs/performance-history-nov27.md, "Saved values computed again").
RECOMPUTE = {"cpu": False, "cuda": True}
_RECOMPUTE_MAX = 48  # nodes of one saved value's expression computed again, at most
_ELEMENTWISE = (set(OPCODES) - {"load", "store", "iota"}) | {"cast", "clamp"}


def recomputable(n):
    """Whether known node ``n``'s expression, down to the known values it reads, is elementwise
    work of n's shape (consts, scalars and broadcasts of loaded values aside) that a region can
    compute in place of loading n: what the sweep ties a saved tensor to
    (sweep._link_saved) and what _recompute may compute again."""
    if n.known is None or n.detached or n.op not in _ELEMENTWISE:
        return False
    body = ir.topo([with_unknown(n)], stop=ir.is_known)
    if len(body) > _RECOMPUTE_MAX:
        return False
    for m in body:
        if m.known is not None or m.op == "const":
            continue
        if m.op in ("expand", "reshape"):
            if not all(a.known is not None or a.op == "const" for a in m.args):
                return False
        elif m.op not in _ELEMENTWISE or m.shape not in (n.shape, ()):
            return False
    return True


def with_unknown(n):
    """Known node ``n`` as the expression it stands for (computed, not loaded)."""
    return ir.node(n.op, n.args, n.attrs, n.shape, n.dtype)


def _recompute(exprs):
    """``exprs`` with saved values computed again where that removes a load: a known node
    (recomputable), the only one bound to its tensor, whose expression reads only values the
    plan loads (x for sin(x)): sin_exp_sum's gradient then reads x alone, not x, sin(x) and
    exp(x). Users are decided before their arguments, each against what is loaded once the
    values decided before it are computed, so a chain of saved results is computed from its
    start (each value once). The value computed may differ from the saved one in its last
    bit."""
    known = ir.is_known
    loads = [m for m in ir.topo(exprs, stop=known) if m.known is not None]
    count = {}
    for m in loads:
        count[(m.known, m.shape)] = count.get((m.known, m.shape), 0) + 1
    reads, chosen = set(count), set()
    for n in reversed(loads):
        key = (n.known, n.shape)
        if count[key] > 1 or not recomputable(n):
            continue
        body = {(m.known, m.shape) for m in ir.topo([with_unknown(n)], stop=known)
                if m.known is not None}
        if key not in body and body <= reads:
            chosen.add(id(n))
            reads.discard(key)
    if not chosen:
        return exprs
    mapping = {}
    for n in loads:  # (arguments first: each expression over the others computed)
        if id(n) in chosen:
            mapping[id(n)] = ir.substitute([with_unknown(n)], mapping)[0]
    return ir.substitute(exprs, mapping)


# An elementwise value a region would compute again for each element it is broadcast to is
# materialised once it costs at least this many nodes (_materialise_broadcast).
BROADCAST_COST = 8


def _materialise_broadcast(nodes, mat, views):
    """Materialise (into ``mat``) an elementwise expression that an expand broadcasts to at
    least twice its elements, when computing it costs BROADCAST_COST nodes or more: a region
    would otherwise compute it once per broadcast element (a pair energy's derivative with
    respect to the distance, over (N, N), read by the (N, N, 3) displacements: three times,
    in each of the two reductions over atoms), where PyTorch computes it once."""
    stop = lambda m: m.known is not None or id(m) in mat or id(m) in views  # noqa: E731
    for n in nodes:
        if n.op != "expand" or n.known is not None:
            continue
        src = n.args[0]
        while src.op == "reshape" and trivial_reshape(src.args[0].shape, src.shape):
            src = src.args[0]
        if stop(src) or src.op not in _ELEMENTWISE or \
                ir.numel(n.shape) < 2 * max(ir.numel(src.shape), 1):
            continue
        cost = sum(1 for m in ir.topo([src], stop=stop) if not stop(m) and m.op != "const")
        if cost >= BROADCAST_COST:
            mat[id(src)] = src


# The deepest expression a region computes, in nodes from what it loads (_cut_deep).
MAX_DEPTH = 128


def _cut_deep(nodes, mat, views):
    """Materialise elementwise nodes (into ``mat``) so that no region computes an expression
    deeper than MAX_DEPTH nodes from what it loads: the emitter follows an expression by
    recursion, and a chain of a few hundred ops (PyTorch's engine runs any) would exceed
    Python's recursion limit. ``nodes``: the plan's nodes, arguments first."""
    depth = {}  # id -> nodes between it and what a region reading it loads (0: loaded)
    for n in nodes:
        if n.known is not None or id(n) in views:
            depth[id(n)] = 0
            continue
        d = 1 + max((depth.get(id(a), 0) for a in n.args), default=0)
        if id(n) in mat:
            d = 0
        elif d >= MAX_DEPTH and n.op in _ELEMENTWISE and n.op != "const":
            mat[id(n)] = n
            d = 0
        depth[id(n)] = d


def build(requested, cuda=False):
    computed = _recompute(requested)
    exprs = computed if RECOMPUTE["cuda" if cuda else "cpu"] else requested
    exprs, narrow = _decompose(exprs, cuda)
    known = ir.is_known
    nodes = ir.topo(exprs, stop=known)
    for n in nodes:
        if n.known is None and (n.op in ("leaf",) or (n.op == "slot" and not n.args)):
            raise Unplannable("needs a value PyTorch did not save")
    mat, views = {}, {}   # id -> node
    # each product's operands, as tensors (the step takes a transpose as a view)
    operands = {id(n): [m for m, _ in map(matmul_operand, n.args)] for n in nodes
                if n.op == "mm" and not known(n)}
    # (a gather's or scatter's operand, as a tensor; its index is bound)
    operands.update({id(n): [n.args[0]] for n in nodes if n.op in _INDEX_OPS and not known(n)})
    for e in exprs:
        if not known(e):
            mat[id(e)] = e
    for n in nodes:
        if known(n):
            continue
        if n.op in _REDUCE_MODE:
            mat[id(n)] = n
        elif n.op == "embed" and not known(_strip_trivial_reshape(n.args[0])):
            mat[id(n.args[0])] = n.args[0]
        elif n.op == "reshape" and not trivial_reshape(n.args[0].shape, n.shape):
            if not known(n.args[0]):
                mat[id(n.args[0])] = n.args[0]
            views[id(n)] = n
        elif n.op in _STEP_OPS:
            mat[id(n)] = n
            for m in operands[id(n)]:
                if not known(m):
                    mat[id(m)] = m
    for e in exprs + [m for ops in operands.values() for m in ops]:
        # A result, or a product's operand, that only broadcasts a bound tensor (the VJP of a
        # sum) is an expanded view of it, nothing written (as PyTorch returns the former).
        if e.op == "expand" and known(view_chain(e)[0]):
            views[id(e)] = e
    for vid in views:
        mat.pop(vid, None)
    _materialise_broadcast(nodes, mat, views)
    _cut_deep(nodes, mat, views)
    loadable = lambda n: known(n) or id(n) in mat or id(n) in views  # noqa: E731

    # Dependencies between materialised values decide the order and which regions may merge.
    order = [n for n in nodes if id(n) in mat or id(n) in views]
    level, regions, steps = {}, {}, []
    for n in order:
        body = n.args if (n.op in _REDUCE_MODE or id(n) in views) else [n]
        if n.op == "expand" and id(n) in views:
            body = [view_chain(n)[0]]
        if n.op in _STEP_OPS:
            body = operands[id(n)]
        deps = set()
        for m in ir.topo(list(body), stop=lambda m: loadable(m) and m is not n):
            if m is not n and loadable(m) and not known(m):
                deps.add(id(m))
        lvl = 1 + max((level[d] for d in deps), default=0)
        level[id(n)] = lvl
        if id(n) in views:
            steps.append((lvl, ViewStep(n)))
            continue
        if n.op == "mm":
            steps.append((lvl, MatmulStep(n)))
            continue
        if n.op in _INDEX_OPS:
            steps.append((lvl, IndexStep(n)))
            continue
        if n.op in _REDUCE_MODE:
            x = n.args[0]
            shape, rdims = x.shape, tuple(d for d in n.attrs[0] if x.shape[d] != 1)
        else:
            shape, rdims = n.shape, ()
        key = (lvl, shape, rdims)
        r = regions.get(key)
        if r is None:
            r = regions[key] = Region(shape, rdims)
            steps.append((lvl, r))
        r.targets.append(n)
    steps.sort(key=lambda s: s[0])
    steps = [s for _, s in steps]
    for s in steps:
        if isinstance(s, Region):
            Emitter(s, loadable).run()
    plan = Plan(requested, exprs, _row_groups(steps))
    # (planned by device where a product is narrow, or where a saved value may be computed)
    plan.cuda = cuda if narrow or computed is not requested else None
    return plan


def _chunk_dims(r):
    """The dims of r's iteration space that a chunk may cut: those it does not reduce."""
    return {d for d in range(len(r.shape)) if d not in r.reduce_dims}


def _aligned_dims(r, made):
    """The dims along which r reads each tensor in ``made`` (ids of targets of the group) at its
    own coordinate (dim d of the tensor indexed by iteration dim d), so a chunk of r needs only
    the same chunk of the tensor; and whether r reads any of them."""
    dims, reads = set(range(len(r.shape))), False
    for ix, imap in r.loads:
        t = r.inputs[ix]
        if id(t) in made:
            reads = True
            dims &= {d for d in range(min(t.ndim, len(r.shape))) if imap[d] == ("d", d, 1, 0) or
                     (r.shape[d] == 1 and imap[d] == ("c", 0))}
    return dims, reads


def _leading(dims):
    """The leading dims 0, 1, ... in ``dims`` (the C++ side chunks rows of leading dims)."""
    k = 0
    while k in dims:
        k += 1
    return set(range(k))


def _row_groups(steps):
    """Gather regions into RowGroups, greedily in plan order. A step that cannot join the open
    group but reads nothing it writes runs before the group (so same-level regions, e.g. a
    column sum next to softmax's row sum, do not split it); a step that reads the group's
    results without alignment closes it. Only groups where a region reads another's results
    are kept: chunking gains nothing otherwise."""
    out, cur, dims, made, dep = [], [], set(), set(), False

    def close():
        if len(cur) > 1 and dep and ir.numel(tuple(cur[0].shape[d] for d in dims)) > 1:
            out.append(RowGroup(list(cur), tuple(sorted(dims))))
        else:
            out.extend(cur)
        cur.clear()
        made.clear()

    for s in steps:
        if not isinstance(s, Region):  # a view or product of its results runs after the group
            if any(id(m) in made for m in s.sources):
                close()
                dep = False
            out.append(s)
            continue
        cd = _chunk_dims(s)
        if cur:
            al, reads = _aligned_dims(s, made)
            shape0 = cur[0].shape
            keep = _leading({d for d in dims & cd & al if s.shape[d] == shape0[d]})
            if keep:
                cur.append(s)
                made.update(id(t) for t in s.targets)
                dims, dep = keep, dep or reads
                continue
            if not reads:
                out.append(s)
                continue
            close()
        if _leading(cd):
            cur.append(s)
            made.update(id(t) for t in s.targets)
            dims, dep = _leading(cd), False
        else:
            out.append(s)
    close()
    return out


def _strip_trivial_reshape(n):
    if n.op == "reshape" and trivial_reshape(n.args[0].shape, n.shape):
        return n.args[0]
    return n
