"""The C++ repeat of a plan's run (runtime._executor, csrc/executor.h).

The first call of a graph runs its plan step by step in Python and leaves a _C.Executor on the
plan; later calls on the same device whose bound tensors have the same layouts run through it
(on CUDA once its regions run compiled kernels). Each case here calls fastgrad.grad several
times on fresh graphs with fresh values, checks every result against torch.autograd.grad, and
checks that the later calls really ran through an Executor."""
import pytest
import torch

import fastgrad
from fastgrad import _C, graph_cache, jit, plan as fplan, plan_steps
from conftest import TORCH_GRAD, assert_same, rand, stand_in_driver, strided_leaf
from test_vm_cuda import real_gpu


class Counting:
    """Stands in for a plan's Executor and counts its runs (None: it declined)."""

    def __init__(self, exe):
        self.exe, self.runs, self.declined = exe, 0, 0

    def run(self, tensors):
        res = self.exe.run(tensors)
        self.runs += 1
        self.declined += res is None
        return res


def _watch():
    watched = []
    for p in list(fplan._CACHE.values()):
        if p.executor is not None and not isinstance(p.executor, Counting):
            p.executor = Counting(p.executor)
        if isinstance(p.executor, Counting):
            watched.append(p.executor)
    return watched


_I, _J = torch.tensor([0, 3, 3, 8, -1, 2]), torch.tensor([1, 1, 4, 0, 5, 7])
CASES = [  # (name, shapes of the leaves, forward)
    ("sin_exp_sum", [(3000,)], lambda x: ((torch.sin(x) * torch.exp(x)).sum(),)),
    ("tanh_cube", [(50, 70)], lambda x: (torch.tanh(x) ** 3,)),
    ("softmax_rows", [(300, 130)], lambda x: (torch.softmax(x, 1),)),
    ("log_softmax_rows", [(64, 33)], lambda x: (torch.log_softmax(x, -1),)),
    ("sum_is_a_view", [(40, 30)], lambda x: (x.sum(),)),
    ("mean_rows", [(40, 30)], lambda x: (x.mean(1),)),
    ("amax_rows", [(40, 30)], lambda x: (x.amax(1),)),
    ("logsumexp_rows", [(40, 30)], lambda x: (torch.logsumexp(x, 1),)),  # result read reshaped
    ("broadcast_two_leaves", [(40, 30), (30,)], lambda x, b: (torch.exp(x) * b + b.sin(),)),
    ("two_outputs", [(100,)], lambda x: (x.exp(), x.sin().sum())),
    ("threads", [(70000,)], lambda x: (torch.tanh(x) * x,)),
    ("reshape_between", [(12, 10)], lambda x: ((x.exp().reshape(4, 30) * 2.0).sin(),)),
    # two products: g @ w.t() (a transposed operand, a view) and x.t() @ g
    ("matmul_steps", [(20, 8), (8, 6)], lambda x, w: (torch.tanh(x @ w),)),
    # gather and scatter steps (plan_steps.IndexStep): pair differences, per-row sums by index_add
    ("index_steps", [(9, 3)], lambda x: (torch.sin(x[_I] - x[_J]).sum(),
                                         x.new_zeros(9).index_add(0, _I.abs().to(x.device),
                                                                  (x[_J] ** 2).sum(1)))),
]


