"""Signatures of autograd graphs, so a graph seen before skips lowering and derivation.

Lowering a node reads only its class, its input metadata, its edges (and their targets'
metadata) and its saved attributes. The signature records all of these for every node of the
sweep, with each saved tensor described by its layout and by the leaf number the call's binder
gives it (which also records which saved tensors are the same tensor). Two calls with equal
signatures therefore build the same IR over the same leaf numbers, so the derived expressions of
the first call are valid for the second one, bound to its own tensors.

A node fastgrad cannot lower (run through PyTorch's node) is described by its class, edges and
metadata only: a hit runs it again (sweep.replay) and checks that its results are bound like
the first time, falling back to a fresh sweep if not.
"""
from . import _C, hooks, lowering, node_view, plan

_MAX_ENTRIES = 512
_MAX_INTERNED = 1 << 16  # objects numbered in keys (saved scalars that change every call add some)
_ENTRIES = {}


class Entry:
    """What the first sweep of a graph produced: the gradients' IR, the node names for explain,
    the tape of fallback-node calls (sweep.replay) that a hit runs again, how many tensors the
    first call bound (a hit must bind as many: engine._still_bound), the numbers of the bound
    tensors the IR ties to the expressions that made them (sweep._link_saved: a hit needs
    them unchanged since they were made, version 0), and the plan of the IR (set by engine.run
    once it is known; None while it is not, or when a gradient is None), which lets
    engine.hit go straight to it, and the churn.Record of its graph's structure (None: not
    kept), which a hit tells."""
    __slots__ = ("exprs", "native", "fallback", "tape", "nbound", "tied", "plan", "churn")

    def __init__(self, exprs, native, fallback, tape, nbound, tied=(), churn=None):
        self.exprs, self.native, self.fallback, self.tape = exprs, native, fallback, tape
        self.nbound, self.tied, self.plan, self.churn = nbound, tied, None, churn


def _spec(cls, fn):
    """(lowerable, is one of our regions, names of the saved attributes, holds saved tensors,
    (raw name, name) of each saved tensor: `_raw_saved_x`, `_saved_x`, or a Python Function's
    `_raw_saved_tensors`, `saved_tensors`, whether PyTorch's engine releases something else of
    it after running it without retain_graph: CopySlices (an in-place op on a view) drops the
    node it wraps, and raises when run again) of a node class; capture asks once per class."""
    name = fn.name()
    attrs = dir(fn)
    saved = tuple(a for a in attrs if a.startswith("_saved_"))
    raw = tuple((a, "_saved_" + a[len("_raw_saved_"):]) for a in attrs
                if a.startswith("_raw_saved_"))
    return (name in lowering.LOWER, name == "RegionFunctionBackward", saved,
            node_view.holds_saved_tensors(fn), raw, name.endswith("CopySlices"))


def runs(fn, nexts, needed):
    """Whether the sweep (like PyTorch's engine) runs node fn: some edge leads to an input."""
    return any([m is not None and needed[id(m)] for m, _ in nexts[id(fn)]])


def signature(graph, out_edges, grad_tensors, in_edges, bind, create_graph):
    """(key, freed): a key (bytes) describing everything lowering will read (None if not
    cacheable), and whether a node the sweep runs holds saved tensors and was freed by an
    earlier call (retain_graph=False).

    The key holds, per node of the walk, its class, its edges (as positions in the order, or
    the metadata of an edge leaving the walk), its input metadata and, for a node lowering
    reads, its saved values: a saved tensor as (leaf number, requires_grad, shape, strides,
    dtype and, in a call on a device whose plans compute saved values again (plan.RECOMPUTE:
    its sweep ties them to their producers), the position and output number of the node in
    the walk that made it), anything else by value (type and value); a region node also gives its
    Region. A node run through PyTorch is described without its saved values, nor the
    metadata of its edges leaving the walk (the sweep reads neither; sweep.replay checks its
    results). Saved tensors are bound into ``bind`` in a fixed order, so a later sweep with the
    same binder numbers them identically. Built in C++ (csrc/capture.cpp), as bytes
    (csrc/signature_key.h: objects such as classes, dtypes and devices enter as numbers from
    an intern table that ``clear`` empties with the entries); graphs with tensor hooks are not
    cached."""
    hooks_fn = hooks.tensor_hooks if hooks.any_registered() else None
    return _C.signature(graph, out_edges, grad_tensors, in_edges, bind, create_graph, _spec,
                        hooks_fn, node_view.FREED, plan.RECOMPUTE)


def lookup(key):
    return _ENTRIES.get(key) if key is not None else None


def store(key, exprs, native, fallback=(), tape=(), nbound=0, tied=(), churn=None):
    """Remember what a sweep produced for signature ``key``; returns the Entry (None if the
    graph is not cacheable)."""
    if key is None:
        return None
    if len(_ENTRIES) >= _MAX_ENTRIES or _C.interned_count() > _MAX_INTERNED:
        clear()
    e = _ENTRIES[key] = Entry(exprs, tuple(native), tuple(fallback), tuple(tape), nbound,
                              tuple(dict.fromkeys(tied)), churn)
    return e


def clear():
    """Forget every entry, and the objects their keys numbered (a later key numbers them anew,
    so it cannot match an entry of before: keys only miss)."""
    _ENTRIES.clear()
    _C.clear_interned()
