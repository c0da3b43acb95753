"""Capture and reverse sweep over PyTorch's autograd graph.

The sweep visits the nodes that lie between the outputs and the inputs, consumers before
producers (as PyTorch's engine does). A node in the lowering table becomes IR and its VJP comes
from the IR rules; the cotangents stay symbolic, so a whole chain of nodes ends up as one
expression that the planner fuses. A node that cannot be lowered is *opaque*: the cotangents it
receives are computed (a flush), PyTorch's own node is called on them, and its results re-enter
the sweep as bound tensors.
"""
import torch

from . import _C, churn, graph_cache, hooks, ir, lowering, node_view, plan, rules
from .plan import Unplannable, clear_plan_cache, get_plan, recomputable
from .runtime import execute, materialize
from .runtime_table import DTYPE_CODES

# Taken at import, so that patching torch.autograd.grad to fastgrad.grad cannot recurse.
_torch_grad = torch.autograd.grad
_GradientEdge = torch.autograd.graph.GradientEdge
# Devices the compiled evaluator runs on (CUDA when the extension was built with it).
_DEVICE_TYPES = ("cpu", "cuda") if _C.cuda_compiled() and hasattr(_C, "run_cuda") else ("cpu",)


class Trace:
    """What a call did: which nodes ran natively, which fell back and why, kernel stats."""

    def __init__(self, stats=None):
        self.native, self.fallback, self.stats = [], [], stats
        self.user_code = False  # whether a tensor hook or a Python Function's backward ran


_FREED_MSG = []


def freed_message():
    """PyTorch's own text for a graph used after it was freed (read once from PyTorch)."""
    if not _FREED_MSG:
        with node_view.recording():
            x = torch.zeros(1, requires_grad=True)
            y = x.exp()
            _torch_grad(y.sum(), x)
        try:
            y.grad_fn._saved_result
        except RuntimeError as e:
            _FREED_MSG.append(str(e))
        else:  # pragma: no cover - PyTorch always raises here
            _FREED_MSG.append("Trying to backward through the graph a second time")
    return _FREED_MSG[0]


# PyTorch's errors for a graph it cannot run: freed, or a saved tensor modified in place. Its
# engine meets one at the first node in its own order that needs the tensor, after running the
# nodes before it (and, without retain_graph, freeing them), so the call goes to PyTorch for
# the error: the node its message names and what it frees on the way are PyTorch's. Not where
# fastgrad already ran user code (a tensor hook, a Python Function's backward) in this call,
# which PyTorch would run again: there fastgrad raises PyTorch's error itself.
_GRAPH_ERRORS = ("Trying to backward through the graph a second time",
                 "one of the variables needed for gradient computation has been modified")
GRAPH_ERROR_REASON = ("PyTorch raises for this graph (freed, or a saved tensor modified in "
                      "place) after running the nodes before the one it fails at")


def graph_error(e):
    """Whether RuntimeError ``e``, met while reading or running the graph, is one of those the
    call hands to PyTorch."""
    return not getattr(e, "_fastgrad_final", False) and \
        any(m in str(e) for m in _GRAPH_ERRORS)


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


_ENGINE_MIN_NUMEL = 1 << 16  # see _call_opaque
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


def _slots(outs):
    found = {}
    for n in ir.topo(outs):
        if n.op == "slot":
            found.setdefault(n.attrs[0], n)
    return found


