"""Capture a call's autograd graph, and run what the sweep derives from it.

A call is walked (the nodes between its outputs and inputs, csrc/capture.h) and signed; a
signature seen before runs its cached plan (``hit``), after replaying the graph's fallback
nodes. Otherwise ``run`` has the sweep (sweep.py) derive the gradients' IR, caches it, plans
it and runs the plan; a call the churn record hands to PyTorch, or one that fastgrad cannot
plan, raises ``Unplannable`` for api.py to defer. Without retain_graph a call frees the graph it
ran as PyTorch's engine does (``_mark_freed``).
"""
import torch

from . import _C, churn, graph_cache, hooks, ir, node_view, sweep
from .node_view import TORCH_GRAD as _torch_grad, freed_message
from .plan import Unplannable, clear_plan_cache, get_plan
from .runtime import execute, materialize
from .runtime_table import DTYPE_CODES

# Devices the compiled evaluator runs on (CUDA when the extension was built with it).
_DEVICE_TYPES = ("cpu", "cuda") if _C.cuda_compiled() and hasattr(_C, "run_cuda") else ("cpu",)


class Trace:
    """What a call did: which nodes ran natively, which fell back and why, kernel stats."""

    def __init__(self, stats=None):
        self.native, self.fallback, self.stats = [], [], stats
        self.user_code = False  # whether a tensor hook or a Python Function's backward ran


# PyTorch's errors for a graph it cannot run: freed, or a saved tensor modified in place. Its
# engine meets one at the first node in its own order that needs the tensor, after running the
# nodes before it (and, without retain_graph, freeing them), so the call goes to PyTorch for
# the error: the node its message names and what it frees on the way are PyTorch's. Not where
# fastgrad already ran user code (a tensor hook, a Python Function's backward) in this call,
# which PyTorch would run again: there fastgrad raises PyTorch's error itself.
# The same holds for an error a fallback node raises when it runs (sweep.py marks it): PyTorch
# raises it after running, and freeing, the nodes before that one.
_GRAPH_ERRORS = ("Trying to backward through the graph a second time",
                 "one of the variables needed for gradient computation has been modified")
GRAPH_ERROR_REASON = ("PyTorch raises for this graph (freed, a saved tensor modified in place, "
                      "or a node that raises) after running the nodes before the one it fails at")


def graph_error(e):
    """Whether RuntimeError ``e``, met while reading or running the graph, is one of those the
    call hands to PyTorch."""
    return not getattr(e, "_fastgrad_final", False) and (
        getattr(e, "_fastgrad_node_error", False) or any(m in str(e) for m in _GRAPH_ERRORS))


def _graph_error(e, trace=None):
    """What to raise for RuntimeError ``e`` met while reading or running the graph."""
    if trace is not None and trace.user_code:
        e._fastgrad_final = True  # (api.grad raises it, as here)
    return Unplannable(GRAPH_ERROR_REASON) if graph_error(e) else e


class Unused(Exception):
    """An input a path reaches gets no gradient and allow_unused is False: PyTorch reports it
    (an input no path reaches gets PyTorch's error from run itself: unused_message)."""


_UNUSED_MSG = {}


def unused_message(index):
    """PyTorch's own text for input ``index`` getting no gradient (read from PyTorch once per
    index: releases word it differently)."""
    if index not in _UNUSED_MSG:
        with node_view.recording():
            x, u = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
            try:
                _torch_grad((x * 2.0).sum(), [x] * index + [u])
            except RuntimeError as e:
                _UNUSED_MSG[index] = str(e)
            else:  # pragma: no cover - PyTorch always raises here
                _UNUSED_MSG[index] = "a differentiated Tensor appears to not have been used"
    return _UNUSED_MSG[index]


class _Binder(_C.Binder):
    """Numbers the tensors a call reads; the same tensor seen twice gets one leaf
    (``index``, ``record`` and ``tensors`` come from csrc/capture.h)."""

    def __call__(self, t):
        k = self.index(t)[0]
        if k is None:
            raise Unplannable(f"tensor of {t.dtype} on {t.device} ({t.layout})")
        return ir.leaf(k, tuple(t.shape), t.dtype)


def _host_scalar_to(t, device):
    """A host scalar (a 0-dim CPU tensor not requiring grad: the Python number ``x * 2.0``
    saves) on the CUDA ``device`` of the call it joins: filled with its value, an asynchronous
    kernel (a copy from pageable memory would wait for the device, and cannot be captured in a
    CUDA graph), the way PyTorch's own kernels take such a scalar as an argument."""
    return torch.full((), t.item(), dtype=t.dtype, device=device)


_C.capture_setup(DTYPE_CODES, torch.strided, _DEVICE_TYPES, torch.Tensor, _host_scalar_to)


