"""Execute a plan: allocate outputs, call the compiled VM on each region's descriptor (parsed
once per input layout into a ``_C.Program`` on the CPU, packed per call for CUDA), and each
matrix product through ``torch.mm``.

A plan's run leaves a ``_C.Executor`` (csrc/executor.h) that repeats it in C++ on later calls
on the same device whose tensors have the same layouts: on the CPU with the run's Programs, on
CUDA once every region and row group ran a compiled kernel (``CUDA_EXECUTOR``).

With ``create_graph`` the plan runs as one block, an autograd Function (blocks.py).

A ``RowGroup`` runs as one call (``_C.run_program_group``, chunk of rows by chunk of rows) on the
CPU, and as one compiled kernel (a warp per row) on CUDA.
"""
import functools
import math
from array import array

import torch

from . import _C, blocks, cuda_jit, ir, jit
from .plan import get_plan
from .plan_steps import IndexStep, MatmulStep, Region, RowGroup, ViewStep
from .runtime_table import DTYPE_CODES

CUDA_EXECUTOR = True  # repeat CUDA runs in C++ too (off: every CUDA run goes through Python)
_EXECUTOR_RETRY = 64  # runs before a CUDA plan that could not be repeated in C++ is tried again
_COMPUTE = {torch.float32: 0, torch.float64: 1}
_PARALLEL_MIN = 1 << 15
_CPU = torch.device("cpu")


class Stats:
    """Counts what one call did, for explain() and the benchmark. ``launches`` counts calls into
    the VM (a row group is one); ``regions`` describes each region, a row group as a line of its
    own followed by its regions, indented; ``row_groups`` has one dict per row group that ran as
    one call: ``dims`` (its chunk dims), ``regions`` (how many) and ``chunks`` (how many chunks
    the VM ran; 0 when it ran the regions one after another, e.g. data that fit in cache; None
    for a CUDA kernel, a warp per row)."""

    def __init__(self):
        self.launches = self.bytes_read = self.bytes_written = 0
        self.regions = []
        self.row_groups = []


def _num_threads(n):
    return torch.get_num_threads() if n >= _PARALLEL_MIN else 1


def _load_record(t, imap, nd):
    """A load's descriptor record, with the data pointer left 0 (patched per call)."""
    strides = [0] * nd
    offset, preds = 0, []
    # Entries past the tensor's dims are pure predicates (stride 0): see emitter.Emitter, embed.
    for e, st in zip(imap, tuple(t.stride()) + (0,) * (len(imap) - t.dim())):
        if e[0] == "c":
            offset += e[1] * st
        elif e[0] == "d":
            strides[e[1]] += e[2] * st
            offset += e[3] * st
        else:  # ("q", dim, mul, add, div, len): predicated (embed into zeros)
            preds.append((e[1], e[2], e[3], e[4], e[5], st))
    rec = [0, DTYPE_CODES[t.dtype], offset] + strides + [len(preds)]
    for p in preds:
        rec.extend(p)
    return rec


class _Packer:
    """A region's descriptor for one layout of its inputs; only data pointers change per call."""

    def __init__(self, region, ins, outs):
        shape = region.shape
        nd = len(shape)
        desc = [nd, len(region.loads), len(region.stores), len(region.instrs), region.nregs,
                *shape]
        self.load_slots, self.store_slots = [], []
        for ix, imap in region.loads:
            self.load_slots.append((len(desc), ix))
            desc += _load_record(ins[ix], imap, nd)
        for ti, mode in region.stores:
            o = outs[ti]
            st = list(o.stride())
            if mode:  # reduced target: keepdim layout, stride 0 along the reduced dims
                rd = set(region.targets[ti].attrs[0])
                st = [0 if i in rd else s for i, s in enumerate(st)]
            self.store_slots.append((len(desc), ti))
            desc += [0, DTYPE_CODES[o.dtype], mode] + st
        for ins_ in region.instrs:
            desc += ins_
        self.desc = array("q", desc)
        self.consts = array("d", region.consts)
        self.compute, self.numel = _COMPUTE[region.compute], ir.numel(shape)
        self.program = None
        self.jit_tried = False  # jit.compile_plan offered its Program a loop
        self.compiling = False  # its loop is being compiled in the background (jit._submit)
        # CUDA, per device index (a plan serves every device): runs so far, then the compiled
        # kernel (cuda_jit.Kernel) or False (interpreted); the devices where a row group's
        # kernel runs this region (explain)
        self.cuda_runs, self.cuda_kernels, self.cuda_group = {}, {}, set()

    made = 0  # Programs made so far, all packers (execute: a run that made one compiles)

    def cpu_program(self, ins, outs, region=None, prefer=None):
        """The descriptor parsed once (_C.Program); each run reads the tensors' data pointers.
        A new one of ``region`` (in a row group over ``prefer`` dims) may get a loop compiled
        for another shape (jit.adopt)."""
        if self.program is None:
            _Packer.made += 1
            self.program = _C.Program(self.pack(ins, outs), self.consts, self.compute,
                                      [ix for _, ix in self.load_slots],
                                      [ti for _, ti in self.store_slots], len(ins), len(outs))
            if region is not None:
                jit.adopt(region, self, prefer)
        return self.program

    def pack(self, ins, outs):
        d = array("q", self.desc)
        for at, ix in self.load_slots:
            d[at] = ins[ix].data_ptr()
        for at, ti in self.store_slots:
            d[at] = outs[ti].data_ptr()
        return d