def _lower_vjp(fn, gs, bind, forwards=None):
    """Cotangents (IR) of fn's inputs from those of its outputs, via the IR rules; with
    ``forwards`` (a dict), the node's outputs as IR over the values PyTorch saved go into
    ``forwards[id(fn)]`` (for _link_saved)."""
    outs = lowering.lower(fn, bind, freed_message)
    slots = _slots(outs)
    edges = fn.next_functions
    wrt = [slots.get(i) for i in range(len(edges))]
    present = [w for w in wrt if w is not None]
    cots = [None if g is None else ir.cast(g, o.dtype) for g, o in zip(gs, outs)]
    res = dict(zip(map(id, present), rules.vjp(outs, cots, present)))
    grads = [res.get(id(w)) if w is not None else None for w in wrt]
    # Slots stand for the node's inputs only while deriving; put their saved values back.
    # Neither this nor the check below walks the cotangent built so far (ir.Node.based,
    # .bare): on a chain of n nodes each would walk it again (the first call of a 200-step
    # chain took 10 s).
    mapping = {id(s): s.args[0] for s in slots.values() if s.args}
    grads = ir.substitute(grads, mapping, keep=lambda m: not m.based)
    if forwards is not None and fn.name() in lowering.FAITHFUL:
        forwards[id(fn)] = (outs, slots, edges)
    if any(g is not None and edges[i][0] is not None and g.bare for i, g in enumerate(grads)):
        raise lowering.Unsupported("its derivative needs an input PyTorch did not save")
    return grads


def _reaches(src, targets, needed):
    """Whether node src leads (through nodes on a needed path) to one of targets."""
    stack, seen = [src], set()
    while stack:
        n = stack.pop()
        for m, _ in n.next_functions:
            if m is None or id(m) in seen or not needed.get(id(m)):
                continue
            if id(m) in targets:
                return True
            seen.add(id(m))
            stack.append(m)
    return False


def _call_opaque(fn, gs, create_graph, needed, keep=True, ran=None):
    """Run one PyTorch node on its incoming gradients; returns (edges, gradients). ``keep``:
    the call's retain_graph, given to the backward torch.compile made (AOTAutograd's
    CompiledFunctionBackward: with donated buffers it refuses to run in a graph that is kept);
    other nodes run with the graph kept, so that a call handed to PyTorch after the sweep (an
    unused input, a plan that cannot be made) can run them again. ``ran``: id(node) -> what it
    returned earlier in this call (a replay that did not hold), so that no node runs twice."""
    if ran:
        done = ran.pop(id(fn), None)
        if done is not None:
            return done
    if node_view.is_freed(fn) and node_view.holds_saved_tensors(fn):
        raise RuntimeError(freed_message())
    # A C++ node called directly computes a result for every edge, wanted or not (e.g. a
    # convolution's weight gradient when only the input's is asked for). PyTorch's engine
    # computes only the wanted ones (and runs the node's own hooks) but costs a walk of the
    # whole graph below the node per call, so it is used only when the unwanted work is large.
    direct = callable(fn) and (
        all(m is None or needed.get(id(m)) for m, _ in fn.next_functions) or
        sum(g.numel() for g in gs if g is not None) < _ENGINE_MIN_NUMEL)
    if not direct:
        # PyTorch's engine runs the node (computing only the wanted edges, materialising
        # gradients, mapping a Python Function's results to its tensor inputs) when stopped
        # at its input edges. That is exact only when no input edge lies behind another, or
        # the engine would add the indirect paths too.
        edges = list(dict.fromkeys((m, k) for m, k in fn.next_functions
                                   if m is not None and needed.get(id(m))))
        ids = {id(m) for m, _ in edges}
        if any(_reaches(m, ids - {id(m)}, needed) for m, _ in edges):
            if not callable(fn):
                raise Unplannable(
                    f"{fn.name()}: a Python Function whose inputs depend on each other")
            direct = True
    if direct:  # one result per next edge
        with torch.set_grad_enabled(create_graph):
            res = fn(*gs)
        done = fn.next_functions, _dense((res,) if isinstance(res, torch.Tensor) else res)
    else:
        outs = [_GradientEdge(fn, j) for j, g in enumerate(gs) if g is not None]
        gos = [g for g in gs if g is not None]
        res = _torch_grad(outs, [_GradientEdge(m, k) for m, k in edges], gos,
                          retain_graph=keep or fn.name() != "CompiledFunctionBackward",
                          create_graph=create_graph, allow_unused=True)
        done = edges, _dense(res)
    if ran is not None:
        ran[id(fn)] = done
    return done


