"""Graphs mixing native ops with ops fastgrad does not lower (batched matmul, conv,
cumsum, a user autograd.Function): results still match torch, first and second
order, and explain names which nodes went where."""

import pytest
import torch

import fastgrad
from conftest import check_grad, rand


class Cube(torch.autograd.Function):
    """x**3 with a hand-written (twice differentiable) backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x * x * g


class ScaleBoth(torch.autograd.Function):
    """Two inputs, two outputs, one input without gradient."""

    @staticmethod
    def forward(ctx, x, y, k):
        ctx.save_for_backward(x, y)
        ctx.k = k
        return x * y * k, x + y

    @staticmethod
    def backward(ctx, ga, gb):
        x, y = ctx.saved_tensors
        gx = ga * y * ctx.k + gb
        gy = ga * x * ctx.k + gb
        return gx, gy, None


# name -> (forward fn, input shapes, expected fallback node names, expected native node names)
MIXED = {
    "bmm_tanh": (
        lambda x, w: torch.tanh(torch.bmm(torch.sin(x), w)),
        [(2, 3, 4), (2, 4, 5)], {"BmmBackward0"}, {"TanhBackward0", "SinBackward0"},
    ),
    "bmm_exp_sum": (
        lambda x, w: torch.exp(torch.bmm(x, w) * 0.5).sum(1),
        [(2, 3, 4), (2, 4, 2)], {"BmmBackward0"}, {"ExpBackward0", "SumBackward1"},
    ),
    "conv1d_sigmoid": (
        lambda x, w: torch.sigmoid(torch.nn.functional.conv1d(torch.sin(x), w)),
        [(2, 3, 8), (4, 3, 3)], {"ConvolutionBackward0"}, {"SigmoidBackward0", "SinBackward0"},
    ),
    "conv2d_tanh": (
        lambda x, w: torch.tanh(torch.nn.functional.conv2d(x * x, w, padding=1)),
        [(1, 2, 5, 5), (3, 2, 3, 3)], {"ConvolutionBackward0"}, {"TanhBackward0"},
    ),
    "cumsum_exp": (
        lambda x: torch.exp(x).cumsum(1) * x,
        [(3, 5)], {"CumsumBackward0"}, {"ExpBackward0", "MulBackward0"},
    ),
    "custom_function": (
        lambda x: torch.sin(Cube.apply(torch.tanh(x))),
        [(3, 4)], {"CubeBackward"}, {"SinBackward0", "TanhBackward0"},
    ),
    "custom_function_two_io": (
        lambda x, y: torch.exp(ScaleBoth.apply(torch.cos(x), y, 0.5)[0]) + ScaleBoth.apply(x, y, 2.0)[1],
        [(3, 4), (3, 4)], {"ScaleBothBackward"}, {"ExpBackward0", "CosBackward0"},
    ),
    "native_opaque_native_sandwich": (
        lambda x, w: (torch.sin(torch.bmm(torch.exp(x), w)) *
                      torch.cos(x).sum(2, keepdim=True)).sum(),
        [(2, 3, 4), (2, 4, 2)], {"BmmBackward0"}, {"SinBackward0", "ExpBackward0", "CosBackward0"},
    ),
    "cumsum_then_softmax": (
        lambda x: torch.softmax(x.cumsum(0), 1),
        [(4, 3)], {"CumsumBackward0"}, {"SoftmaxBackward0"},
    ),
}


def _inputs(name, gen):
    return [rand(s, gen) for s in MIXED[name][1]]


@pytest.mark.parametrize("name", list(MIXED))
def test_first_order(name, gen):
    check_grad(MIXED[name][0], _inputs(name, gen), gen=gen, orders=1)


@pytest.mark.parametrize("name", list(MIXED))
def test_second_order(name, gen):
    check_grad(MIXED[name][0], _inputs(name, gen), gen=gen, orders=2)


@pytest.mark.parametrize("name", ["bmm_tanh", "cumsum_exp", "custom_function"])
def test_third_order(name, gen):
    check_grad(MIXED[name][0], _inputs(name, gen), gen=gen, orders=3)


@pytest.mark.parametrize("name", list(MIXED))
def test_explain_names(name, gen):
    fn, _, fallback_expected, native_expected = MIXED[name]
    xs = [t.requires_grad_(True) for t in _inputs(name, gen)]
    out = fn(*xs)
    go = rand(out.shape, gen)
    report = fastgrad.explain(out, xs, grad_outputs=go)
    fb_names = {n for n, _ in report.fallback}
    assert fallback_expected <= fb_names, str(report)
    assert native_expected <= set(report.native), str(report)
    assert not report.all_native, str(report)
    assert not (fb_names & set(report.native)), str(report)
    for n, reason in report.fallback:
        assert isinstance(n, str) and isinstance(reason, str) and reason, str(report)
    assert report.fallback[0][0] in str(report)
    # explain must leave the graph usable
    g = fastgrad.grad(out, xs, grad_outputs=go)
    assert all(t is not None for t in g)


def test_explain_second_order_mixed(gen):
    x, w = rand((2, 3, 4), gen).requires_grad_(True), rand((2, 4, 5), gen).requires_grad_(True)
    g = fastgrad.grad(torch.tanh(torch.bmm(x, w)).sum(), [x, w], create_graph=True)
    report = fastgrad.explain((g[0] ** 2).sum() + (g[1] ** 2).sum(), [x, w], allow_unused=True)
    assert any("Region" in n for n in report.native), str(report)
    assert report.fallback, str(report)


def test_fallback_node_with_unused_next_edge(gen):
    """An opaque node whose other input needs no gradient."""
    w = rand((2, 4, 5), gen)  # constant: (None, 0) edge in BmmBackward0
    check_grad(lambda x: torch.exp(torch.bmm(torch.sin(x), w)), [rand((2, 3, 4), gen)], gen=gen,
               orders=2)


def test_unbind_fallback_none_grads(gen):
    """Only some outputs of a multi-output node are used (None gradients to the node)."""
    check_grad(lambda x: torch.sin(x.unbind(0)[1]) * 2.0, [rand((3, 4), gen)], gen=gen, orders=2)


def test_integer_index_gather(gen):
    idx = torch.tensor([[0, 2, 1], [3, 3, 0]])
    check_grad(lambda x: torch.exp(torch.gather(torch.tanh(x), 1, idx)), [rand((2, 4), gen)],
               gen=gen, orders=2)


@pytest.mark.parametrize("create_graph", [False, True])
def test_fallback_node_computes_only_wanted_edges(create_graph, gen, monkeypatch):
    """A fallback node computes the input's gradient only, as in PyTorch's engine, not the
    other operand's gradient nobody asked for: fastgrad asks PyTorch's engine for the edge
    toward x alone. (A hook on the node would send the whole call to PyTorch.)"""
    from fastgrad import sweep
    # large enough for the engine path (small nodes are called directly: cheaper than a walk)
    x = rand((8, 32, 4), gen).requires_grad_(True)
    w = rand((8, 4, 300), gen).requires_grad_(True)
    y = torch.tanh(torch.bmm(x, w)).sum()
    node = y.grad_fn.next_functions[0][0].next_functions[0][0]
    assert node.name() == "BmmBackward0"
    x_node = node.next_functions[0][0]  # (x's AccumulateGrad)
    asked, real = [], sweep._torch_grad

    def spy(outputs, inputs, *args, **kwargs):
        asked.append([(e.node.name(), e.output_nr) for e in inputs])
        return real(outputs, inputs, *args, **kwargs)
    monkeypatch.setattr(sweep, "_torch_grad", spy)
    got = fastgrad.grad(y, x, retain_graph=True, create_graph=create_graph)
    ref = torch.autograd.grad(y, x, retain_graph=True)
    torch.testing.assert_close(got[0], ref[0])
    assert asked == [[(x_node.name(), 0)]]


class _Counted(Cube):
    """Cube, counting its backward runs."""
    runs = 0

    @staticmethod
    def backward(ctx, g):
        _Counted.runs += 1
        return Cube.backward(ctx, g)


@pytest.mark.parametrize("retain_graph", [None, False, True])
def test_an_unused_input_beside_a_fallback_node(retain_graph, gen):
    """An input no path reaches (allow_unused=False): PyTorch's error for its index, the
    Function's backward run once (handing the call to PyTorch after the sweep ran it twice, and
    a torch.compile'd node, freed by the sweep, then raised a freed graph's error), and the
    graph freed afterwards as PyTorch's engine leaves it."""
    x0 = rand((5,), gen)
    seen = []
    for grad in (torch.autograd.grad, fastgrad.grad, fastgrad.grad):
        x, z = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
        y = torch.sin(_Counted.apply(torch.exp(x))).sum()
        _Counted.runs = 0
        with pytest.raises(RuntimeError) as e:
            grad(y, [x, z], retain_graph=retain_graph)
        again = _outcome(lambda: grad(y, x))
        seen.append((str(e.value), _Counted.runs, again if isinstance(again, str) else "ok"))
    assert seen[1] == seen[2] == seen[0]


