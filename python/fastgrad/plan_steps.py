"""The steps a plan runs (plan.py builds them): a fused ``Region`` (one pass, compiled into a VM
register program), a ``RowGroup`` of regions run chunk of rows by chunk of rows, and the steps
that PyTorch runs between regions: ``ViewStep`` (a reshape or expand), ``MatmulStep`` (a matrix
product), ``IndexStep`` (a gather or scatter of rows)."""
import torch

from . import _C, ir


def trivial_reshape(src, dst):
    """True when a reshape only inserts or removes size-1 dims."""
    return [s for s in src if s != 1] == [s for s in dst if s != 1]


class Region:
    """One fused pass: what it loads, what it stores, and the VM program."""

    def __init__(self, shape, reduce_dims):
        self.shape, self.reduce_dims = shape, reduce_dims
        self.targets = []        # IR nodes this region materialises
        self.inputs = []         # IR nodes it loads (known values or earlier targets)
        self.loads = []          # (input index, index map)
        self.stores = []         # (target index, mode)
        self.instrs = []         # (op, dst, a, b, c)
        self.consts = []
        self.nregs = 0
        self.compute = torch.float32
        self.packers = {}        # runtime: descriptor templates by input strides
        self.eager = False       # planned while its graph's shapes churn (jit.adopt)
        self._out_specs = None

    @property
    def out_specs(self):
        """(shape, dtype) of each target, as the runtime allocates them."""
        if self._out_specs is None:
            self._out_specs = [(t.shape, t.dtype) for t in self.targets]
        if any(dt is None for _, dt in self._out_specs):
            return [(sh, dt or torch.get_default_dtype()) for sh, dt in self._out_specs]
        return self._out_specs

    def describe(self, grouped=False):
        """One line for explain; ``grouped``: it ran as a member of a row group's chunked loops,
        which stream a large output that no later member reads without timing it
        (run_group_loops), where a region on its own times both kinds of store."""
        kind = f"reduce over dims {list(self.reduce_dims)}" if self.reduce_dims else "elementwise"
        ops = sorted({n.op for n in ir.topo(self.targets, stop=lambda m: m.known is not None or
                                                any(m is i for i in self.inputs))} - {"leaf"})
        compiled = any(p.program is not None and p.program.compiled or any(p.cuda_kernels.values())
                       or p.cuda_group for p in self.packers.values())
        # a loop with a streaming variant and outputs large enough to stream
        # (stream_policy.h): which stores its runs take
        large = ir.numel(self.shape) * self.compute.itemsize >= _C.stream_min_bytes()
        picks = {p.program.stream_pick for p in self.packers.values()
                 if large and p.program is not None and p.program.streaming}
        if not picks:
            stores = ""
        elif picks == {1} or grouped:
            stores = " (streaming stores for large outputs)"
        elif picks == {-1}:
            stores = " (plain stores for large outputs: streaming timed slower)"
        else:
            stores = " (streaming stores for large outputs where timed faster)"
        compiling = not compiled and any(p.compiling for p in self.packers.values())
        return (f"region {kind} over {list(self.shape)} ({self.compute}): "
                f"{len(self.inputs)} loads, {len(self.targets)} stores, {len(self.instrs)} "
                f"instructions; ops {ops}" + ("; compiled loop" if compiled else "") +
                ("; loop compiling in the background" if compiling else "") + stores)


class ViewStep:
    """A reshape of a materialised tensor, taken by PyTorch (a view when the layout allows),
    or the expand of a bound tensor (``source`` is then that tensor's node)."""

    def __init__(self, node):
        self.node = node
        if node.op == "expand":
            self.source, self.chain = view_chain(node)
            if ir.numel(self.source.shape) == 1 and self.source.ndim <= node.ndim:
                self.chain = [node]  # one expand of a single value (a sum's VJP) says it all
        else:
            self.source, self.chain = node.args[0], [node]

    @property
    def sources(self):
        return [self.source]


class MatmulStep:
    """A matrix product (ir.mm), run by PyTorch's ``mm`` between fused regions: a GEMM is
    BLAS's work, not a fused loop's. Each operand is a bound or materialised tensor, or its
    transpose (a view, no copy): ``operands`` holds (node, transposed)."""

    def __init__(self, node):
        self.node = node
        self.operands = [matmul_operand(a) for a in node.args]

    @property
    def sources(self):
        return [m for m, _ in self.operands]

    def describe(self):
        a, b = self.node.args
        return f"matmul {list(a.shape)} x {list(b.shape)} ({self.node.dtype}): torch.mm"


class IndexStep:
    """A gather or scatter of rows (ir.gather, ir.scatter), run by the PyTorch kernels its
    node's kind names (``x[index]`` and ``index_put_`` accumulating into zeros, or
    ``index_select`` and ``index_add_``: those of the node PyTorch recorded and of its
    backward) between fused regions, so values, errors and half-type sums are PyTorch's. Its
    operand is a bound or materialised tensor, its index a bound one."""

    def __init__(self, node):
        self.node = node
        self.kind = node.attrs[0]

    @property
    def sources(self):
        return list(self.node.args)

    def run(self, x, index):
        if self.node.op == "gather":
            return x[index] if self.kind == "index" else x.index_select(0, index)
        out = x.new_zeros(self.node.shape)
        if self.kind == "index":
            return out.index_put_((index,), x, accumulate=True)
        return out.index_add_(0, index, x)

    def describe(self):
        x, index = self.node.args
        how = "x[index]" if self.kind == "index" else "index_select"
        if self.node.op == "scatter":
            how = "index_put_" if self.kind == "index" else "index_add_"
        return (f"{self.node.op} of {list(x.shape)} by {index.shape[0]} rows "
                f"({self.node.dtype}): torch {how}")


def matmul_operand(n):
    if n.op == "permute":  # (ir.permute folds a permute of a permute: at most one here)
        return n.args[0], True
    return n, False


class RowGroup:
    """Regions that run as one row group on the CPU (csrc/vm.h, run_group_cpu): chunk of rows by
    chunk of rows, a row being a coordinate of the leading ``dims`` (0..k-1), each chunk through
    every region before the next, so a later region finds what an earlier one read, and its
    small reduced results, in cache. Every region has ``dims`` with the same sizes, reduces none
    of them, and reads what an earlier region of the group wrote only at its own coordinates
    along them. On CUDA the group runs as one compiled kernel, a warp per row through every
    region (cuda_codegen.group_source), once it has run jit.AFTER times and where one fits;
    until then, and where none fits, its regions run in order."""

    def __init__(self, regions, dims):
        self.regions, self.dims = regions, dims
        self.mask = sum(1 << d for d in dims)
        # runtime, CUDA: runs so far and the compiled kernel (or False: none fits), by the
        # regions' packers and the device index
        self.cuda_runs, self.cuda_kernels = {}, {}

    def describe(self):
        return f"row group over dims {list(self.dims)} of the {len(self.regions)} regions below"


def view_chain(n):
    """(base, [views from base up to n]) for a chain of expands and trivial reshapes."""
    chain = []
    while n.op == "expand" or (n.op == "reshape" and trivial_reshape(n.args[0].shape, n.shape)):
        chain.append(n)
        n = n.args[0]
    return n, chain[::-1]