def _dense(res):
    """A node's results with PyTorch's efficient zero tensors (no storage: what e.g. the
    double backward of abs returns) as ordinary zeros, which the regions can read."""
    if not any(r is not None and r._is_zerotensor() for r in res):
        return res
    return tuple(torch.zeros(r.shape, dtype=r.dtype, device=r.device)
                 if r is not None and r._is_zerotensor() else r for r in res)


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
        self.ran = {}  # id(fallback node) -> what it returned in this call (_call_opaque)


SAVED_HOOKS_REASON = ("saved-tensor hooks packed a tensor the graph saved: PyTorch unpacks it "
                      "once, fastgrad would read it several times")
NODE_HOOKS_REASON = "a node has hooks (grad_fn.register_prehook / register_hook)"
TORCH_HOOKS_REASON = ("a tensor hook of PyTorch's own (register_multi_grad_hook) reads the state "
                      "of PyTorch's engine")


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


def rows_alike(out_edges, in_edges):
    """Whether a batched call (is_grads_batched) may run its graph once per row, as fastgrad
    does: PyTorch runs the backward once under vmap, so a tensor hook or a Python Function's
    backward (a user's code) would run once per row here, and code that vmap refuses (.item())
    would run."""
    if hooks.any_registered():
        return False
    graph, _ = _walk(out_edges, in_edges)
    nexts, needed = graph.nexts, graph.needed
    return not any(isinstance(fn, torch.autograd.function.BackwardCFunction) and
                   not graph_cache._spec(type(fn), fn)[1] and graph_cache.runs(fn, nexts, needed)
                   for fn in graph.order)


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
            exprs = _sweep(order, needed, nexts, out_edges, grad_tensors, in_edges,
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
    made them are unchanged since (version 0; _link_saved). (A saved tensor that unpacks as a
    new tensor each time, as under saved-tensor hooks, is bound anew by lowering: the first
    call's IR then reads a leaf that the signature alone does not bind.)"""
    g = cap.graph
    if entry.tape and not _replay(entry.tape, g.order, g.needed, cap.bind, create_graph, stats,
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


def _run_tensor_hooks(th, fn, cot, bind, create_graph, trace):
    """Run the tensor hooks of fn's outputs on their gradients (in ``cot``), in registration
    order, as PyTorch does before calling the node; a hook's result replaces the gradient. A
    tensor that retains its gradient gets it added to its ``.grad`` (a contiguous copy the
    first time), after the hooks, as PyTorch's retains_grad hook does."""
    for k, d, retaining in th:
        g = cot.get((id(fn), k))
        if g is None:
            continue
        g = materialize([g], bind.tensors, create_graph, trace.stats)[0]
        if retaining is not None:
            with torch.set_grad_enabled(create_graph):
                retaining.grad = g.clone(memory_format=torch.contiguous_format) \
                    if retaining.grad is None else retaining.grad + g
            cot[(id(fn), k)] = bind(g)
            continue
        for hook in list(d.values()):
            r = hook(g)
            if r is not None:
                g = _hook_result(hook, g, r)
        cot[(id(fn), k)] = bind(g)


class _Returns:
    """A tensor hook that returns ``r``, named as ``hook`` where it has a name (PyTorch's
    errors about a hook's result name it)."""

    def __init__(self, hook, r):
        self.r = r
        if hasattr(hook, "__name__"):
            self.__name__ = hook.__name__

    def __call__(self, g):
        return self.r


def _hook_result(hook, g, r):
    """``r``, what tensor hook ``hook`` returned for gradient ``g``, where PyTorch would take
    it in g's place; else PyTorch's own error (a result of another type, dtype, device or
    shape). A result that looks wrong is checked by PyTorch itself: the same result returned
    by a hook on a throwaway graph whose gradient is laid out as ``g``, so that the error is
    the installed PyTorch's, and what it accepts is accepted (the hook is not called again)."""
    if isinstance(r, torch.Tensor) and r.shape == g.shape and r.dtype == g.dtype and \
            r.device == g.device:
        return r
    with node_view.recording():
        t = torch.zeros(g.shape, dtype=g.dtype, device=g.device, requires_grad=True)
        h = t * 1
        hooks._orig_register_hook(h, _Returns(hook, r))
        torch.autograd.grad(h, t, torch.zeros_like(h))
    return r


def _replay(tape, order, needed, bind, create_graph, stats, keep, ran):
    """Run a cached graph's fallback nodes as its first sweep did; False if a node's results
    are not bound to the leaf numbers (and layouts) they had then (what each node returned
    stays in ``ran``, for the sweep that derives the call anew)."""
    for pos, gs, bound in tape:
        gts = materialize(gs, bind.tensors, create_graph, stats)
        _, res = _call_opaque(order[pos], gts, create_graph, needed, keep, ran)
        if _records(bind, res) != bound:
            return False
    return True


def _records(bind, res):
    """How a fallback node's results were bound (compared by a replay)."""
    return tuple(None if r is None else bind.record(r) for r in res)


def _sweep(order, needed, nexts, out_edges, grad_tensors, in_edges, create_graph, bind, trace,
           tape=None, leaf_nodes=None, tied=None, keep=True, ran=None):
    """The reverse sweep: IR of the gradients flowing into ``in_edges`` (None where none).

    Each fallback node call is appended to ``tape`` as (position in order, the IR of its
    incoming cotangents, the leaf records of its results), so a later call with the same
    signature can replay it; the numbers of the tensors whose values the IR ties to their
    producers (_link_saved) go into ``tied``."""
    if hooks.any_registered() and hooks.torch_tensor_hooks_in(order):
        raise Unplannable(TORCH_HOOKS_REASON)  # (before any hook ran)
    input_ids = {id(n) for n, _ in in_edges}
    cot, forwards = {}, {}

    def accumulate(node, k, g):
        key = (id(node), k)
        cot[key] = g if key not in cot else ir.add(cot[key], g)

    for (n, k), g in zip(out_edges, grad_tensors):
        if g is not None:
            meta = n._input_metadata[k]
            accumulate(n, k, ir.cast(bind(g), meta.dtype))
    answers = {}
    for fn in order:
        th = hooks.tensor_hooks(fn)
        if th:  # before an input's gradient is captured, as PyTorch runs them
            trace.user_code = True
            _run_tensor_hooks(th, fn, cot, bind, create_graph, trace)
        if id(fn) in input_ids:
            for n, k in in_edges:
                if n is fn:
                    answers[(id(n), k)] = cot.get((id(n), k))
        if not graph_cache.runs(fn, nexts, needed):
            continue
        edges = nexts[id(fn)]
        gs = [cot.pop((id(fn), j), None) for j in range(len(fn._input_metadata))]
        if all(g is None for g in gs):
            continue
        try:
            grads = _lower_vjp(fn, gs, bind, forwards)
            trace.native.append(fn.name())
        except lowering.Unsupported as e:
            trace.fallback.append((fn.name(), str(e)))
            gts = materialize(gs, bind.tensors, create_graph, trace.stats)
            if isinstance(fn, torch.autograd.function.BackwardCFunction):
                trace.user_code = True
            edges, res = _call_opaque(fn, gts, create_graph, needed, keep, ran)
            grads = [None if r is None else bind(r) for r in res]
            if tape is not None:
                tape.append((order.index(fn), gs, _records(bind, res)))
        for (m, k), g in zip(edges, grads):
            if m is None or g is None or not needed.get(id(m)):
                continue
            meta = m._input_metadata[k]
            accumulate(m, k, ir.cast(ir.sum_to(g, tuple(meta.shape)), meta.dtype))
    exprs = [answers.get((id(n), k)) for n, k in in_edges]
    device = bind.device
    # (a tie changes nothing in a plan that loads every saved value)
    if plan.RECOMPUTE.get(device.type if device is not None else "cpu", False):
        exprs = _link_saved(exprs, bind, forwards, order, leaf_nodes,
                            tied if tied is not None else [])
    node_view.forget_pending(bind)  # (the checks hooked() did not need hold nodes and tensors)
    return exprs


def _link_saved(exprs, bind, forwards, order, leaf_nodes, tied):
    """``exprs`` with each saved tensor bound to the forward expression of the node that made
    it, where that is elementwise work on values the plan can read (plan.recomputable): sin(x)
    for MulBackward0's saved ``self`` = sin(x), exp(x) for its ``other``. The value is still
    loaded, unless the plan computes it again (plan.RECOMPUTE).

    ``forwards``: id(node) -> (its outputs as IR over its input slots, the slots, its edges),
    for each node the sweep lowered whose forward is PyTorch's (lowering.FAITHFUL). A node's
    forward expression reads what it saved where it saved it (PyTorch's version check vouches
    that it is what the node read), and otherwise the bound tensor made by the node at the
    input edge's end (a leaf input is its AccumulateGrad node's); producers come after
    consumers in ``order``. A tensor is tied only while its version is 0: changed in place
    since it was made, it no longer holds its producer's value. The signature records the
    node that made each bound tensor (csrc/capture.cpp, write_tensor), and the numbers of the
    tensors whose version 0 the IR relies on go into ``tied`` (_still_bound checks them
    before a cached sweep is used again)."""
    made, number = {}, {}  # tensor number <-> (id of the node that made it, output number)
    leaf_nodes = leaf_nodes or {}
    hooked = node_view.hooked(bind)
    for key, k in bind.keys.items():
        if k in hooked:  # (its value is what a saved-tensor hook gave back)
            continue
        node = leaf_nodes.get(key[5])
        made[k] = (id(node) if node is not None else key[5], key[6])
        number.setdefault(made[k], k)
    tensors, fwd, linked = bind.tensors, {}, {}

    def bound(k):
        """The IR of bound tensor k: tied to its producer's expression where that can be."""
        if k not in linked:
            if k not in made:  # (not bound through the binder: nothing to tie)
                return None
            t, e = tensors[k], None
            outs = fwd.get(made[k][0])
            if outs is not None and made[k][1] < len(outs) and t._version == 0:
                e = outs[made[k][1]]
            shape = tuple(t.shape)
            if e is not None and e.shape == shape and e.dtype == t.dtype and \
                    recomputable(ir.with_known(e, k)):
                linked[k] = ir.with_known(e, k)
                tied.append(k)
            else:
                linked[k] = ir.leaf(k, shape, t.dtype)
        return linked[k]

    for fn in reversed(order):  # (producers first)
        rec = forwards.get(id(fn))
        if rec is None:
            continue
        outs, slots, edges = rec
        mapping = {}
        for i, s in slots.items():
            base = s.args[0] if s.args else None
            if base is not None:
                if any(m.known in hooked for m in ir.topo([base])):
                    break  # (the node computed with the original, not the hook's value)
                b = bound(base.known) if base.op == "leaf" else None
                mapping[id(s)] = base if b is None else b
                continue
            # An input the node did not save: the tensor along its edge where that is bound
            # and unchanged since it was made (so what the node read). Not the producer's
            # expression of an unbound one: nothing tells whether it changed in place before
            # the node read it.
            m, j = edges[i] if i < len(edges) else (None, 0)
            k = number.get((id(m), j)) if m is not None else None
            if k is not None and tensors[k]._version == 0:
                mapping[id(s)] = bound(k)
                tied.append(k)
        else:
            fwd[id(fn)] = ir.substitute(outs, mapping)
    # Every node bound to a tied tensor is replaced: a leaf, and a node lowering bound itself
    # (ExpBackward0's exp of its input, which it did not save, bound to its saved result), so
    # that one node stands for the tensor (a plan computing it again then loads it nowhere).
    # Not products nor detached nodes, which a create_graph block treats apart (blocks.py).
    mapping = {}
    for n in ir.topo(exprs, stop=ir.is_known):
        if n.known is None or n.op == "mm" or n.detached or n.known not in made:
            continue
        b = bound(n.known)
        if b is not None and b.op != "leaf" and b is not n and b.shape == n.shape and \
                b.dtype == n.dtype:
            mapping[id(n)] = b
    return ir.substitute(exprs, mapping) if mapping else exprs
