"""create_graph: a plan's results as one node of PyTorch's graph.

Under ``create_graph`` a plan runs as one block (``Blocked`` says how its results come out,
``PlanBlock`` is the block) inside one ``RegionFunction``, a torch.autograd.Function whose
inputs are the tensors the plan reads, so its outputs are differentiable: the Function's backward
is the block's own VJP (rules.vjp of its IR), planned and run like any other. A later
``fastgrad.grad`` that meets such a node lowers it back to IR (lowering.py,
"RegionFunctionBackward") and keeps fusing.
"""
import threading

import torch

from . import ir, rules, runtime
from . import plan as plan_mod
from .plan import get_plan
from .plan_steps import ViewStep, view_chain


class RegionFunction(torch.autograd.Function):
    """A create_graph plan (PlanBlock) as one node of PyTorch's graph: its backward is
    rules.vjp of the block's IR (``local_outputs`` over ``local_inputs``). (The name dates from
    when each region was a node of its own.)"""

    @staticmethod
    def forward(ctx, region, *ins):
        ctx.region = region
        outs, products = region.run(ins)
        ctx.save_for_backward(*ins, *products)  # (the backward's tensors: ins, then these)
        # As in PyTorch, a result that depends on no grad-requiring input only through
        # differentiable ops (e.g. relu's mask) does not require grad.
        # One call: each mark_non_differentiable call replaces the previous set.
        nondiff = []
        for o, deps in zip(outs, region.diff_deps):
            for i in deps:
                if ins[i].requires_grad:
                    break
            else:
                nondiff.append(o)
        if nondiff:
            ctx.mark_non_differentiable(*nondiff)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gs):
        region = ctx.region
        ins = ctx.saved_tensors
        need = ctx.needs_input_grad[1:]
        specs = tuple([None if g is None else (tuple(g.shape), g.dtype) for g in gs])
        # The IR is hash-consed, so the derivation is the same for the same region, wanted
        # inputs and cotangent layouts: derived once (a backward through our regions on every
        # training step, e.g. a gradient penalty's, then costs one plan lookup).
        vjps = region.vjps
        entry = vjps.get((need, specs))
        if entry is None:
            n = len(ins)
            cots = [None if s is None else ir.leaf(n + j, s[0], s[1])
                    for j, s in enumerate(specs)]
            wrt = [w for w, nd in zip(region.local_inputs, need) if nd]
            res = iter(rules.vjp(region.local_outputs, cots, wrt))
            grads = [next(res) if nd else None for nd in need]
            entry = vjps[(need, specs)] = (grads, [i for i, e in enumerate(grads)
                                                   if e is not None and e.op == "mm"])
        grads, products = entry
        tensors = list(ins) + list(gs)
        res = runtime.materialize(grads, tensors, torch.is_grad_enabled())
        if products:
            res = _in_operand_layout(list(res), products, ins)
        return (None,) + tuple(res)


def _column_major(t):
    """PyTorch's test for a column-major matrix operand (FunctionsManual's mm_mat1_backward and
    mm_mat2_backward): a transposed weight, as nn.Linear saves it for addmm."""
    return t.dim() == 2 and t.stride(0) == 1 and t.stride(1) == t.shape[0]


def _in_operand_layout(res, products, ins):
    """``res`` with each product's result (at indices ``products``) whose input is column-major
    laid out column-major: PyTorch's mm backward gives an operand's gradient the operand's
    layout, so the gradient of a transposed weight reaches its TBackward column-major and the
    weight's gradient comes out contiguous (code that flattens it with .view(-1) works; a hook
    on the weight sees PyTorch's strides). The IR has no layout (ir.permute writes a transposed
    product back as a product): a copy, the size of a weight, where PyTorch computes the
    product transposed."""
    for i in products:
        r = res[i]
        if r is not None and r.dim() == 2 and _column_major(ins[i]) and not _column_major(r):
            res[i] = r.t().contiguous().t()
    return res


# Function.apply's Python part only binds default arguments (RegionFunction has no
# setup_context) and unwraps functorch wrappers before calling the C apply; without functorch
# transforms active, calling the C apply directly is the same call, 2-3 us cheaper (a region
# per create_graph call on small graphs).
_C_APPLY = getattr(torch._C._FunctionBase, "__dict__", {}).get("apply")
_C_APPLY = _C_APPLY.__get__(None, RegionFunction) if hasattr(_C_APPLY, "__get__") else None
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)