class _Shifty(torch.autograd.Function):
    """A node whose gradient comes out in another layout every other run: a cached plan's
    replay of it does not hold, and the call is derived anew."""
    runs = 0

    @staticmethod
    def forward(ctx, x):
        return x * 3

    @staticmethod
    def backward(ctx, g):
        _Shifty.runs += 1
        r = g * 3
        return r if _Shifty.runs % 2 else r.t().contiguous().t()


def test_a_fallback_node_runs_once_per_call_when_its_replay_fails(gen):
    """A replay that does not hold hands the node's results to the sweep that derives the call
    anew (the node ran twice in one call before: its side effects twice)."""
    x0 = rand((4, 3), gen)
    for call in range(4):
        x = x0.clone().requires_grad_(True)
        y = torch.tanh(_Shifty.apply(torch.sin(x))).sum()
        before = _Shifty.runs
        got = fastgrad.grad(y, x, retain_graph=True)
        assert _Shifty.runs == before + 1, f"call {call}: ran {_Shifty.runs - before} times"
        _Shifty.runs = before  # (the same layout for torch's run)
        want = torch.autograd.grad(y, x)
        torch.testing.assert_close(got[0], want[0])


def _outcome(run):
    try:
        return run()
    except RuntimeError as e:
        return str(e)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (torch.compile's own jit use)
@pytest.mark.parametrize("retain_graph", [None, True])
def test_a_torch_compiled_module_in_the_graph(retain_graph, gen):
    """A torch.compile'd module's backward node (inductor keeps donated buffers, and refuses to
    run when the graph is kept) inside the graph: fastgrad raised where torch works. The same
    results, or PyTorch's error when the call keeps the graph."""
    lin = torch.nn.Linear(4, 4).double()
    try:
        f = torch.compile(lambda x: torch.tanh(lin(x)).sin())
        f(rand((3, 4), gen))
    except Exception as e:  # noqa: BLE001 - an environment where inductor cannot compile
        pytest.skip(f"torch.compile does not run here: {type(e).__name__}")
    x0 = rand((3, 4), gen)
    got = []
    for grad in (torch.autograd.grad, fastgrad.grad, fastgrad.grad):
        x = x0.clone().requires_grad_(True)
        y = f(x).pow(2).sum()
        got.append(_outcome(lambda: grad(y, [x, lin.weight], retain_graph=retain_graph)))
    for g in got[1:]:
        if isinstance(got[0], str):
            assert g == got[0]
        else:
            torch.testing.assert_close(g, got[0])
