"""Execute a plan: allocate outputs, pack each region's descriptor, call the compiled VM.

With ``create_graph`` every region runs inside ``RegionFunction`` (a torch.autograd.Function whose
inputs are the region's loads), so its outputs are differentiable: the Function's backward is the
region's own VJP program, planned and run the same way. A later ``fastgrad.grad`` that meets such
a node lowers it back to IR (lowering.py, "RegionFunctionBackward") and keeps fusing.
"""
from array import array

import torch

from . import _C, ir, rules
from .plan import Region, get_plan
from .runtime_table import DTYPE_CODES

_COMPUTE = {torch.float32: 0, torch.float64: 1}
_PARALLEL_MIN = 1 << 15


class Stats:
    """Counts what one call did, for explain() and the benchmark."""

    def __init__(self):
        self.launches = self.bytes_read = self.bytes_written = 0
        self.regions = []


def _num_threads(n):
    return torch.get_num_threads() if n >= _PARALLEL_MIN else 1


def _load_record(t, imap, nd):
    strides = [0] * nd
    offset, preds = 0, []
    # Entries past the tensor's dims are pure predicates (stride 0): see plan._Emitter, embed.
    for e, st in zip(imap, tuple(t.stride()) + (0,) * (len(imap) - t.dim())):
        if e[0] == "c":
            offset += e[1] * st
        elif e[0] == "d":
            strides[e[1]] += e[2] * st
            offset += e[3] * st
        else:  # ("q", dim, mul, add, div, len): predicated (embed into zeros)
            preds.append((e[1], e[2], e[3], e[4], e[5], st))
    rec = [t.data_ptr(), DTYPE_CODES[t.dtype], offset] + strides + [len(preds)]
    for p in preds:
        rec.extend(p)
    return rec



def run_region(region, ins, stats=None):
    """Run one region on CPU tensors ``ins`` (one per region input); returns its targets."""
    dev = ins[0].device if ins else torch.device("cpu")
    outs = []
    for t in region.targets:
        dt = t.dtype if t.dtype is not None else torch.get_default_dtype()
        outs.append(torch.empty(t.shape, dtype=dt, device=dev))
    shape = region.shape
    nd = len(shape)
    desc = [nd, len(region.loads), len(region.stores), len(region.instrs), region.nregs, *shape]
    for ix, imap in region.loads:
        desc += _load_record(ins[ix], imap, nd)
    for ti, mode in region.stores:
        o = outs[ti]
        t = region.targets[ti]
        st = list(o.stride())
        if mode:  # reduced target: keepdim layout, stride 0 along the reduced dims
            rd = set(t.attrs[0])
            st = [0 if i in rd else s for i, s in enumerate(st)]
        desc += [o.data_ptr(), DTYPE_CODES[o.dtype], mode] + st
    for ins_ in region.instrs:
        desc += ins_
    n = ir.numel(shape)
    _C.run_cpu(array("q", desc), array("d", region.consts), _COMPUTE[region.compute],
               _num_threads(n))
    if stats is not None:
        stats.launches += 1
        stats.bytes_read += sum(ins[ix].element_size() * min(ins[ix].numel(), n)
                                for ix in {ix for ix, _ in region.loads})
        stats.bytes_written += sum(o.numel() * o.element_size() for o in outs)
    return outs


class RegionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, region, *ins):
        ctx.region = region
        ctx.save_for_backward(*ins)
        outs = run_region(region, ins)
        # As in PyTorch, a result that depends on no grad-requiring input only through
        # differentiable ops (e.g. relu's mask) does not require grad.
        # One call: each mark_non_differentiable call replaces the previous set.
        ctx.mark_non_differentiable(*[o for o, deps in zip(outs, region.diff_deps)
                                      if not any(ins[i].requires_grad for i in deps)])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gs):
        region = ctx.region
        ins = ctx.saved_tensors
        n = len(ins)
        cots = [ir.leaf(n + j, tuple(g.shape), g.dtype) if g is not None else None
                for j, g in enumerate(gs)]
        need = ctx.needs_input_grad[1:]
        wrt = [w for w, nd in zip(region.local_inputs, need) if nd]
        res = iter(rules.vjp(region.local_outputs, cots, wrt))
        grads = [next(res) if nd else None for nd in need]
        tensors = list(ins) + [g for g in gs]
        res = materialize(grads, tensors, torch.is_grad_enabled())
        return (None,) + tuple(res)


def _known_tensor(n, tensors):
    t = tensors[n.known]
    if tuple(t.shape) != n.shape:
        t = t.reshape(n.shape)
    return t


def execute(plan, tensors, create_graph, stats=None):
    env = {}

    def value(n):
        v = env.get(id(n))
        if v is None:
            v = env[id(n)] = _known_tensor(n, tensors)
        return v

    for step in plan.steps:
        if isinstance(step, Region):
            ins = [value(m) for m in step.inputs]
            if create_graph and any(ins[i].requires_grad for d in step.diff_deps for i in d):
                outs = RegionFunction.apply(step, *ins)
                if stats is not None:
                    stats.launches += 1
            else:
                outs = run_region(step, ins, stats)
            if stats is not None:
                stats.regions.append(step.describe())
            for t, o in zip(step.targets, outs):
                env[id(t)] = o
        else:
            n = step.node
            env[id(n)] = value(n.args[0]).reshape(n.shape)
    return [value(e) for e in plan.outputs]


def materialize(exprs, tensors, create_graph, stats=None):
    """Compute IR expressions (None stays None) over the bound ``tensors``."""
    todo = [e for e in exprs if e is not None]
    if not todo:
        return [None] * len(exprs)
    plan = get_plan(todo)
    vals = iter(execute(plan, tensors, create_graph, stats))
    return [None if e is None else next(vals) for e in exprs]