def _on_cpu(dev):
    # (per-call Python cost matters on small graphs: `dev == _CPU` is 10x cheaper than
    # `dev.type`)
    return dev == _CPU or dev.type == "cpu"


def _prepare(region, ins, dev, on_cpu):
    """Allocate a region's targets on ``dev``; returns them and the packer of the inputs'
    layout."""
    if on_cpu:  # torch.empty is cheaper without a device argument and with unpacked sizes
        outs = [torch.empty(*shape, dtype=dt) if shape else torch.empty((), dtype=dt)
                for shape, dt in region.out_specs]
    else:
        outs = [torch.empty(shape, dtype=dt, device=dev) for shape, dt in region.out_specs]
    key = tuple([t.stride() for t in ins])
    packer = region.packers.get(key)
    if packer is None:
        if len(region.packers) > 64:
            region.packers.clear()
        packer = region.packers[key] = _Packer(region, ins, outs)
    return outs, packer


def _raw_stream(index):
    """The current CUDA stream of device ``index`` as a handle (what the kernels run on)."""
    return torch.cuda.current_stream(index).cuda_stream


if hasattr(torch._C, "_cuda_getCurrentRawStream"):  # (the same, without a Stream object)
    _raw_stream = torch._C._cuda_getCurrentRawStream  # noqa: F811


def run_region(region, ins, dev=None):
    """Run one region on tensors ``ins`` (one per region input) on device ``dev`` (default:
    that of ``ins``, else the CPU); returns its targets."""
    if dev is None:
        dev = ins[0].device if ins else _CPU
    on_cpu = _on_cpu(dev)
    outs, packer = _prepare(region, ins, dev, on_cpu)
    if packer.numel == 0:
        return _run_empty(region, outs)
    if on_cpu:
        packer.cpu_program(ins, outs, region).run(ins, outs, _num_threads(packer.numel))
        return outs
    _launch_cuda(region, packer, ins, outs, dev.index)
    return outs


_IDENTITY = {1: 0.0, 2: -math.inf, 3: math.inf}  # of a reduced store, by its mode


def _run_empty(region, outs):
    """A region over no elements: its elementwise targets are empty, its reduced ones (over
    empty dims) the reduction's identity. Its tensors may have no storage (a null data
    pointer, which a Program refuses)."""
    for ti, mode in region.stores:
        if mode and outs[ti].numel():
            outs[ti].fill_(_IDENTITY[mode])
    return outs


def _launch_cuda(region, packer, ins, outs, index, stream=None):
    """Run a region on CUDA device ``index``: its compiled kernel, else the interpreter."""
    if stream is None:
        stream = _raw_stream(index)
    kernel = packer.cuda_kernels.get(index)
    if kernel is None:
        runs = packer.cuda_runs[index] = packer.cuda_runs.get(index, 0) + 1
        if runs >= jit.AFTER:
            kernel = packer.cuda_kernels[index] = cuda_jit.kernel_for(region, packer, index)
    if kernel:
        kernel.launch(ins, outs, stream)
    else:
        _C.run_cuda(packer.pack(ins, outs), packer.consts, packer.compute, index, stream)