def _apply_region(region, *ins):
    if _C_APPLY is None or _functorch_active is None or _functorch_active():
        return RegionFunction.apply(region, *ins)
    return _C_APPLY(region, *ins)


class PlanBlock:
    """The expressions ``requested`` of a plan run under create_graph, as one RegionFunction:
    the forward is their plain run (through the Executor on the CPU), so a create_graph call
    costs one Function node instead of one per region and product.

    Its inputs are the bound tensors the expressions read (one per bound IR node, read as that
    node's shape). It also saves, after its inputs, the results of the matrix products it
    computes (not those it returns, which the caller may change in place). Its IR
    (``local_outputs``: the expressions over those inputs) is what its backward derives and
    what a later fastgrad.grad inlines through lowering's RegionFunctionBackward; there the
    products are bound to their saved results (``known``: loaded, as PyTorch's own nodes
    would, not recomputed) but keep their operands, so the derivative goes through them; so
    are ``detached`` bound nodes (ir.py), whose tensors have no graph to carry it. The
    elementwise work between inputs and outputs is recomputed (a pass over memory costs less
    than keeping its result). A bound product met in a later plan (another block's saved
    result, which carries no graph of its own) is therefore an input of that plan's block
    for its value only, its operands followed further: every create_graph plan runs as a
    block (``Blocked``)."""

    def __init__(self, requested):
        carries_graph = lambda n: n.known is not None and n.op != "mm" and \
            not n.detached  # noqa: E731
        nodes = ir.topo(requested, stop=carries_graph)
        # One input per tensor read as one shape: different nodes can be bound to the same
        # tensor (softplus(x) * sigmoid(x): MulBackward0's saved `other` is a leaf,
        # SigmoidBackward0's saved result the sigmoid node), and each input is a load in the
        # block's loops, a tensor the Function saves and a gradient its backward returns. Nodes
        # whose graph the block carries and value-only reads stay apart (one is differentiated,
        # the other not).
        self.inputs, number, where = [], {}, {}
        for n in nodes:
            if n.known is not None:
                key = (carries_graph(n), n.known, n.shape, n.dtype)
                if key not in number:
                    number[key] = len(self.inputs)
                    self.inputs.append(n)
                where[id(n)] = number[key]
        n_in = len(self.inputs)
        self.local_inputs = [ir.leaf(i, n.shape, n.dtype) for i, n in enumerate(self.inputs)]
        leaves = {i: self.local_inputs[j] for i, j in where.items()
                  if carries_graph(self.inputs[j])}
        values = {i: j for i, j in where.items() if not carries_graph(self.inputs[j])}
        results = {id(n) for n in requested}
        made = [n for n in nodes if n.op == "mm" and n.known is None and id(n) not in results]
        self.nout = len(requested)
        # what the forward computes: the results, then the products it saves
        self._forward = ir.substitute(list(requested) + made,
                                      {**leaves, **self._tied(number, carries_graph)},
                                      lambda n: values.get(id(n)))
        # what is derived: the products bound to the saved tensors after the inputs
        saved = {**values, **{id(n): n_in + j for j, n in enumerate(made)}}
        self.local_outputs = ir.substitute(requested, leaves, lambda n: saved.get(id(n)))
        local = {id(m): i for i, m in enumerate(self.local_inputs)}
        self.diff_deps = [rules.differentiable_deps(o, lambda m: local.get(id(m)))
                          for o in self.local_outputs]
        # Inputs no result depends on differentiably (read in a mask only: maximum's operands)
        # enter the Function detached, as PyTorch's derivatives read them: no edge to their
        # nodes, which a call with retain_graph=False has freed (a later grad would walk
        # into them and fail where PyTorch's does not).
        used = set().union(*self.diff_deps)
        self.mask_only = [i for i in range(n_in) if i not in used]
        self.vjps = {}
        self.plans = {}  # on a GPU or not -> the forward's plan (plan.get_plan plans by device)

    def _tied(self, number, carries_graph):
        """id -> local node, for each input that the sweep tied to the expression that made it
        (sweep._link_saved: sin(x), x being an input too): in the forward it is that
        expression over the local inputs, bound to its own input, so that the block's plan
        computes it again or loads it as plan.RECOMPUTE says for the device. It stays an
        input: the derivative flows to it, as in PyTorch (a later grad with respect to sin(x)
        finds it), and the backward reads it."""
        known = ir.is_known
        tied = {}
        for j, n in enumerate(self.inputs):
            if n.op == "leaf" or not carries_graph(n) or not plan_mod.recomputable(n):
                continue
            body = plan_mod.with_unknown(n)
            args = {}
            for m in ir.topo([body], stop=known):
                if m.known is None:
                    continue
                k = number.get((carries_graph(m), m.known, m.shape, m.dtype))
                if k is None or not carries_graph(m):
                    break
                args[id(m)] = self.local_inputs[k]
            else:
                tied[id(n)] = ir.with_known(ir.substitute([body], args)[0], j)
        return tied

    def run(self, ins, device=None):
        """(results, the products to save) on the block's inputs (on ``device`` where there
        are none: results that are constants)."""
        cuda = ins[0].is_cuda if ins else False  # (get_plan's own test: any on a GPU)
        plan = self.plans.get(cuda)
        if plan is None:
            plan = self.plans[cuda] = get_plan(self._forward, ins)
        outs = runtime.execute(plan, list(ins), False, getattr(_BLOCK_STATS, "stats", None),
                               device)
        return outs[:self.nout], outs[self.nout:]