def _call(fn, shapes, gen, make_leaf=None, device="cpu"):
    xs = [rand(s, gen, device=device) for s in shapes]
    if make_leaf is not None:
        xs = [make_leaf(x) for x in xs]
    else:
        xs = [x.requires_grad_() for x in xs]
    outs = fn(*xs)
    gos = [None if o.dim() == 0 else rand(tuple(o.shape), gen, device=device) for o in outs]
    gos = [torch.ones((), dtype=torch.float64, device=device) if g is None else g for g in gos]
    got = fastgrad.grad(outs, xs, gos, retain_graph=True)
    ref = TORCH_GRAD(outs, xs, gos)
    assert_same(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,shapes,fn", CASES, ids=[c[0] for c in CASES])
def test_later_calls_run_through_the_executor(name, shapes, fn, gen):
    graph_cache.clear()  # (only this case's plans watched below)
    fplan.clear_plan_cache()
    _call(fn, shapes, gen)
    watched = _watch()
    assert watched, "the first call left no Executor on its plan"
    for _ in range(2):
        _call(fn, shapes, gen)
    assert sum(w.runs - w.declined for w in watched) >= 2


@real_gpu
@pytest.mark.parametrize("name,shapes,fn", CASES, ids=[c[0] for c in CASES])
def test_later_cuda_calls_run_through_the_executor(name, shapes, fn, gen):
    # On CUDA the Executor is left once every region (row group) ran a compiled kernel, which
    # happens after jit.AFTER runs; a plan with a region no kernel fits stays in Python.
    runs = {id(p): p.runs for p in fplan._CACHE.values()}
    watched = []
    for _ in range(jit.AFTER + 3):
        _call(fn, shapes, gen, device="cuda")
        watched = _watch()
    ran = [p for p in fplan._CACHE.values() if p.runs != runs.get(id(p))]
    if name in ("sin_exp_sum", "tanh_cube", "threads"):  # (elementwise: a kernel fits)
        assert ran and all(map(_compiled, ran))
    if all(map(_compiled, ran)):
        assert sum(w.runs - w.declined for w in watched) >= 1, "no call ran through an Executor"


def _compiled(plan):
    """Whether every region and row group of ``plan`` ran a compiled CUDA kernel."""
    for step in plan.steps:
        if isinstance(step, plan_steps.RowGroup):
            if not any(step.cuda_kernels.values()):
                return False
        elif isinstance(step, plan_steps.Region):
            if not any(k for p in step.packers.values() for k in p.cuda_kernels.values()):
                return False
    return True


def test_a_cuda_step_launches_its_kernel_on_each_run():
    # A CUDA step of an Executor (kind 4), here over CPU tensors with a stand-in driver (no GPU
    # needed): each run allocates the parts' targets (a later part may load an earlier one's),
    # reads the stream once and hands the driver the kernel, grid, block, that stream and the
    # data pointers of each part's loads, then its targets.
    seen, streams, result = [], [], [0]

    def launch(func, grid, block, shared, stream, vals, extra):
        seen.append((func, grid[0], block[0], stream, vals))
        return result[0]

    empty, nt = torch.empty, torch.get_num_threads
    gm = (torch.is_grad_enabled, torch._C._set_grad_enabled)
    f64, cpu = torch.float64, torch.device("cpu")

    def stream():
        streams.append(0x5)
        return 0x5
    kernel = (0x1234, 0xC0, 9, 128)
    parts = [([0, 1, 0], [((3,), f64, cpu)]), ([2], [((3,), f64, cpu)])]
    leaves = [(0, (3,), (1,), None), (1, (3,), (1,), None)]
    with pytest.raises(ValueError, match="needs stream"):
        _C.Executor(leaves, [(4, kernel, parts)], [3], empty, nt, 1, *gm)
    with pytest.raises(ValueError, match="load slot out of range"):
        _C.Executor(leaves, [(4, kernel, [([3], [])])], [], empty, nt, 1, *gm, stream)
    exe = _C.Executor(leaves, [(4, kernel, parts)], [2, 3], empty, nt, 1, *gm, stream)
    # (the context is current: push and pop are never called)
    with stand_in_driver(launch, lambda: 0xC0, lambda ctx: 1, lambda: 1, lambda: 6):
        a, b = torch.randn(3, dtype=f64), torch.randn(3, dtype=f64)
        for k in range(2):
            o1, o2 = exe.run([a, b])
            assert o1.shape == o2.shape == (3,) and o1.dtype == f64
            assert seen[k] == (0x1234, 9, 128, 0x5, [a.data_ptr(), b.data_ptr(), a.data_ptr(),
                                                     o1.data_ptr(), o1.data_ptr(),
                                                     o2.data_ptr()])
        assert streams == [0x5, 0x5]
        result[0] = 700
        with pytest.raises(RuntimeError, match="CUDA error 700"):
            exe.run([a, b])


def test_executor_declines_other_layouts(gen):
    fn = lambda x: (torch.tanh(x) * torch.exp(x),)  # noqa: E731
    _call(fn, [(30, 20)], gen)
    watched = _watch()
    assert watched
    _call(fn, [(30, 20)], gen, make_leaf=strided_leaf)  # transposed strides: declined
    assert sum(w.declined for w in watched) >= 1
    for mk in (None, strided_leaf, None):  # rebuilt for each layout in turn, always right
        _call(fn, [(30, 20)], gen, make_leaf=mk)


def test_executor_not_used_with_create_graph(gen):
    x = rand((50,), gen).requires_grad_()
    y = torch.tanh(x) ** 2
    go = rand((50,), gen)
    fastgrad.grad(y, x, go, retain_graph=True)
    watched = _watch()
    runs = sum(w.runs for w in watched)
    g = fastgrad.grad(y, x, go, create_graph=True)[0]
    assert sum(w.runs for w in watched) == runs
    x2 = x.detach().clone().requires_grad_()
    g_ref = TORCH_GRAD(torch.tanh(x2) ** 2, x2, go, create_graph=True)[0]
    assert g.requires_grad
    assert_same(TORCH_GRAD(g.sum(), x), TORCH_GRAD(g_ref.sum(), x2), rtol=1e-12, atol=1e-12)


def test_executor_rejects_malformed_specs():
    empty, nt = torch.empty, torch.get_num_threads
    gm = (torch.is_grad_enabled, torch._C._set_grad_enabled)
    with pytest.raises(ValueError, match="unknown step kind"):
        _C.Executor([], [(7, None)], [], empty, nt, 1, *gm)
    with pytest.raises(ValueError, match="view source out of range"):
        _C.Executor([(0, (3,), (1,), None)], [(2, 1, [])], [], empty, nt, 1, *gm)
    with pytest.raises(ValueError, match="output slot out of range"):
        _C.Executor([(0, (3,), (1,), None)], [], [1], empty, nt, 1, *gm)
    exe = _C.Executor([(0, (3,), (1,), None)], [(2, 0, [(True, (2, 3))])], [1], empty, nt, 1, *gm)
    t = torch.arange(3.0)
    out = exe.run([t])
    assert torch.equal(out[0], t.expand(2, 3))
    assert exe.run([torch.arange(4.0)]) is None  # another shape
    assert exe.run([torch.arange(6.0)[::2]]) is None  # other strides
    exe = _C.Executor([(0, (3,), (1,), (3, 1))], [(2, 0, [(True, (3, 2))])], [1], empty, nt, 1, *gm)
    assert torch.equal(exe.run([t])[0], t.reshape(3, 1).expand(3, 2))  # a leaf read reshaped
    with pytest.raises(ValueError, match="product operand out of range"):
        _C.Executor([(0, (3,), (1,), None)], [(3, (0, 1), (False, False))], [], empty, nt, 1, *gm)
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    exe = _C.Executor([(0, (3, 4), (4, 1), None), (1, (5, 4), (4, 1), None)],
                      [(3, (0, 1), (False, True))], [2], empty, nt, 1, *gm)
    assert torch.equal(exe.run([a, b])[0], a.mm(b.t()))  # a product, its second operand transposed


@pytest.mark.parametrize("shape,fn", [((5,), lambda x: x.sum()), ((3, 4), lambda x: x.sum(0)),
                                      ((3, 4), lambda x: x.mean())])
def test_views_of_grad_outputs_match_torch(shape, fn, gen):
    # A sum's VJP is a view of the grad_output, taken with grad mode off (PyTorch's engine
    # without create_graph): it requires grad when the grad_output does, with no grad_fn. The
    # first call takes the Python path, later ones the Executor; grad mode is restored.
    for k in range(3):
        x = rand(shape, gen).requires_grad_()
        y = fn(x)
        go = rand(tuple(y.shape), gen).requires_grad_()
        got = fastgrad.grad(y, x, go)[0]
        ref = TORCH_GRAD(fn(x), x, go)[0]
        assert torch.is_grad_enabled()
        assert (got.requires_grad, got.grad_fn is None, got.is_leaf) == \
            (ref.requires_grad, ref.grad_fn is None, ref.is_leaf), k
        assert_same(got, ref, rtol=1e-12, atol=1e-12)
