"""The reverse sweep over the nodes a call's walk collected (engine.py captures the graph and
runs what the sweep derives).

The sweep visits the nodes that lie between the outputs and the inputs, consumers before
producers (as PyTorch's engine does). A node in the lowering table becomes IR and its VJP comes
from the IR rules; the cotangents stay symbolic, so a whole chain of nodes ends up as one
expression that the planner fuses. A node that cannot be lowered is *opaque*: the cotangents it
receives are computed (a flush), PyTorch's own node is called on them, and its results re-enter
the sweep as bound tensors (each such call is taped, for a later call to ``replay``). Tensor
hooks run where PyTorch runs them, and saved tensors are tied to the expressions of the nodes
that made them (``_link_saved``) where the device's plans may compute them again.
"""
import torch

from . import graph_cache, hooks, ir, lowering, node_view, plan, rules
from .node_view import TORCH_GRAD as _torch_grad, freed_message
from .plan import Unplannable, recomputable
from .runtime import materialize

_GradientEdge = torch.autograd.graph.GradientEdge
_ENGINE_MIN_NUMEL = 1 << 16  # see _call_opaque
TORCH_HOOKS_REASON = ("a tensor hook of PyTorch's own (register_multi_grad_hook) reads the state "
                      "of PyTorch's engine")


# Nodes whose backward in PyTorch returns the gradient it is given, or a view of it (add's,
# clone's, a view's): a gradient that reaches an input only through them is the caller's
# grad_output (or a view of it), as fastgrad's plan returns a bound tensor. Any other node
# computes a new tensor, even where its derivative is the identity (a split into one piece,
# the mean of one element, a division by 1), which the IR simplifies away: _fresh.
PASSES_GRADIENT = frozenset([
    "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "CloneBackward0",
    "AliasBackward0", "ToCopyBackward0", "ExpandBackward0", "ViewBackward0",
    "ReshapeAliasBackward0", "UnsafeViewBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "SqueezeBackward2", "UnsqueezeBackward0", "TBackward0", "PermuteBackward0",
    "TransposeBackward0", "CatBackward0", "SumBackward0", "SumBackward1",
    "RegionFunctionBackward",
])


def _fresh(g):
    """Cotangent ``g`` of a node that makes a new tensor: where it is a bound tensor (or
    views of one), times 1, computed (exact: x * 1 is x, NaN and -0 included)."""
    return g if g is None or not ir.views_bound(g) else ir.ew("mul", g, 1.0)


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
    outs = lowering.lower(fn, bind)
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
        # (a node of one input edge returns its gradient alone, or None: vector_norm of order 0
        # has no derivative)
        done = fn.next_functions, _dense((res,) if res is None or isinstance(res, torch.Tensor)
                                         else res)
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


def replay(tape, order, needed, bind, create_graph, stats, keep, ran):
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


def sweep(order, needed, nexts, out_edges, grad_tensors, in_edges, create_graph, bind, trace,
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
            name = fn.name()
            trace.native.append(name)
            if name not in PASSES_GRADIENT:
                grads = [_fresh(g) for g in grads]
        except lowering.Unsupported as e:
            trace.fallback.append((fn.name(), str(e)))
            gts = materialize(gs, bind.tensors, create_graph, trace.stats)
            if isinstance(fn, torch.autograd.function.BackwardCFunction):
                trace.user_code = True
            try:
                edges, res = _call_opaque(fn, gts, create_graph, needed, keep, ran)
            except RuntimeError as e:
                e._fastgrad_node_error = True  # (the call goes to PyTorch: engine.graph_error)
                raise
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