def run_group_cuda(group, value, env, dev, stats=None):
    """Run a RowGroup on CUDA: one compiled kernel for all its regions (after jit.AFTER runs,
    where one fits), else region by region. ``value`` and ``env`` as for run_group."""
    parts, packers = [], []
    for r in group.regions:
        ins = [value(m) for m in r.inputs]
        outs, packer = _prepare(r, ins, dev, False)
        parts.append((ins, outs))
        packers.append(packer)
        for t, o in zip(r.targets, outs):
            env[id(t)] = o
    index = dev.index
    key = (tuple(packers), index)
    kernel = group.cuda_kernels.get(key)
    if kernel is None:
        if len(group.cuda_runs) > 64:  # (layouts come and go: keep the tables small)
            group.cuda_kernels.clear()
            group.cuda_runs.clear()
        runs = group.cuda_runs[key] = group.cuda_runs.get(key, 0) + 1
        if runs >= jit.AFTER:
            kernel = group.cuda_kernels[key] = cuda_jit.group_kernel_for(group, packers, index)
            if kernel:
                for p in packers:
                    p.cuda_group.add(index)
    stream = _raw_stream(index)
    if kernel:
        kernel.launch_parts(parts, stream)
    else:
        for r, packer, (ins, outs) in zip(group.regions, packers, parts):
            _launch_cuda(r, packer, ins, outs, index, stream)
    if stats is not None:
        at = len(stats.regions)
        for r, (ins, outs) in zip(group.regions, parts):
            _count(stats, r, ins, outs, launch=not kernel, indent="  " if kernel else "")
        if kernel:
            stats.launches += 1
            stats.regions.insert(at, f"{group.describe()}: one kernel, a warp per row")
            stats.row_groups.append({"dims": list(group.dims), "regions": len(group.regions),
                                     "chunks": None})


def _count(stats, region, ins, outs, launch=True, indent="", grouped=False):
    n = ir.numel(region.shape)
    stats.launches += launch
    stats.bytes_read += sum(ins[ix].element_size() * min(ins[ix].numel(), n)
                            for ix in {ix for ix, _ in region.loads})
    stats.bytes_written += sum(o.numel() * o.element_size() for o in outs)
    stats.regions.append(indent + region.describe(grouped))


def _count_step(stats, step, ins, out):
    stats.launches += 1
    stats.bytes_read += sum(t.numel() * t.element_size() for t in ins)
    stats.bytes_written += out.numel() * out.element_size()
    stats.regions.append(step.describe())


def run_group(group, value, env, stats=None):
    """Run a RowGroup on the CPU in one call. ``value(node)`` gives an input's tensor; each
    region's targets are put in ``env`` (by node id) before the next region's inputs are
    looked up, since a later region reads them."""
    progs, ins_all, outs_all, n = [], [], [], 0
    if stats is not None:
        stats.launches += 1
        at = len(stats.regions)
    for r in group.regions:
        ins = [value(m) for m in r.inputs]
        outs, packer = _prepare(r, ins, _CPU, True)
        progs.append(packer.cpu_program(ins, outs, r, len(group.dims)))
        ins_all.append(ins)
        outs_all.append(outs)
        n = max(n, packer.numel)
        for t, o in zip(r.targets, outs):
            env[id(t)] = o
    chunks = _C.run_program_group(progs, ins_all, outs_all, group.mask, _num_threads(n))
    if stats is not None:
        for r, ins, outs in zip(group.regions, ins_all, outs_all):
            _count(stats, r, ins, outs, launch=False, indent="  ", grouped=chunks > 0)
        how = f"{chunks} chunks" if chunks else "one region after another (no chunking gain)"
        stats.regions.insert(at, f"{group.describe()}: {how}")
        stats.row_groups.append({"dims": list(group.dims), "regions": len(group.regions),
                                 "chunks": chunks})


class _NoExecutor(Exception):
    pass


