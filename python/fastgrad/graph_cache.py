"""Signatures of autograd graphs, so a graph seen before skips lowering and derivation.

Lowering a node reads only its class, its input metadata, its edges (and their targets'
metadata) and its saved attributes. The signature records all of these for every node of the
sweep, with each saved tensor described by its layout and by the leaf number the call's binder
gives it (which also records which saved tensors are the same tensor). Two calls with equal
signatures therefore build the same IR over the same leaf numbers, so the derived expressions of
the first call are valid for the second one, bound to its own tensors.

A node fastgrad cannot lower (run through PyTorch's node) is described by its class, edges and
metadata only: a hit runs it again (engine._replay) and checks that its results are bound like
the first time, falling back to a fresh sweep if not.
"""
import torch

from . import hooks, lowering

_MAX_ENTRIES = 512
_ENTRIES = {}
_SPECS = {}
_NOT_CACHED = object()


class Entry:
    """What the first sweep of a graph produced: the gradients' IR, the node names for explain,
    and the tape of fallback-node calls (engine._replay) that a hit runs again."""
    __slots__ = ("exprs", "native", "fallback", "tape")

    def __init__(self, exprs, native, fallback, tape):
        self.exprs, self.native, self.fallback, self.tape = exprs, native, fallback, tape


def _spec(cls, fn):
    """(lowerable, is one of our regions, names of the saved attributes) of a node class,
    computed once per class."""
    spec = _SPECS.get(cls)
    if spec is None:
        name = fn.name()
        saved = tuple(a for a in dir(fn) if a.startswith("_saved_"))
        spec = _SPECS[cls] = (name in lowering.LOWER, name == "RegionFunctionBackward", saved)
    return spec


def _meta(m):
    return (tuple(m.shape), m.dtype, m.device)


def runs(fn, nexts, needed):
    """Whether the sweep (like PyTorch's engine) runs node fn: some edge leads to an input."""
    return any([m is not None and needed[id(m)] for m, _ in nexts[id(fn)]])


def tensor_record(bind, t):
    """How a bound tensor enters a signature: its leaf number, shape, strides, dtype and
    requires_grad (None for a tensor the compiled path cannot read)."""
    k, key = bind.index(t)
    return None if k is None else (k,) + key[1:5]


def _value(v, bind):
    if isinstance(v, torch.Tensor):
        return tensor_record(bind, v)
    if isinstance(v, list):
        v = tuple(v)
    try:
        hash(v)
    except TypeError:
        return _NOT_CACHED
    return (type(v), v)


def signature(order, needed, nexts, out_edges, grad_tensors, in_edges, bind, create_graph):
    """A hashable key describing everything lowering will read, or None if not cacheable.

    Saved tensors are bound into ``bind`` in a fixed order, so a later sweep with the same
    binder numbers them identically.
    """
    pos = {id(fn): i for i, fn in enumerate(order)}
    # create_graph changes what fallback nodes return (results that require grad)
    parts = [create_graph] + [None if g is None else _value(g, bind) for g in grad_tensors]
    specs = _SPECS
    for fn in order:
        if hooks.tensor_hooks(fn):
            return None  # user code runs on the gradient mid-sweep: derive anew each call
        cls = type(fn)
        spec = specs.get(cls) or _spec(cls, fn)
        edges = nexts[id(fn)]
        meta = tuple([(tuple(m.shape), m.dtype, m.device) for m in fn._input_metadata])
        if not runs(fn, nexts, needed):
            parts.append((cls, len(edges), meta))  # an input or a node the sweep skips
            continue
        es = tuple([None if m is None else
                    (pos[id(m)], k) if id(m) in pos else (-1, k, _meta(m._input_metadata[k]))
                    for m, k in edges])
        if not spec[0]:  # run through PyTorch's node: only what it returns matters (replay)
            parts.append((cls, es, meta, "fallback"))
            continue
        if spec[1]:
            vals = [cls, es, meta, fn.region]
            src = fn.saved_tensors
        else:
            vals = [cls, es, meta]
            src = [getattr(fn, a) for a in spec[2]]
        for v in src:
            v = _value(v, bind)
            if v is _NOT_CACHED:
                return None
            vals.append(v)
        parts.append(tuple(vals))
    parts.append(tuple([(pos.get(id(n), -1), k) for n, k in out_edges]))
    parts.append(tuple([(pos.get(id(n), -1), k) for n, k in in_edges]))
    return tuple(parts)


def lookup(key):
    return _ENTRIES.get(key) if key is not None else None


def store(key, exprs, native, fallback=(), tape=()):
    if key is None:
        return
    if len(_ENTRIES) >= _MAX_ENTRIES:
        _ENTRIES.clear()
    _ENTRIES[key] = Entry(exprs, tuple(native), tuple(fallback), tuple(tape))


def clear():
    _ENTRIES.clear()