IR_TABLE_LIMIT = 200_000  # interned IR nodes kept between calls (see run)
_ACCUMULATE_GRAD = []  # the class of PyTorch's leaf nodes, read once


def _accumulate_grad_class():
    if not _ACCUMULATE_GRAD:
        with node_view.recording():
            x = torch.zeros(1, requires_grad=True)
            _ACCUMULATE_GRAD.append(type(x.view_as(x).grad_fn.next_functions[0][0]))
    return _ACCUMULATE_GRAD[0]


def _collect(out_nodes, input_ids, leaf_ids):
    """The nodes on a path from the outputs to an input, consumers first (an _C.Graph: order,
    needed, leaf_nodes, nexts; see csrc/capture.h).

    Inputs are nodes (``input_ids``) or leaf tensors (``leaf_ids``), whose AccumulateGrad nodes
    are found on the way."""
    acc_cls = _accumulate_grad_class() if leaf_ids else None
    return _C.collect(out_nodes, input_ids, leaf_ids, acc_cls)


class Capture:
    """One call's walk and signature (``_capture``): its bound grad_outputs, binder, graph,
    in_edges (leaf tensors replaced by their edges), signature key, whether a node to run was
    freed, and whether ``hit`` found the cached entry stale for it (a replayed node's results
    changed, or the call bound other tensors than the first). A declined hit hands it to
    ``run``, so a call is walked, signed and replayed once."""
    __slots__ = ("grad_tensors", "bind", "graph", "in_edges", "key", "freed", "stale",
                 "churn", "counted", "given", "ran")

    def __init__(self, grad_tensors, bind, graph, in_edges, key, freed, rec, given):
        self.grad_tensors, self.bind, self.graph = grad_tensors, bind, graph
        self.in_edges, self.key, self.freed, self.stale = in_edges, key, freed, False
        # the churn.Record of the graph's structure (None: none yet), whether the call was
        # counted in it (_route), and the inputs as the call gave them (leaf tensors, edges)
        self.churn, self.counted, self.given = rec, False, given
        self.ran = {}  # id(fallback node) -> what it returned in this call (sweep._call_opaque)


SAVED_HOOKS_REASON = ("saved-tensor hooks packed a tensor the graph saved: PyTorch unpacks it "
                      "once, fastgrad would read it several times")
NODE_HOOKS_REASON = "a node has hooks (grad_fn.register_prehook / register_hook)"


def _capture(out_edges, grad_tensors, in_edges, create_graph):
    """The call's walk and signature (a Capture); raises Unplannable where saved-tensor hooks
    (saved_tensors_hooks, save_on_cpu, non-reentrant checkpointing) packed a tensor a lowered
    node saved (csrc/saved_tensors.h): an unpack hook may work only once, or recompute a
    checkpointed segment each time, and PyTorch calls it once per backward; and where a node
    has hooks of its own (hooks.node_hooks_in), which PyTorch's engine runs."""
    bind = _Binder()
    graph, leaf_ids = _walk(out_edges, in_edges)
    given = in_edges
    if leaf_ids:
        leaf_nodes = graph.leaf_nodes
        in_edges = [e if type(e) is tuple else
                    ((leaf_nodes[id(e)], 0) if id(e) in leaf_nodes else _leaf_edge(e))
                    for e in in_edges]
    rec = None
    if churn._WAITING[0] and churn.MISSES:
        rec = churn.find(graph.structure, len(out_edges), len(in_edges), create_graph)
        if rec is not None and rec.skip(_given(given, grad_tensors)):
            raise churn.Routed(churn.REASON)
    if hooks.saved_hooks_used() and _C.saved_hooks_in(graph, graph_cache._spec):
        raise Unplannable(SAVED_HOOKS_REASON)
    if hooks.node_hooks_used() and hooks.node_hooks_in(graph.order):
        raise Unplannable(NODE_HOOKS_REASON)
    key, freed = graph_cache.signature(graph, out_edges, grad_tensors, in_edges, bind,
                                       create_graph)
    return Capture(grad_tensors, bind, graph, in_edges, key, freed, rec, given)


def _walk(out_edges, in_edges):
    """The call's walk (_collect) and the ids of its leaf inputs: an input is an edge
    (node, k) or a leaf tensor, found through its AccumulateGrad node."""
    leaf_ids, input_ids = set(), set()
    for e in in_edges:
        if type(e) is tuple:
            input_ids.add(id(e[0]))
        else:
            leaf_ids.add(id(e))
    return _collect([n for n, _ in out_edges], input_ids, leaf_ids), leaf_ids