def _executor(plan, env, tensors, dev):
    """A _C.Executor repeating the run of ``plan`` on ``dev`` that just put its values in
    ``env`` (csrc/executor.h): the same steps, Programs or compiled CUDA kernels and output
    specs, for later calls whose bound tensors have the layouts these had. Raises _NoExecutor
    where the run is not repeatable (on CUDA: while a region has no compiled kernel)."""
    on_cpu = _on_cpu(dev)
    produced = set()
    for step in plan.steps:
        if isinstance(step, (ViewStep, MatmulStep, IndexStep)):
            produced.add(id(step.node))
        else:
            for r in step.regions if isinstance(step, RowGroup) else (step,):
                produced.update(id(t) for t in r.targets)
    slots, leaves = {}, []
    # leaves whose tensor itself is used (a view step's source, a result), not only its data
    as_tensor = {id(m) for s in plan.steps if isinstance(s, (ViewStep, MatmulStep, IndexStep))
                 for m in s.sources}
    as_tensor.update(id(e) for e in plan.outputs)

    def leaf(n):
        if id(n) in produced or id(n) in slots:
            return
        t = tensors[n.known]
        slots[id(n)] = len(leaves)
        # Read through a reshape where the node's shape differs (value() in _run_steps); not
        # where only Programs read it and the reshape was a view: a Program reads a data
        # pointer, the view's is the tensor's, and the Executor repeats only these strides.
        reshape = None if t.shape == n.shape else tuple(n.shape)
        if reshape is not None and id(n) not in as_tensor:
            v = env.get(id(n))
            if v is not None and v.data_ptr() == t.data_ptr():
                reshape = None
        leaves.append((n.known, tuple(t.shape), t.stride(), reshape))

    for step in plan.steps:
        if isinstance(step, (ViewStep, MatmulStep, IndexStep)):
            for m in step.sources:
                leaf(m)
        else:
            for r in step.regions if isinstance(step, RowGroup) else (step,):
                for m in r.inputs:
                    leaf(m)
    for e in plan.outputs:
        leaf(e)
    steps, nslots = [], len(leaves)

    def packer_of(r):
        packer = r.packers.get(tuple([env[id(m)].stride() for m in r.inputs]))
        if packer is None or any(dt is None for _, dt in r._out_specs) or packer.numel == 0:
            raise _NoExecutor()  # (the default dtype is read per call; _run_empty)
        return packer

    def part(r, packer, loads=None):
        """A region's spec: on the CPU its Program's; on CUDA the input each of the kernel's
        ``loads`` reads, in the kernel's order."""
        nonlocal nslots
        # torch.empty's arguments for each target (with the device off the CPU)
        allocs = [(tuple(sh) if sh else ((),), dt) + (() if on_cpu else (dev,))
                  for sh, dt in r.out_specs]
        if on_cpu:
            ins = [env[id(m)] for m in r.inputs]
            outs = [env[id(t)] for t in r.targets]
            spec = (packer.cpu_program(ins, outs), [slots[id(m)] for m in r.inputs], allocs)
        else:
            spec = ([slots[id(r.inputs[ix])] for ix in loads], allocs)
        for t in r.targets:
            slots[id(t)] = nslots
            nslots += 1
        return spec

    def launch(kernel):
        if not kernel:
            raise _NoExecutor()  # (not compiled yet, or does not fit: the Python path runs it)
        return (kernel.func, kernel.context(), kernel.grid, cuda_jit.codegen.BLOCK)

    for step in plan.steps:
        if isinstance(step, Region):
            packer = packer_of(step)
            if on_cpu:
                steps.append((0, part(step, packer), packer.numel))
            else:
                kernel = packer.cuda_kernels.get(dev.index)
                k = launch(kernel)
                steps.append((4, k, [part(step, packer, kernel.parts[0][0])]))
        elif isinstance(step, RowGroup):
            packers = [packer_of(r) for r in step.regions]
            if on_cpu:
                steps.append((1, [part(r, p) for r, p in zip(step.regions, packers)],
                              step.mask, max(p.numel for p in packers)))
            else:  # its one kernel (run_group_cuda), each region's loads in the kernel's order
                kernel = step.cuda_kernels.get((tuple(packers), dev.index))
                k = launch(kernel)
                steps.append((4, k, [part(r, p, loads) for r, p, (loads, _) in
                                     zip(step.regions, packers, kernel.parts)]))
        elif isinstance(step, MatmulStep):
            steps.append((3, tuple(slots[id(m)] for m in step.sources),
                          tuple(tr for _, tr in step.operands)))
            slots[id(step.node)] = nslots
            nslots += 1
        elif isinstance(step, IndexStep):
            steps.append((5, step.run, tuple(slots[id(m)] for m in step.sources)))
            slots[id(step.node)] = nslots
            nslots += 1
        else:
            steps.append((2, slots[id(step.source)],
                          [(m.op != "reshape", tuple(m.shape)) for m in step.chain]))
            slots[id(step.node)] = nslots
            nslots += 1
    return _C.Executor(leaves, steps, [slots[id(e)] for e in plan.outputs], torch.empty,
                       torch.get_num_threads, _PARALLEL_MIN, torch.is_grad_enabled,
                       torch._C._set_grad_enabled,
                       None if on_cpu else functools.partial(_raw_stream, dev.index))