_BLOCK_STATS = threading.local()  # explain's Stats for the block runs of this thread's call


class Blocked:
    """How a plan's results come out under create_graph: each is a result of the plan's
    block, or a bound tensor, then maybe views of it (a reshape, an expand: the VJP of a sum),
    taken with grad mode on as PyTorch's engine takes them; a bound tensor returned as it is
    comes out as a view of it, a new tensor as PyTorch's node would give. A block returns
    each of its results once and none of its inputs (a Function would otherwise return its
    own input); a result asked for twice is the same tensor twice, as in PyTorch."""

    def __init__(self, plan):
        views = {id(s.node): s for s in plan.steps if isinstance(s, ViewStep)}
        self.recipe, requested, index, first = [], [], {}, {}
        for e, out in zip(plan.requested, plan.outputs):
            chain = ()
            step = views.get(id(out))
            if step is not None:  # (the same view of the requested node: views stay as such)
                chain = tuple((m.op, tuple(m.shape)) for m in step.chain)
                e = view_chain(e)[0] if e.op == "expand" else e.args[0]
            if e.known is not None:
                entry = (None, e, chain or (("view", None),))
            else:
                if id(e) not in index:
                    index[id(e)] = len(requested)
                    requested.append(e)
                entry = (index[id(e)], None, chain)
            key = (entry[0], id(entry[1]), entry[2])
            self.recipe.append(entry + (first.setdefault(key, len(self.recipe)),))
        self.block = PlanBlock(requested) if requested else None

    @staticmethod
    def of(plan):
        if plan.block is None:
            plan.block = Blocked(plan)
        return plan.block

    def run(self, plan, tensors, stats):
        block, res = self.block, []
        if block is not None:
            ins = [runtime.bound(tensors, n) for n in block.inputs]
            for i in block.mask_only:
                if ins[i].requires_grad:
                    ins[i] = ins[i].detach()
            _BLOCK_STATS.stats = stats
            try:
                if any(t.requires_grad for t in ins):
                    res = _apply_region(block, *ins)
                else:  # nothing to record: its plain run
                    res = block.run(ins, tensors[0].device if tensors else None)[0]
            finally:
                _BLOCK_STATS.stats = None
        outs = []
        for i, (j, node, chain, same) in enumerate(self.recipe):
            if same != i:
                outs.append(outs[same])
                continue
            v = res[j] if j is not None else runtime.bound(tensors, node)
            for op, shape in chain:
                v = v.view_as(v) if op == "view" else \
                    v.reshape(shape) if op == "reshape" else v.expand(shape)
            outs.append(v)
        return outs