# Nodes whose derivative PyTorch computes otherwise under vmap: evenly_distribute_backward
# multiplies by its mask for a batched gradient (a tensor "subclass"), where a plain CPU one
# fills 0 off the mask (an inf or NaN gradient gives NaN there under vmap, 0 per row).
_VMAP_DIFFERS = frozenset(["MaxBackward1", "MinBackward1", "MedianBackward0",
                           "NanmedianBackward0"])


def rows_alike(out_edges, in_edges):
    """Whether a batched call (is_grads_batched) may run its graph once per row, as fastgrad
    does: PyTorch runs the backward once under vmap, so a tensor hook or a Python Function's
    backward (a user's code) would run once per row here, code that vmap refuses (.item())
    would run, and a node whose derivative vmap changes (_VMAP_DIFFERS) would give another
    result."""
    if hooks.any_registered():
        return False
    graph, _ = _walk(out_edges, in_edges)
    nexts, needed = graph.nexts, graph.needed
    return not any((isinstance(fn, torch.autograd.function.BackwardCFunction) and
                    not graph_cache._spec(type(fn), fn)[1] or fn.name() in _VMAP_DIFFERS) and
                   graph_cache.runs(fn, nexts, needed) for fn in graph.order)


def _given(in_edges, grad_tensors):
    """The tensors a call is given (its leaf inputs and grad_outputs): what churn.py knows of
    its size before it is signed."""
    return [e for e in in_edges if type(e) is not tuple] + list(grad_tensors)


def _route(cap, nout, nin, create_graph):
    """For a call whose signature is not cached: raises churn.Routed when its graph changes
    from call to call and is small enough that PyTorch's engine costs less than planning it;
    else returns its structure's churn.Record (a call counts once: ``cap.counted``)."""
    if cap.counted:
        return cap.churn
    rec = cap.churn or churn.record(cap.graph.structure, nout, nin, create_graph)
    cap.churn, cap.counted = rec, True
    if churn.route(rec, cap.key, cap.bind.tensors, _given(cap.given, cap.grad_tensors)):
        raise churn.Routed(churn.REASON)
    return rec


def hit(out_edges, grad_tensors, in_edges, create_graph, retain_graph, walk=None):
    """(results, capture): the gradients of a graph seen before, run straight from its cached
    plan (after its fallback nodes, replayed), or None when the call needs more than that (a
    graph not seen before, a freed one, a gradient that is None, a fallback node whose results
    changed layout); then ``run`` takes the capture and decides.

    The same walk, signature, replay and plan as ``run`` takes on a hit, without the
    bookkeeping a miss or explain needs: on a graph of a few nodes that bookkeeping cost as
    much as the region itself. ``walk``: the call's walk and signature, made by
    _C.repeat_call (csrc/repeat_call.h), which declined it."""
    if walk is None:
        try:
            cap = _capture(out_edges, grad_tensors, in_edges, create_graph)
        except RuntimeError as e:
            raise _graph_error(e) from None
    else:
        _, _, given, edges, graph, bind, key, freed, rec = walk
        cap = Capture(grad_tensors, bind, graph, edges, key, freed, rec, given)
    entry = graph_cache.lookup(cap.key)
    if entry is None and cap.key is not None and churn.MISSES:
        _route(cap, len(out_edges), len(in_edges), create_graph)
    if entry is None or cap.freed or entry.plan is None:
        return None, cap
    graph = cap.graph
    if not _still_bound(entry, cap, create_graph, None, retain_graph):
        cap.stale = True
        return None, cap
    rec = entry.churn
    if rec is not None and rec.recent:
        rec.hit()
    results = execute(entry.plan, cap.bind.tensors, create_graph)
    if not retain_graph:
        _mark_freed(graph)
    return results, cap