def execute(plan, tensors, create_graph, stats=None, device=None):
    """The values of ``plan``'s results over its bound ``tensors``, on their device (on
    ``device`` where there are none)."""
    if create_graph and not torch.is_grad_enabled():
        # PyTorch's engine builds the graph of a create_graph backward under grad mode, even
        # when the call is made under no_grad: the results require grad all the same
        with torch.enable_grad():
            return execute(plan, tensors, create_graph, stats, device)
    if create_graph:
        return blocks.Blocked.of(plan).run(plan, tensors, stats)
    dev = tensors[0].device if tensors else device or _CPU
    plan.runs += 1
    on_cpu = _on_cpu(dev)
    # Without stats: repeat the last run on this device in C++ when the layouts allow.
    repeat = stats is None and (on_cpu or CUDA_EXECUTOR)
    exe = plan.executor
    if repeat and exe is not None and plan.executor_dev == dev:
        res = exe.run(tensors)
        if res is not None:
            if on_cpu and plan.jit_pending:
                _compile_due(plan)
            return res
    made = _Packer.made
    outs = _run_steps(plan, tensors, stats, dev, repeat)
    # a run that met a new layout (made a Program) makes compiling due again (CPU loops; a
    # CUDA region compiles its own kernel, in run_region)
    if on_cpu:
        if _Packer.made != made:
            plan.jit_pending = True
        if plan.jit_pending and plan.runs >= jit.AFTER:
            _compile(plan)
    return outs


def _compile_due(plan):
    """After a CPU run repeated by the plan's Executor (here or in csrc/repeat_call.cpp) while
    its loops are due: compile them once it has run jit.AFTER times."""
    if plan.runs >= jit.AFTER:
        _compile(plan)


def _compile(plan):
    """Compile the plan's regions into loops (jit.py) once it has run jit.AFTER times; after a
    run, so that its CPU regions hold their Programs. While compiling is off the plan stays
    due (offered once it is on again); the flag is cleared first, so that a background compile
    that skips its jobs (jit._set_kernels) can make the plan due again."""
    if jit._STATE["enabled"]:
        plan.jit_pending = False
        jit.compile_plan(plan)


def bound(tensors, n):
    """The tensor bound to IR node ``n``, read as its shape."""
    t = tensors[n.known]
    return t if t.shape == n.shape else t.reshape(n.shape)


def _run_steps(plan, tensors, stats, dev, repeat):
    """The Python path of execute: run the plan's steps one by one, and (``repeat``) leave an
    Executor that repeats the run."""
    env = {}

    def value(n):
        v = env.get(id(n))
        if v is None:
            v = env[id(n)] = bound(tensors, n)
        return v

    def run(region):
        ins = [value(m) for m in region.inputs]
        outs = run_region(region, ins, dev)
        if stats is not None:
            _count(stats, region, ins, outs)
        for t, o in zip(region.targets, outs):
            env[id(t)] = o

    for step in plan.steps:
        if isinstance(step, Region):
            run(step)
        elif isinstance(step, RowGroup):
            if any(ir.numel(r.shape) == 0 for r in step.regions):
                for r in step.regions:  # (nothing to chunk: each alone, _run_empty)
                    run(r)
            elif _on_cpu(dev):
                run_group(step, value, env, stats)
            else:
                run_group_cuda(step, value, env, dev, stats)
        elif isinstance(step, MatmulStep):
            a, b = [value(m).t() if tr else value(m) for m, tr in step.operands]
            with torch.no_grad():  # (create_graph runs a block: plain runs record nothing)
                v = env[id(step.node)] = torch.mm(a, b)
            if stats is not None:
                _count_step(stats, step, [a, b], v)
        elif isinstance(step, IndexStep):
            x, index = [value(m) for m in step.sources]
            with torch.no_grad():
                v = env[id(step.node)] = step.run(x, index)
            if stats is not None:
                _count_step(stats, step, [x], v)
        else:
            v = value(step.source)
            # The views are taken with grad mode off, as PyTorch's engine takes them without
            # create_graph: not attached to the grad_outputs' graph, a view of it all the same
            # (requires_grad as the grad_output's, no grad_fn).
            with torch.no_grad():
                for m in step.chain:
                    v = v.reshape(m.shape) if m.op == "reshape" else v.expand(m.shape)
            env[id(step.node)] = v
    outs = [value(e) for e in plan.outputs]
    if repeat and plan.runs >= plan.executor_retry:
        try:
            plan.executor, plan.executor_dev = _executor(plan, env, tensors, dev), dev
        except _NoExecutor:
            plan.executor = None
            if plan.runs >= jit.AFTER and not _on_cpu(dev):
                # a region whose kernel should be compiled by now has none (it does not fit):
                # ask again only now and then, not on every call
                plan.executor_retry = plan.runs + _EXECUTOR_RETRY
    return outs


def materialize(exprs, tensors, create_graph, stats=None):
    """Compute IR expressions (None stays None) over the bound ``tensors``."""
    if None not in exprs:
        return execute(get_plan(exprs, tensors), tensors, create_graph, stats)
    todo = [e for e in exprs if e is not None]
    if not todo:
        return [None] * len(exprs)
    plan = get_plan(todo, tensors)
    vals = iter(execute(plan, tensors, create_graph, stats))
    return [None if e is None else next(vals) for e in exprs]
