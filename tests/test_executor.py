"""The C++ repeat of a plan's CPU run (runtime._executor, csrc/executor.h).

The first call of a graph runs its plan step by step in Python and leaves a _C.Executor on the
plan; later calls whose bound tensors have the same layouts run through it. Each case here calls
fastgrad.grad three times on fresh graphs with fresh values, checks every result against
torch.autograd.grad, and checks that the later calls really ran through an Executor."""
import pytest
import torch

import fastgrad
from fastgrad import _C, plan as fplan
from conftest import TORCH_GRAD, assert_same, rand, strided_leaf


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
]


def _call(fn, shapes, gen, make_leaf=None):
    xs = [rand(s, gen) for s in shapes]
    if make_leaf is not None:
        xs = [make_leaf(x) for x in xs]
    else:
        xs = [x.requires_grad_() for x in xs]
    outs = fn(*xs)
    gos = [None if o.dim() == 0 else rand(tuple(o.shape), gen) for o in outs]
    gos = [torch.ones((), dtype=torch.float64) if g is None else g for g in gos]
    got = fastgrad.grad(outs, xs, gos, retain_graph=True)
    ref = TORCH_GRAD(outs, xs, gos)
    assert_same(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,shapes,fn", CASES, ids=[c[0] for c in CASES])
def test_later_calls_run_through_the_executor(name, shapes, fn, gen):
    _call(fn, shapes, gen)
    watched = _watch()
    assert watched, "the first call left no Executor on its plan"
    for _ in range(2):
        _call(fn, shapes, gen)
    assert sum(w.runs - w.declined for w in watched) >= 2


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