def run(out_edges, grad_tensors, in_edges, create_graph, retain_graph, allow_unused,
        trace=None, cap=None):
    """Gradients (tensors or None) flowing into ``in_edges``; raises Unplannable to defer.
    ``cap``: this call's capture, from a declined ``hit`` (its grad_tensors are the ones
    bound)."""
    if ir.table_size() > IR_TABLE_LIMIT:
        # Graphs of ever new shapes would grow the hash-consing table without bound. Nodes are
        # immutable and every cache is keyed by identity, so forgetting them is safe (between
        # calls); the caches holding old nodes go too, to free them.
        ir.clear_tables()
        graph_cache.clear()
        clear_plan_cache()
    trace = trace or Trace()
    if cap is None:
        try:
            cap = _capture(out_edges, grad_tensors, in_edges, create_graph)
        except RuntimeError as e:
            raise _graph_error(e) from None
    grad_tensors = cap.grad_tensors
    bind, graph, in_edges, key, freed = cap.bind, cap.graph, cap.in_edges, cap.key, cap.freed
    order, needed, nexts = graph.order, graph.needed, graph.nexts
    entry = graph_cache.lookup(key)
    exprs = rec = None
    if entry is not None:
        if freed:
            raise Unplannable(GRAPH_ERROR_REASON)
        if not cap.stale and _still_bound(entry, cap, create_graph, trace.stats, retain_graph):
            exprs = entry.exprs
            trace.native.extend(entry.native)
            trace.fallback.extend(entry.fallback)
            if entry.churn is not None and entry.churn.recent:
                entry.churn.hit()
        else:  # bound otherwise than last time: derive anew
            bind = _Binder()
            key, _ = graph_cache.signature(graph, out_edges, grad_tensors, in_edges, bind,
                                           create_graph)
    elif key is not None and churn.MISSES:
        rec = _route(cap, len(out_edges), len(in_edges), create_graph)
    if exprs is None:
        native_before, fallback_before = len(trace.native), len(trace.fallback)
        tape = []
        tied = []
        try:
            exprs = sweep.sweep(order, needed, nexts, out_edges, grad_tensors, in_edges,
                           create_graph, bind, trace, tape, graph.leaf_nodes, tied,
                           retain_graph, cap.ran)
        except RuntimeError as e:
            raise _graph_error(e, trace) from None
        entry = graph_cache.store(key, exprs, trace.native[native_before:],
                                  trace.fallback[fallback_before:], tape, len(bind.tensors),
                                  tied, rec)
    if not allow_unused and None in exprs:
        first = exprs.index(None)
        if not needed.get(id(in_edges[first][0])):
            # no path reaches it: PyTorch's error, after its engine would have run the graph
            # (and freed it), raised here, since handing the call to PyTorch would run the
            # fallback nodes a second time (and meet the ones PyTorch freed)
            if not retain_graph:
                _mark_freed(graph)
            raise RuntimeError(unused_message(first))
        raise Unused()  # before the graph is marked freed, so PyTorch can raise its own error
    if entry is not None and entry.plan is None and None not in exprs:
        entry.plan = get_plan(exprs, bind.tensors)  # (what materialize looks up next)
        if rec is not None and rec.churns():
            # planned for a graph whose shapes keep changing: it may never run jit.AFTER
            # times, but its loops serve the next shapes too (jit.adopt)
            for r in entry.plan.regions:
                r.eager = True
    results = materialize(exprs, bind.tensors, create_graph, trace.stats)
    if not retain_graph:  # as PyTorch frees what its engine ran, not the captured inputs
        _mark_freed(graph)
    return results


def _mark_freed(graph):
    """Consume the nodes a call ran with retain_graph=False, as PyTorch's engine does: flag
    them (node_view.is_freed) and free their saved tensors (csrc/saved_tensors.h, mark_freed)."""
    _C.mark_freed(graph, node_view.FREED, _refuse_freed, graph_cache._spec,
                  hooks._orig_saved_register, _drop_saved, _refuse_unpack)


def _drop_saved(t):
    """Pack hook of a freed node's saved tensor: keeps nothing, so PyTorch lets it go."""
    return None


def _refuse_unpack(packed):
    """Unpack hook of a freed node's saved tensor: what PyTorch raises for a freed one."""
    raise RuntimeError(freed_message())


def _still_bound(entry, cap, create_graph, stats, keep):
    """Whether the cached ``entry``'s IR holds for this call: its fallback nodes, replayed
    (binding their results), give results laid out as the first time, and the call has bound
    as many tensors as the first one, and the tensors its IR ties to the expressions that
    made them are unchanged since (version 0; sweep._link_saved). (A saved tensor that unpacks as a
    new tensor each time, as under saved-tensor hooks, is bound anew by lowering: the first
    call's IR then reads a leaf that the signature alone does not bind.)"""
    g = cap.graph
    if entry.tape and not sweep.replay(entry.tape, g.order, g.needed, cap.bind, create_graph, stats,
                                  keep, cap.ran):
        return False
    tensors = cap.bind.tensors
    if len(tensors) != entry.nbound:
        return False
    for k in entry.tied:
        if tensors[k]._version != 0:
            return False
    return True


def _refuse_freed(grads):
    """Pre-hook on a consumed node whose saved tensors could not take the hooks above (they
    have saved-tensor hooks already): it refuses to run again instead of losing them, with
    PyTorch's own "backward through the graph a second time" error."""
    raise RuntimeError(freed_message())


def _leaf_edge(t):
    # A leaf the outputs do not reach: its node is not in the graph (it gets no gradient).
    with node_view.recording():
        return t.view_as(t).grad_fn.next_functions[0]


